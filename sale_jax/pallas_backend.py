"""The `pallas` backend: pads inputs to the kernels' tiles, runs `pallas_kernels`, and assembles the results in
the API's types. The means and the column correction are plain XLA reductions shared with the reference, so both
backends quantize around bit-identical means."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels
from pallas_kernels import mosaic_estimate, mosaic_sparse_attention
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout
from sale_jax.reference.common import pad_axis
from sale_jax.reference.quantize import column_bias, smoothing_means

ESTIMATE_TILE = 128  # keys per low-bit estimate tile; int8 dots run the tensor cores far better at 128 than at 32
MIN_TILE = 16  # Triton's smallest dot operand dimension
MIN_HEAD_DIM = 32  # int8 tensor-core dots contract over at least 32 (Hopper's int8 MMA k); 16 gave wrong estimates
# The Mosaic GPU estimate (pallas_kernels/mosaic_estimate.py) and its best measured launches on the H200
# (experiments/results/PERF_NOTES.md, sessions 9 and 10), fp8 codes: one warpgroup per q block with the widest key
# tile its accumulator holds (128 keys at block_q 128, 256 at 64), two tiles in flight; at block_q 128 from 64K
# keys, the split-rows kernel (two 64-row warpgroups fed by a TMA warpgroup, 256-key tiles, three in flight):
# 15.3 vs 16.2 ms at 64K and 64.6 vs 67.9 at 128K, but 3.99 vs 3.79 at 32K.
MOSAIC_HEAD_DIMS = (64, 128, 256)
MOSAIC_BLOCK_QS = (64, 128)
MOSAIC_STAGES = 2
MOSAIC_SPLIT_ROWS_FROM = 65536
MOSAIC_SPLIT_ROWS_STAGES = 3
MOSAIC_MAX_K_BLOCKS = 16384  # int32 flags of one q block in 64 KB of shared memory (half each with split rows)
# The Mosaic GPU computation pass (pallas_kernels/mosaic_sparse_attention.py, block_q 128 only: at 64 the Triton
# kernel measured faster) and its best knobs on the H200: kept blocks gathered into 128-key steps, two in flight
# (PERF_NOTES, session 9: 31.5 ms against Triton's 39.0 at 128K, density 0.10).
MOSAIC_KEYS_PER_STEP = 128
MOSAIC_ATTENTION_STAGES = 2


def check_supported(q: jax.Array, k: jax.Array, config: SaleConfig, backend: str) -> None:
    """The kernels' shape limits for `backend` ("pallas" or "pallas_mosaic"), as errors that say what is
    accepted."""
    head_dim = q.shape[-1]
    if head_dim < MIN_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"backend={backend!r} needs head_dim to be a power of two >= {MIN_HEAD_DIM}, got {head_dim}")
    for name in ("block_q", "block_k"):
        if getattr(config, name) < MIN_TILE:
            raise ValueError(f"backend={backend!r} needs {name} >= {MIN_TILE}, got {getattr(config, name)}")
    if backend != "pallas_mosaic":
        return
    if head_dim not in MOSAIC_HEAD_DIMS:
        raise ValueError(f"backend='pallas_mosaic' needs head_dim in {MOSAIC_HEAD_DIMS}, got {head_dim}")
    if config.block_q not in MOSAIC_BLOCK_QS:
        raise ValueError(f"backend='pallas_mosaic' needs block_q in {MOSAIC_BLOCK_QS} (wgmma rows), got "
                         f"{config.block_q}")
    one_warpgroup = _one_warpgroup_launch(config)
    if config.block_k > one_warpgroup.tile_k:
        raise ValueError(f"backend='pallas_mosaic' needs block_k <= {one_warpgroup.tile_k}, got {config.block_k}")
    padded_k_blocks = _padded_key_blocks(k.shape[1], config, one_warpgroup)
    if padded_k_blocks > MOSAIC_MAX_K_BLOCKS:
        raise ValueError(f"backend='pallas_mosaic' holds a q block's key-block flags in shared memory: at most "
                         f"{MOSAIC_MAX_K_BLOCKS} (key length <= {MOSAIC_MAX_K_BLOCKS * config.block_k} at "
                         f"block_k={config.block_k}), got key length {k.shape[1]} ({padded_k_blocks} blocks)")


def fits(q: jax.Array, k: jax.Array, config: SaleConfig, backend: str) -> bool:
    """Whether `backend` ("pallas" or "pallas_mosaic") takes these shapes and block sizes."""
    try:
        check_supported(q, k, config, backend)
    except ValueError:
        return False
    return True


class EstimateLaunch(NamedTuple):
    """`mosaic_estimate.estimate_hits`' knobs for one call."""
    compute_warpgroups: int
    tile_k: int
    max_concurrent_steps: int


