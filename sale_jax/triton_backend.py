"""The `triton` backend: pads the inputs to the kernels' tiles, runs the Pallas kernels of `pallas_kernels` in their
Triton lowering (any GPU; interpret mode on a CPU) and assembles the results in the API's types. The means and the
column correction are the XLA reductions of `sale_jax.ops` that the reference quantizes around too, so both backends
see bit-identical means."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels
from sale_jax import tuning
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout
from sale_jax.ops import column_bias, estimated_q_codes, pad_axis, smoothing_means

MIN_TILE = 16  # Triton's smallest dot operand dimension
MIN_HEAD_DIM = 32  # int8 tensor-core dots contract over at least 32 (Hopper's int8 MMA k)


def unsupported(q: jax.Array, k: jax.Array, config: SaleConfig, backend: str = "triton") -> str | None:
    """Why the Triton kernels cannot take these shapes and block sizes, as a message that says what is accepted, or
    None where they can. `backend` names the caller's backend in the message (`mosaic_gpu` runs some of these
    kernels too)."""
    del k  # every key length is accepted
    return unsupported_head_dim(q.shape[-1], backend) or unsupported_block_sizes(config, backend)


def unsupported_head_dim(head_dim: int, backend: str = "triton") -> str | None:
    """`unsupported` on the head dimension alone."""
    if head_dim < MIN_HEAD_DIM or head_dim & (head_dim - 1):
        return f"backend={backend!r} needs head_dim to be a power of two >= {MIN_HEAD_DIM}, got {head_dim}"
    return None


def unsupported_block_sizes(config: SaleConfig, backend: str = "triton") -> str | None:
    """`unsupported` on the config alone (a `SaleConfig` naming the backend checks it when made)."""
    for name in ("block_q", "block_k"):
        if getattr(config, name) < MIN_TILE:
            return f"backend={backend!r} needs {name} >= {MIN_TILE}, got {getattr(config, name)}"
    return None


def estimate_tile(config: SaleConfig, table: tuning.KernelTuning) -> int:
    """Keys per estimate tile of the selection kernel: the tuning table's, and a multiple of block_k."""
    return max(table.triton_estimate_tile, config.block_k)


class Quantized(NamedTuple):
    """Pass 1 on the kernels, lengths padded: q rows to block_q, keys to `key_padding`."""
    q_rows: jax.Array
    q_codes: jax.Array
    q_scale: jax.Array
    k_codes: jax.Array
    k_scale: jax.Array
    k_smooth: jax.Array
    bias: jax.Array


def quantize(q: jax.Array, k: jax.Array, config: SaleConfig, key_padding: int,
             means: tuple[jax.Array, jax.Array] | None = None) -> Quantized:
    """Smoothed by `means`, when given (a query chunk of a longer call), else by this call's own."""
    per_block = config.quant_granularity == "per_block"
    q_mean, k_mean = smoothing_means(q, k) if means is None else means
    q_rows = pad_axis(q, 1, config.block_q)
    q_codes, q_scale = pallas_kernels.quantize_rows(
        q_rows, q_mean[:, 0], length=q.shape[1], tile=config.block_q, per_tile_scale=per_block,
        return_smooth=False, interpret=config.interpret)
    k_codes, k_scale, k_smooth = pallas_kernels.quantize_rows(
        pad_axis(k, 1, key_padding), k_mean[:, 0], length=k.shape[1], tile=config.block_k,
        per_tile_scale=per_block, return_smooth=True, interpret=config.interpret)
    bias = pad_axis(column_bias(q_mean, k.astype(jnp.float32) - k_mean), 2, key_padding)
    return Quantized(q_rows, q_codes, q_scale, k_codes, k_scale, k_smooth, bias)


class KernelRegions(NamedTuple):
    """A grid's rows and regions as the selection kernels take them: `arrays` (row_offsets, num_sink_blocks,
    local_first_block) and the static `bounds` (max_sink_blocks, max_local_blocks)."""
    arrays: tuple[jax.Array, jax.Array, jax.Array]
    bounds: dict


def kernel_regions(grid: BlockGrid, config: SaleConfig) -> KernelRegions:
    regions = grid.regions(config.sink_tokens, config.local_tokens)
    arrays = tuple(jnp.asarray(a) for a in (grid.row_offsets, regions.num_sink_blocks, regions.local_first_block))
    return KernelRegions(arrays, dict(max_sink_blocks=regions.max_sink_blocks,
                                      max_local_blocks=regions.max_local_blocks))


def select_blocks(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig, table: tuning.KernelTuning,
                  means: tuple[jax.Array, jax.Array] | None = None) -> BlockLayout:
    """The selection on the Triton kernels, launched as the tuning table `table` says."""
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    quant = quantize(q, k, config, estimate_tile(config, table), means)
    quant = quant._replace(q_codes=estimated_q_codes(quant.q_codes, config.estimate))
    regions = kernel_regions(grid, config)
    indices, counts = pallas_kernels.select_blocks(
        quant.q_rows, quant.q_codes, quant.q_scale, quant.k_smooth, quant.k_codes, quant.k_scale, quant.bias, tau,
        *regions.arrays, num_slots=grid.num_slots, q_len=grid.q_len, kv_len=grid.kv_len, block_q=config.block_q,
        block_k=config.block_k, **regions.bounds, scale=config.softmax_scale(q.shape[-1]),
        estimate_tile=estimate_tile(config, table), num_warps=table.triton_selection_warps,
        num_stages=table.triton_selection_stages, index_dtype=grid.index_dtype(), interpret=config.interpret)
    return BlockLayout(indices=indices, counts=counts, grid=grid)


def padded_attention_inputs(q, k, v, layout: BlockLayout, config: SaleConfig):
    """The computation kernels' arguments: q, k, v padded to whole blocks, the layout's arrays, and its shape."""
    grid = layout.grid
    arrays = (pad_axis(q, 1, config.block_q), pad_axis(k, 1, config.block_k), pad_axis(v, 1, config.block_k),
              layout.indices, layout.counts, jnp.asarray(grid.row_offsets))
    shape = dict(q_len=grid.q_len, kv_len=grid.kv_len, block_q=config.block_q, block_k=config.block_k,
                 scale=config.softmax_scale(q.shape[-1]))
    return arrays, shape


def block_sparse_attention(q, k, v, layout: BlockLayout, config: SaleConfig,
                           table: tuning.KernelTuning) -> tuple[jax.Array, jax.Array]:
    """The computation pass on the Triton kernel: out `[B, T, Hq, D]` and the log-sum-exp f32 `[B, Hq, T]`."""
    arrays, shape = padded_attention_inputs(q, k, v, layout, config)
    out, lse = pallas_kernels.block_sparse_attention(
        *arrays, **shape, num_warps=table.triton_attention_warps, num_stages=table.triton_attention_stages,
        interpret=config.interpret)
    return out[:, :layout.grid.q_len], lse[..., :layout.grid.q_len]
