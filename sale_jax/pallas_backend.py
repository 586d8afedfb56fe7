"""The `pallas` backend: pads inputs to the kernels' tiles, runs `pallas_kernels`, and assembles the results in
the API's types. The means and the column correction are plain XLA reductions shared with the reference, so both
backends quantize around bit-identical means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout
from sale_jax.reference.common import pad_axis
from sale_jax.reference.quantize import column_bias, smoothing_means

ESTIMATE_TILE = 128  # keys per low-bit estimate tile; int8 dots run the tensor cores far better at 128 than at 32
MIN_TILE = 16  # Triton's smallest dot operand dimension
MIN_HEAD_DIM = 32  # int8 tensor-core dots contract over at least 32 (Hopper's int8 MMA k); 16 gave wrong estimates


def check_supported(q: jax.Array, config: SaleConfig) -> None:
    """The kernels' shape limits, as errors that say what is accepted."""
    head_dim = q.shape[-1]
    if head_dim < MIN_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"backend='pallas' needs head_dim to be a power of two >= {MIN_HEAD_DIM}, got {head_dim}")
    for name in ("block_q", "block_k"):
        if getattr(config, name) < MIN_TILE:
            raise ValueError(f"backend='pallas' needs {name} >= {MIN_TILE}, got {getattr(config, name)}")


def estimate_tile(config: SaleConfig) -> int:
    """Keys per estimate tile: at least 128, and a multiple of block_k."""
    return max(ESTIMATE_TILE, config.block_k)


def select_blocks_pallas(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig) -> BlockLayout:
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    per_block = config.quant_granularity == "per_block"
    q_mean, k_mean = smoothing_means(q, k)
    q_rows = pad_axis(q, 1, config.block_q)
    k_rows = pad_axis(k, 1, estimate_tile(config))
    q_codes, q_scale = pallas_kernels.quantize_rows(
        q_rows, q_mean[:, 0], length=grid.q_len, tile=config.block_q, per_tile_scale=per_block,
        return_smooth=False, interpret=config.interpret)
    k_codes, k_scale, k_smooth = pallas_kernels.quantize_rows(
        k_rows, k_mean[:, 0], length=grid.kv_len, tile=config.block_k, per_tile_scale=per_block,
        return_smooth=True, interpret=config.interpret)
    bias = column_bias(q_mean, k.astype(jnp.float32) - k_mean)
    bias = pad_axis(bias, 2, estimate_tile(config))
    indices, counts = pallas_kernels.select_blocks(
        q_rows, q_codes, q_scale, k_smooth, k_codes, k_scale, bias, tau, jnp.asarray(grid.row_offsets),
        num_slots=grid.num_slots, q_len=grid.q_len, kv_len=grid.kv_len, block_q=config.block_q,
        block_k=config.block_k, sink_tokens=config.sink_tokens, local_tokens=config.local_tokens,
        scale=config.softmax_scale(q.shape[-1]), estimate_tile=estimate_tile(config),
        index_dtype=grid.index_dtype(), interpret=config.interpret)
    return BlockLayout(indices=indices, counts=counts, grid=grid)


def block_sparse_attention_pallas(q, k, v, layout: BlockLayout, config: SaleConfig):
    grid = layout.grid
    out, lse = pallas_kernels.block_sparse_attention(
        pad_axis(q, 1, config.block_q), pad_axis(k, 1, config.block_k), pad_axis(v, 1, config.block_k),
        layout.indices, layout.counts, jnp.asarray(grid.row_offsets), q_len=grid.q_len, kv_len=grid.kv_len,
        block_q=config.block_q, block_k=config.block_k, scale=config.softmax_scale(q.shape[-1]),
        interpret=config.interpret)
    return out[:, :grid.q_len], lse[..., :grid.q_len]
