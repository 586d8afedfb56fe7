"""The `mosaic_gpu` backend (Hopper): the selection in three launches, row thresholds (Triton), the low-bit
estimate's hit flags (`pallas_kernels.mosaic_estimate`, Mosaic GPU, fp8 codes, which hold the 4-bit codes exactly)
and their compaction into the kept-block lists (Triton); the computation pass on the Mosaic GPU kernel where it
takes the inputs, else on the Triton one. The same kept blocks as the `triton` backend up to float rounding at the
threshold. Launch choices come from the Hopper tuning table (`sale_jax.tuning`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels
from pallas_kernels import mosaic_estimate, mosaic_sparse_attention, sparse_wgmma
from sale_jax import triton_backend, tuning
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout

HEAD_DIMS = (64, 128, 256)  # the estimate's swizzled fp8 rows
BLOCK_QS = (64, 128)  # wgmma rows come in groups of 64; the estimate holds one q block's accumulator
# A launch of the estimate holds one q block's int32 flags for its keys in 64 KB of shared memory (half each with
# split rows): longer keys are estimated in chunks of launches (`estimate_key_chunks`).
MAX_K_BLOCKS = 16384


def _interpret(config: SaleConfig):
    return plgpu.InterpretGPUParams() if config.interpret else False


def unsupported(q: jax.Array, k: jax.Array, config: SaleConfig) -> str | None:
    """Why this backend cannot take these shapes and block sizes (the limits of the Triton kernels it runs, and the
    Mosaic GPU estimate's), as a message that says what is accepted, or None where it can."""
    del k  # every key length is accepted (in key chunks, estimate_key_chunks)
    reason = triton_backend.unsupported_head_dim(q.shape[-1], backend="mosaic_gpu")
    if reason is None and q.shape[-1] not in HEAD_DIMS:
        reason = f"backend='mosaic_gpu' needs head_dim in {HEAD_DIMS}, got {q.shape[-1]}"
    return reason or unsupported_block_sizes(config)


def unsupported_block_sizes(config: SaleConfig) -> str | None:
    """`unsupported` on the config alone (a `SaleConfig` naming the backend checks it when made)."""
    reason = triton_backend.unsupported_block_sizes(config, backend="mosaic_gpu")
    if reason is None and config.block_q not in BLOCK_QS:
        reason = f"backend='mosaic_gpu' needs block_q in {BLOCK_QS} (wgmma rows), got {config.block_q}"
    one_warpgroup_tile = _one_warpgroup_tile(config)
    if reason is None and config.block_k > one_warpgroup_tile:
        reason = f"backend='mosaic_gpu' needs block_k <= {one_warpgroup_tile}, got {config.block_k}"
    return reason


class EstimateLaunch(NamedTuple):
    """`mosaic_estimate.estimate_hits`' knobs for one call."""
    compute_warpgroups: int
    tile_k: int
    max_concurrent_steps: int
    heads_per_cta: int = 1


def _one_warpgroup_tile(config: SaleConfig) -> int:
    """The widest key tile one warpgroup's f32 accumulator of block_q rows holds."""
    return mosaic_estimate.MAX_ACC_ELEMENTS // config.block_q


def estimate_launch(kv_len: int, head_dim: int, group: int, config: SaleConfig,
                    table: tuning.KernelTuning) -> EstimateLaunch:
    """The split-rows kernel at block_q 128 from the tuning table's `mosaic_split_rows_from` keys on, where its two
    rows of flags (one per warpgroup) fit in shared memory; one warpgroup otherwise. Not at head_dim 256: three
    stages of 256-key tiles would take 216 KB without the q codes and flags. Not for 2:4-sparse q codes, whose
    halved tensor-core time one warpgroup per CTA keeps busier (docs/tuning.md#estimate-sparse-q); these run
    the table's `mosaic_sparse_q_heads_per_cta` q heads of the `group` sharing a kv head per CTA, where it
    divides the group."""
    if (config.block_q == 2 * mosaic_estimate.SPLIT_ROWS and kv_len >= table.mosaic_split_rows_from
            and head_dim <= 128 and config.estimate == "full"):
        return EstimateLaunch(2, 2 * _one_warpgroup_tile(config), table.mosaic_split_rows_stages)
    heads = table.mosaic_sparse_q_heads_per_cta if config.estimate == "sparse_q" else 1
    return EstimateLaunch(1, _one_warpgroup_tile(config), table.mosaic_estimate_stages,
                          heads if group % heads == 0 else 1)


def key_padding(config: SaleConfig, launch: EstimateLaunch) -> int:
    """Keys pad to whole estimate tiles and to whole compaction chunks of flags."""
    return max(launch.tile_k, pallas_kernels.COMPACTION_CHUNK * config.block_k)


def estimate_key_chunks(padded_kv_len: int, config: SaleConfig, launch: EstimateLaunch,
                        max_k_blocks: int = MAX_K_BLOCKS) -> list[tuple[int, int]]:
    """The `[start, end)` key ranges of the estimate's launches: as long as a launch's flags fit in shared memory
    (`max_k_blocks` per q block, shared by its warpgroups and q heads), in whole units of the key padding."""
    padding = key_padding(config, launch)
    flag_rows = launch.compute_warpgroups * launch.heads_per_cta
    chunk = max_k_blocks // flag_rows * config.block_k // padding * padding
    return [(start, min(start + chunk, padded_kv_len)) for start in range(0, padded_kv_len, chunk)]


def row_thresholds(quant, tau, grid: BlockGrid, config: SaleConfig) -> jax.Array:
    """Each query row's threshold on the estimate, from its exact statistics over the sink and local keys."""
    kernel_regions = triton_backend.kernel_regions(grid, config)
    return pallas_kernels.row_thresholds(
        quant.q_rows, quant.q_scale, quant.k_smooth, tau, *kernel_regions.arrays, q_len=grid.q_len,
        kv_len=grid.kv_len, block_q=config.block_q, block_k=config.block_k,
        scale=config.softmax_scale(quant.q_rows.shape[-1]), interpret=config.interpret)


def estimate_hits(quant, row_threshold, tau, grid: BlockGrid, config: SaleConfig, launch: EstimateLaunch):
    """The estimate's hit flags `[B, Hq, nQ, nK]`, one launch per key chunk. Exact: the row thresholds come from
    the sink and local keys of every row, and each key block's flag depends on its own keys alone."""
    regions = grid.regions(config.sink_tokens, config.local_tokens)
    middle_start = regions.sink_blocks * config.block_k
    # Each head's estimated keys end where its local blocks start; a streaming head (tau inf) estimates none.
    middle_end = jnp.where(jnp.isinf(tau)[:, None], 0, jnp.asarray(regions.local_first_block * config.block_k)[None])
    q_codes, k_codes = quant.q_codes, quant.k_codes.astype(jnp.float8_e4m3fn)
    q_positions = None
    if config.estimate == "sparse_q":
        q_codes, q_positions = sparse_wgmma.compress(q_codes)
    q_codes = q_codes.astype(jnp.float8_e4m3fn)
    hits = []
    for start, end in estimate_key_chunks(k_codes.shape[1], config, launch, MAX_K_BLOCKS):
        hits.append(pallas_kernels.estimate_hits(
            q_codes, k_codes[:, start:end], 1.0 / quant.q_scale, row_threshold, quant.k_scale[..., start:end],
            quant.bias[..., start:end], jnp.clip(middle_end - start, 0, end - start), block_q=config.block_q,
            block_k=config.block_k, middle_start=min(max(middle_start - start, 0), end - start),
            **launch._asdict(), q_positions=q_positions, interpret=_interpret(config)))
    return hits[0] if len(hits) == 1 else jnp.concatenate(hits, axis=-1)


def select_blocks(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig, table: tuning.KernelTuning,
                  means: tuple[jax.Array, jax.Array] | None = None) -> BlockLayout:
    """The selection in three launches, the estimate's as the tuning table `table` says."""
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    launch = estimate_launch(k.shape[1], k.shape[-1], q.shape[2] // k.shape[2], config, table)
    quant = triton_backend.quantize(q, k, config, key_padding(config, launch), means)
    hits = estimate_hits(quant, row_thresholds(quant, tau, grid, config), tau, grid, config, launch)
    return compact_hits(hits, grid, config)


def compact_hits(hits, grid: BlockGrid, config: SaleConfig) -> BlockLayout:
    """The kept-block lists from the estimate's hit flags: sink blocks, middle hits and local blocks."""
    kernel_regions = triton_backend.kernel_regions(grid, config)
    indices, counts = pallas_kernels.compact_hits(
        hits, *kernel_regions.arrays, num_slots=grid.num_slots, q_len=grid.q_len, kv_len=grid.kv_len,
        block_q=config.block_q, **kernel_regions.bounds, index_dtype=grid.index_dtype(), interpret=config.interpret)
    return BlockLayout(indices=indices, counts=counts, grid=grid)


def fits_attention(q: jax.Array, config: SaleConfig, table: tuning.KernelTuning) -> bool:
    """Whether the Mosaic GPU computation pass takes these inputs: 16-bit, head_dim 64 or 128, block_q 128 (the
    only one it is built for, docs/tuning.md#mosaic-computation) and blocks that divide a step of `table`'s."""
    keys_per_step = table.mosaic_attention_keys_per_step
    return (q.dtype in mosaic_sparse_attention.DTYPES and q.shape[-1] in mosaic_sparse_attention.HEAD_DIMS
            and config.block_q == mosaic_sparse_attention.BLOCK_Q and keys_per_step % config.block_k == 0)


def block_sparse_attention(q, k, v, layout: BlockLayout, config: SaleConfig,
                           table: tuning.KernelTuning) -> tuple[jax.Array, jax.Array]:
    """The computation pass: the Mosaic GPU kernel where it takes the inputs (`fits_attention`), else Triton's."""
    if not fits_attention(q, config, table):
        return triton_backend.block_sparse_attention(q, k, v, layout, config, table)
    arrays, shape = triton_backend.padded_attention_inputs(q, k, v, layout, config)
    out, lse = pallas_kernels.mosaic_block_sparse_attention(
        *arrays, **shape, keys_per_step=table.mosaic_attention_keys_per_step, stages=table.mosaic_attention_stages,
        interpret=_interpret(config))
    return out[:, :layout.grid.q_len], lse[..., :layout.grid.q_len]