def _one_warpgroup_launch(config: SaleConfig) -> EstimateLaunch:
    """The widest key tile one warpgroup's f32 accumulator of block_q rows holds."""
    return EstimateLaunch(1, mosaic_estimate.MAX_ACC_ELEMENTS // config.block_q, MOSAIC_STAGES)


def mosaic_estimate_launch(kv_len: int, head_dim: int, config: SaleConfig) -> EstimateLaunch:
    """The measured best launch (see MOSAIC_SPLIT_ROWS_FROM): the split-rows kernel at block_q 128 from that many
    keys, where its two rows of flags (one per warpgroup) fit in shared memory; one warpgroup otherwise. Not at
    head_dim 256: three stages of 256-key tiles would take 216 KB before the q codes and flags."""
    split = EstimateLaunch(2, 2 * mosaic_estimate.MAX_ACC_ELEMENTS // config.block_q, MOSAIC_SPLIT_ROWS_STAGES)
    if (config.block_q == 2 * mosaic_estimate.SPLIT_ROWS and kv_len >= MOSAIC_SPLIT_ROWS_FROM and head_dim <= 128
            and 2 * _padded_key_blocks(kv_len, config, split) <= MOSAIC_MAX_K_BLOCKS):
        return split
    return _one_warpgroup_launch(config)


def _padded_key_blocks(kv_len: int, config: SaleConfig, launch: EstimateLaunch) -> int:
    return _mosaic_key_padding(config, launch) * _cdiv(kv_len, _mosaic_key_padding(config, launch)) // config.block_k


def estimate_tile(config: SaleConfig) -> int:
    """Keys per estimate tile: at least 128, and a multiple of block_k."""
    return max(ESTIMATE_TILE, config.block_k)


class _Quantized(NamedTuple):
    """Pass 1 on the kernels, lengths padded: q rows to block_q, keys to `key_padding`."""
    q_rows: jax.Array
    q_codes: jax.Array
    q_scale: jax.Array
    k_codes: jax.Array
    k_scale: jax.Array
    k_smooth: jax.Array
    bias: jax.Array


def quantize(q: jax.Array, k: jax.Array, config: SaleConfig, key_padding: int) -> _Quantized:
    per_block = config.quant_granularity == "per_block"
    q_mean, k_mean = smoothing_means(q, k)
    q_rows = pad_axis(q, 1, config.block_q)
    q_codes, q_scale = pallas_kernels.quantize_rows(
        q_rows, q_mean[:, 0], length=q.shape[1], tile=config.block_q, per_tile_scale=per_block,
        return_smooth=False, interpret=config.interpret)
    k_codes, k_scale, k_smooth = pallas_kernels.quantize_rows(
        pad_axis(k, 1, key_padding), k_mean[:, 0], length=k.shape[1], tile=config.block_k,
        per_tile_scale=per_block, return_smooth=True, interpret=config.interpret)
    bias = pad_axis(column_bias(q_mean, k.astype(jnp.float32) - k_mean), 2, key_padding)
    return _Quantized(q_rows, q_codes, q_scale, k_codes, k_scale, k_smooth, bias)


def select_blocks_pallas(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig) -> BlockLayout:
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    quant = quantize(q, k, config, estimate_tile(config))
    indices, counts = pallas_kernels.select_blocks(
        quant.q_rows, quant.q_codes, quant.q_scale, quant.k_smooth, quant.k_codes, quant.k_scale, quant.bias, tau,
        jnp.asarray(grid.row_offsets), num_slots=grid.num_slots, q_len=grid.q_len, kv_len=grid.kv_len,
        block_q=config.block_q, block_k=config.block_k, sink_tokens=config.sink_tokens,
        local_tokens=config.local_tokens, scale=config.softmax_scale(q.shape[-1]),
        estimate_tile=estimate_tile(config), index_dtype=grid.index_dtype(), interpret=config.interpret)
    return BlockLayout(indices=indices, counts=counts, grid=grid)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mosaic_key_padding(config: SaleConfig, launch: EstimateLaunch) -> int:
    """Keys pad to whole estimate tiles and to whole compaction chunks of flags."""
    return max(launch.tile_k, pallas_kernels.COMPACTION_CHUNK * config.block_k)


def _middle_ends(grid: BlockGrid, config: SaleConfig) -> np.ndarray:
    """Per q block, the first key of its local region (where its estimated middle keys end), as the selection
    kernel computes it."""
    q_blocks = np.arange(grid.num_q_blocks)
    first_pos = q_blocks * grid.block_q + grid.query_offset
    num_sink = np.minimum(-(-config.sink_tokens // grid.block_k), grid.visible_counts)
    local_start = np.maximum(np.maximum(first_pos - config.local_tokens + 1, 0) // grid.block_k, num_sink)
    return (local_start * grid.block_k).astype(np.int32)


def select_blocks_mosaic(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig) -> BlockLayout:
    """The selection in three launches: row thresholds (Triton), the low-bit estimate's hit flags (Mosaic GPU,
    fp8 codes, which hold the 4-bit codes exactly), their compaction into the kept-block lists (Triton). The same
    decisions as `select_blocks_pallas` up to float rounding at the threshold."""
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    launch = mosaic_estimate_launch(k.shape[1], k.shape[-1], config)
    quant = quantize(q, k, config, _mosaic_key_padding(config, launch))
    regions = dict(q_len=grid.q_len, kv_len=grid.kv_len, block_q=config.block_q, block_k=config.block_k,
                   sink_tokens=config.sink_tokens, local_tokens=config.local_tokens)
    row_threshold = pallas_kernels.row_thresholds(
        quant.q_rows, quant.q_scale, quant.k_smooth, tau, **regions, scale=config.softmax_scale(q.shape[-1]),
        interpret=config.interpret)
    middle_start = min(-(-config.sink_tokens // config.block_k) * config.block_k, quant.k_codes.shape[1])
    hits = pallas_kernels.estimate_hits(
        quant.q_codes.astype(jnp.float8_e4m3fn), quant.k_codes.astype(jnp.float8_e4m3fn), 1.0 / quant.q_scale,
        row_threshold, quant.k_scale, quant.bias, jnp.asarray(_middle_ends(grid, config)), block_q=config.block_q,
        block_k=config.block_k, middle_start=middle_start, **launch._asdict(),
        interpret=plgpu.InterpretGPUParams() if config.interpret else False)
    indices, counts = pallas_kernels.compact_hits(
        hits, jnp.asarray(grid.row_offsets), num_slots=grid.num_slots, **regions, index_dtype=grid.index_dtype(),
        interpret=config.interpret)
    return BlockLayout(indices=indices, counts=counts, grid=grid)


def fits_mosaic_attention(q: jax.Array, config: SaleConfig) -> bool:
    """Whether the Mosaic GPU computation pass takes these inputs (16-bit, head_dim 64 or 128, block_q 128, where
    it is faster); the Triton kernel runs the rest."""
    return (q.dtype in mosaic_sparse_attention.DTYPES and q.shape[-1] in mosaic_sparse_attention.HEAD_DIMS
            and config.block_q == mosaic_sparse_attention.BLOCK_Q and MOSAIC_KEYS_PER_STEP % config.block_k == 0)


def block_sparse_attention_pallas(q, k, v, layout: BlockLayout, config: SaleConfig, backend: str):
    """The computation pass: the Mosaic GPU kernel under the `pallas_mosaic` backend where it fits, else Triton."""
    grid = layout.grid
    arrays = (pad_axis(q, 1, config.block_q), pad_axis(k, 1, config.block_k), pad_axis(v, 1, config.block_k),
              layout.indices, layout.counts, jnp.asarray(grid.row_offsets))
    shape = dict(q_len=grid.q_len, kv_len=grid.kv_len, block_q=config.block_q, block_k=config.block_k,
                 scale=config.softmax_scale(q.shape[-1]))
    if backend == "pallas_mosaic" and fits_mosaic_attention(q, config):
        out, lse = pallas_kernels.mosaic_block_sparse_attention(
            *arrays, **shape, keys_per_step=MOSAIC_KEYS_PER_STEP, stages=MOSAIC_ATTENTION_STAGES,
            interpret=plgpu.InterpretGPUParams() if config.interpret else False)
    else:
        out, lse = pallas_kernels.block_sparse_attention(*arrays, **shape, interpret=config.interpret)
    return out[:, :grid.q_len], lse[..., :grid.q_len]
