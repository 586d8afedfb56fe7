"""The timed calls the attention benchmarks share: the dense baselines and our quantization pass alone."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

import pallas_kernels
from sale_jax import pallas_backend
from sale_jax.reference.common import pad_axis
from sale_jax.reference.quantize import column_bias, smoothing_means


def quantize_only(q, k, config):
    """The quantization half of select_blocks_pallas (means, kernels, column correction)."""
    tile = pallas_backend.estimate_tile(config)
    q_mean, k_mean = smoothing_means(q, k)
    per_block = config.quant_granularity == "per_block"
    qc = pallas_kernels.quantize_rows(pad_axis(q, 1, config.block_q), q_mean[:, 0], length=q.shape[1],
                                      tile=config.block_q, per_tile_scale=per_block, return_smooth=False)
    kc = pallas_kernels.quantize_rows(pad_axis(k, 1, tile), k_mean[:, 0], length=k.shape[1], tile=config.block_k,
                                      per_tile_scale=per_block, return_smooth=True)
    return qc, kc, column_bias(q_mean, k.astype(jnp.float32) - k_mean)


@jax.jit
def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


@functools.partial(jax.jit, static_argnames=("scale",))
def pallas_triton_mha(q, k, v, scale):
    return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=True,
                                block_sizes=pallas_attention.BlockSizes(block_q=128, block_k=64), num_warps=8,
                                num_stages=3)
