"""What the attention benchmarks share: the dense baselines, our quantization pass alone, and the uniform tau that
keeps a target density."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

import sale_jax
from sale_jax import SaleConfig, triton_backend, tuning


def dense_baseline() -> str:
    """The dense attention SALE is timed against: cuDNN's flash attention on a GPU, XLA's attention elsewhere
    (where the benchmarks run only as smoke runs). Result keys carry its name (`cudnn_ms`, `xla_ms`)."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


@functools.partial(jax.jit, static_argnames=("implementation",))
def dense_attention(q, k, v, implementation: str):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("config",))
def quantize_only(q, k, config: SaleConfig):
    """The quantization half of the Pallas selection (means, kernels, column correction), compiled as one program
    as it runs inside the selection (called eagerly, each of its ops would be dispatched and timed apart)."""
    return triton_backend.quantize(q, k, config, triton_backend.estimate_tile(config, tuning.for_backend("triton")))


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def pallas_triton_mha(q, k, v, scale: float, interpret: bool = False):
    """JAX's own Pallas-Triton flash attention (K/V repeated to the q heads by the caller): 128 x 64 blocks, 8 warps,
    3 stages."""
    return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=True,
                                block_sizes=pallas_attention.BlockSizes(block_q=128, block_k=64), num_warps=8,
                                num_stages=3, interpret=interpret)


def tau_for_density(q, k, config: SaleConfig, target: float, steps: int = 16) -> float:
    """The uniform tau whose layout keeps about `target` of the visible blocks: density falls as tau rises, so
    bisect on log tau over [1e-6, 1]."""
    low, high = math.log(1e-6), 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        tau = jnp.full((q.shape[2],), math.exp(middle), jnp.float32)
        if float(sale_jax.select_blocks(q, k, tau, config).density()) > target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)
