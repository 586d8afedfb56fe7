"""The timed calls the attention benchmarks share: the dense baselines and our quantization pass alone."""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from sale_jax import pallas_backend


@functools.partial(jax.jit, static_argnames=("config",))
def quantize_only(q, k, config):
    """The quantization half of select_blocks_pallas (means, kernels, column correction), compiled as one program
    as it runs inside the selection (called eagerly, each of its ops would be dispatched and timed apart)."""
    return pallas_backend.quantize(q, k, config, pallas_backend.estimate_tile(config))


@jax.jit
def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@functools.partial(jax.jit, static_argnames=("scale",))
def pallas_triton_mha(q, k, v, scale):
    return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=True,
                                block_sizes=pallas_attention.BlockSizes(block_q=128, block_k=64), num_warps=8,
                                num_stages=3)
