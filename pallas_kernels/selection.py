"""Pass 2 kernel: per (q block, q head, batch element), exact sink-local statistics, then a low-bit estimate of
every middle key, then the kept key-block list written straight into the packed layout.

Each q block's regions come from the caller as key-block bounds, one int32 per q block: the sink is
`[0, num_sink_blocks)`, the middle `[num_sink_blocks, local_first_block)`, the local region `[local_first_block,
visible)`, with `visible` the length of the q block's row in the packed layout (`row_offsets`). The middle region
holds only key blocks that every row of the block sees in full (the local region always covers the diagonal), so
the estimate loop needs no causal mask. It walks the middle keys in tiles of
`estimate_tile` keys (a multiple of `block_k`; larger int8 tiles run the tensor cores better) and reduces each
tile's hits to one flag per key block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.launch import QBlockGrid, pallas_call_with_initial_outputs

_PAD_CHUNK = 256  # slots written per store when filling the tail of a row's index list
_THRESHOLD_FLOOR = -1e30  # below any finite score estimate
_EXACT = jax.lax.Precision.HIGHEST  # IEEE f32 dots for f32 inputs (the default is TF32); no effect on bf16/fp16


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Regions:
    """This program's q block: its rows' key positions, and its key blocks' regions as the caller bounds them:
    sink `[0, num_sink)`, middle `[num_sink, local_start)`, local `[local_start, num_visible)`."""

    def __init__(self, q_block, row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, *, q_len, kv_len,
                 block_q):
        rows = q_block * block_q + jnp.arange(block_q)
        self.row_is_real = rows < q_len
        self.row_pos = rows + (kv_len - q_len)
        self.num_visible = row_offsets_ref[q_block + 1] - row_offsets_ref[q_block]
        self.num_sink = num_sink_blocks_ref[q_block]
        self.local_start = local_first_block_ref[q_block]


def _row_thresholds(q, row_scale, k_smooth_ref, tau, regions: _Regions, *, kv_len, block_k, scale):
    """Exact statistics over the sink and local blocks, turned into each row's threshold on the estimate:
    `(row_threshold, inverse_row_scale)` with a key hitting iff `sk_j * dot + c_j * inverse_row_scale -
    row_threshold > 0`."""
    row_pos = regions.row_pos

    def reference_block(block, carry):
        row_max, row_sum = carry
        keys = block * block_k + jnp.arange(block_k)
        k = k_smooth_ref[pl.ds(block * block_k, block_k), :]
        s = scale * jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_EXACT,
                                        preferred_element_type=jnp.float32)
        visible = (keys[None, :] <= row_pos[:, None]) & (keys[None, :] < kv_len)
        s = jnp.where(visible, s, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        row_sum = row_sum * jnp.exp(row_max - safe_max) + jnp.sum(jnp.exp(s - safe_max[:, None]), axis=1)
        return new_max, row_sum

    block_q = q.shape[0]
    stats = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    stats = jax.lax.fori_loop(0, regions.num_sink, reference_block, stats)
    row_max, row_sum = jax.lax.fori_loop(regions.local_start, regions.num_visible, reference_block, stats)
    row_max = jnp.where(regions.row_is_real, row_max, 0.0)

    log_tau = jnp.log(jnp.where(tau > 0, tau, 1.0))
    threshold = jnp.where(tau > 0, row_max + log_tau + jnp.log(row_sum), -jnp.inf)
    # scale * (sq_i * sk_j * dot + c_j) > threshold_i  <=>  sk_j * dot + c_j / sq_i - threshold_i / (scale * sq_i) > 0
    # (sq_i > 0): two fused multiply-adds per score instead of four operations. Rounding differs from the
    # reference's order only in the last bits, which can flip blocks whose best margin is within rounding of the
    # threshold. The floor keeps dense heads (-inf) finite, so masked keys (-inf) never meet -inf - -inf = NaN.
    inverse_row_scale = 1.0 / row_scale
    row_threshold = jnp.maximum(threshold * (inverse_row_scale / scale), _THRESHOLD_FLOOR)
    row_threshold = jnp.where(regions.row_is_real, row_threshold, jnp.inf)  # padding rows select nothing
    return row_threshold, inverse_row_scale


class _ListWriter:
    """Writes one q block's kept-block list: sink ids, then middle hits as they are found, then local ids and the
    padding tail (the last kept id repeated, so a kernel prefetching one past the end reads a valid id)."""

    def __init__(self, indices_ref, slot_base, regions: _Regions, *, max_sink_blocks, max_local_blocks):
        self.indices_ref, self.slot_base, self.regions = indices_ref, slot_base, regions
        self.max_sink = _next_power_of_two(max(max_sink_blocks, 1))
        self.max_local = _next_power_of_two(max(max_local_blocks, 1))

    def write(self, slots, values, valid):
        """Stores block ids at positions `slots` of this q block's list where `valid`."""
        pltriton.store(self.indices_ref.at[self.slot_base + slots], values.astype(self.indices_ref.dtype),
                       mask=valid)

    def sink(self):
        """Writes the sink ids; returns the count so far."""
        sink_ids = jnp.arange(self.max_sink)
        self.write(sink_ids, sink_ids, sink_ids < self.regions.num_sink)
        return self.regions.num_sink

    def middle_hits(self, count, first_block, block_hit):
        """Appends blocks `first_block + j` where `block_hit[j]` (int32 0/1, ascending j); returns the count."""
        position = count + jnp.cumsum(block_hit) - block_hit
        self.write(position, first_block + jnp.arange(block_hit.shape[0]), block_hit > 0)
        return count + jnp.sum(block_hit)

    def local_and_tail(self, count):
        """Writes the local ids and the padding tail; returns the final count."""
        regions = self.regions
        local_ids = jnp.arange(self.max_local)
        self.write(count + local_ids, regions.local_start + local_ids,
                   local_ids < regions.num_visible - regions.local_start)
        count = count + regions.num_visible - regions.local_start

        def pad_chunk(chunk, carry):
            slots = count + chunk * _PAD_CHUNK + jnp.arange(_PAD_CHUNK)
            self.write(slots, jnp.full((_PAD_CHUNK,), regions.num_visible - 1), slots < regions.num_visible)
            return carry

        jax.lax.fori_loop(0, pl.cdiv(regions.num_visible - count, _PAD_CHUNK), pad_chunk, 0)
        return count


def _selection_kernel(q_ref, q_codes_ref, q_scale_ref, k_smooth_ref, k_codes_ref, k_scale_ref, bias_ref, tau_ref,
                      row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, indices_ref, counts_ref, *, q_len,
                      kv_len, block_q, block_k, max_sink_blocks, max_local_blocks, scale, estimate_tile,
                      num_q_blocks):
    q_block = num_q_blocks - 1 - pl.program_id(0)  # QBlockGrid's order: longest rows first
    head = pl.program_id(1)
    regions = _Regions(q_block, row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, q_len=q_len,
                       kv_len=kv_len, block_q=block_q)
    row_threshold, inverse_row_scale = _row_thresholds(q_ref[...], q_scale_ref[...], k_smooth_ref, tau_ref[head],
                                                       regions, kv_len=kv_len, block_k=block_k, scale=scale)
    writer = _ListWriter(indices_ref, row_offsets_ref[q_block], regions, max_sink_blocks=max_sink_blocks,
                         max_local_blocks=max_local_blocks)
    count = writer.sink()

    # Middle keys: low-bit estimate, one flag per key block, compacted into the list as we go.
    q_codes = q_codes_ref[...]
    middle_start, middle_end = regions.num_sink * block_k, regions.local_start * block_k
    # Tiles are aligned to `estimate_tile` so the last one ends inside the padded keys (the caller pads them to a
    # multiple of the tile); the first one may start among the sink keys, which are masked like the local ones.
    first_tile_start = middle_start // estimate_tile * estimate_tile
    blocks_per_tile = estimate_tile // block_k

    def middle_tile(tile, count):
        start = first_tile_start + tile * estimate_tile
        keys = start + jnp.arange(estimate_tile)
        k_codes = k_codes_ref[pl.ds(start, estimate_tile), :]
        dots = jax.lax.dot_general(q_codes, k_codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        k_scale = k_scale_ref[pl.ds(start, estimate_tile)]
        bias = bias_ref[pl.ds(start, estimate_tile)]
        # Sink and local keys are never "selected": they are kept anyway and already in the statistics.
        bias = jnp.where((keys >= middle_start) & (keys < middle_end), bias, -jnp.inf)

        excess = k_scale[None, :] * dots.astype(jnp.float32) + (
            bias[None, :] * inverse_row_scale[:, None] - row_threshold[:, None])
        # Reduce within each key block first (along the fast axis), then over rows: reducing over rows first costs
        # a layout change of the whole tile (docs/tuning.md#triton-selection).
        block_best = jnp.max(jnp.max(excess.reshape(block_q, blocks_per_tile, block_k), axis=2), axis=0)
        return writer.middle_hits(count, start // block_k, (block_best > 0).astype(jnp.int32))

    # A streaming head (tau inf) keeps no middle block: its estimate is skipped.
    estimated = (middle_end > middle_start) & (tau_ref[head] < jnp.inf)
    num_tiles = jnp.where(estimated, pl.cdiv(middle_end - first_tile_start, estimate_tile), 0)
    count = jax.lax.fori_loop(0, num_tiles, middle_tile, count)
    counts_ref[q_block] = writer.local_and_tail(count)


@functools.partial(jax.jit, static_argnames=("num_slots", "q_len", "kv_len", "block_q", "block_k",
                                             "max_sink_blocks", "max_local_blocks", "scale", "estimate_tile",
                                             "num_warps", "num_stages", "index_dtype", "interpret"))
def select_blocks(q, q_codes, q_scale, k_smooth, k_codes, k_scale, column_bias, tau, row_offsets, num_sink_blocks,
                  local_first_block, *, num_slots: int, q_len: int, kv_len: int, block_q: int, block_k: int,
                  max_sink_blocks: int, max_local_blocks: int, scale: float, estimate_tile: int = 128,
                  num_warps: int = 4, num_stages: int = 2, index_dtype=jnp.int16, interpret: bool = False,
                  initial_outputs=None):
    """Runs the selection pass; returns the packed kept-block `indices [B, Hq, slots]` and `counts [B, Hq, nQ]`.

    Shapes (lengths padded: `T_pad` to a multiple of `block_q`, `S_pad` to a multiple of `block_k` and of
    `estimate_tile`): q, q_codes `[B, T_pad, Hq, D]`; q_scale f32 `[B, Hq, T_pad]`; k_smooth, k_codes
    `[B, S_pad, Hkv, D]`; k_scale f32 `[B, Hkv, S_pad]`; column_bias f32 `[B, Hq, S_pad]`; tau f32 `[Hq]`;
    row_offsets int32 `[nQ + 1]` (start of each q block's list; the last entry is `num_slots`);
    num_sink_blocks, local_first_block int32 `[nQ]`, each q block's region bounds (the module docstring), and
    `max_sink_blocks`, `max_local_blocks` the most sink and local blocks of any q block.
    `initial_outputs` (tests only) are buffers the outputs start from.
    """
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len, kv_heads = k_codes.shape[1], k_codes.shape[2]
    num_q_blocks = padded_q_len // block_q
    if estimate_tile % block_k or padded_kv_len % estimate_tile:
        raise ValueError(f"estimate_tile {estimate_tile} must be a multiple of block_k {block_k} and divide the "
                         f"padded key length {padded_kv_len}")
    kernel = functools.partial(
        _selection_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
        max_sink_blocks=max_sink_blocks, max_local_blocks=max_local_blocks, scale=scale, estimate_tile=estimate_tile,
        num_q_blocks=num_q_blocks)
    bounds_spec = pl.BlockSpec((num_q_blocks,), lambda i, h, b: (0,))

    grid = QBlockGrid(num_q_blocks, q_heads, kv_heads, batch)
    q_spec, kv_spec = grid.q_rows_spec(block_q, head_dim), grid.kv_spec(padded_kv_len, head_dim)
    return pallas_call_with_initial_outputs(
        kernel,
        inputs=(q, q_codes, q_scale, k_smooth, k_codes, k_scale, column_bias, tau, row_offsets, num_sink_blocks,
                local_first_block),
        initial_outputs=initial_outputs,
        grid=grid.shape,
        in_specs=[
            q_spec,
            q_spec,
            pl.BlockSpec((None, None, block_q), lambda i, h, b: (b, h, grid.q_block(i))),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, padded_kv_len), lambda i, h, b: (b, h // grid.group, 0)),
            pl.BlockSpec((None, None, padded_kv_len), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((q_heads,), lambda i, h, b: (0,)),
            pl.BlockSpec((num_q_blocks + 1,), lambda i, h, b: (0,)),
            bounds_spec,
            bounds_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_slots), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((None, None, num_q_blocks), lambda i, h, b: (b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, q_heads, num_slots), index_dtype),
            jax.ShapeDtypeStruct((batch, q_heads, num_q_blocks), jnp.int32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sale_select_blocks",
    )


# The selection pass in three launches, for an estimate kernel of another lowering (`mosaic_estimate`): the rows'
# thresholds, then the estimate's hit flags (by the caller), then their compaction into the kept-block lists.

COMPACTION_CHUNK = 128  # flags read per step of the compaction; the flag rows must be a multiple of it


def _threshold_kernel(q_ref, q_scale_ref, k_smooth_ref, tau_ref, row_offsets_ref, num_sink_blocks_ref,
                      local_first_block_ref, threshold_ref, *, q_len, kv_len, block_q, block_k, scale, num_q_blocks):
    q_block = num_q_blocks - 1 - pl.program_id(0)
    regions = _Regions(q_block, row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, q_len=q_len,
                       kv_len=kv_len, block_q=block_q)
    threshold_ref[...], _ = _row_thresholds(q_ref[...], q_scale_ref[...], k_smooth_ref, tau_ref[pl.program_id(1)],
                                            regions, kv_len=kv_len, block_k=block_k, scale=scale)


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_k", "scale", "num_warps",
                                             "num_stages", "interpret"))
def row_thresholds(q, q_scale, k_smooth, tau, row_offsets, num_sink_blocks, local_first_block, *, q_len: int,
                   kv_len: int, block_q: int, block_k: int, scale: float, num_warps: int = 4, num_stages: int = 2,
                   interpret: bool = False, initial_outputs=None):
    """Each query row's threshold on the low-bit estimate, f32 `[B, Hq, T_pad]`: key `j` hits row `i` iff
    `k_scale_j * dot(q_codes_i, k_codes_j) + column_bias_j / q_scale_i - threshold_i > 0` (what `select_blocks`
    tests; +inf on padding rows, -1e30 for heads with `tau <= 0`). Shapes and region bounds as in
    `select_blocks`."""
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len, kv_heads = k_smooth.shape[1], k_smooth.shape[2]
    num_q_blocks = padded_q_len // block_q
    grid = QBlockGrid(num_q_blocks, q_heads, kv_heads, batch)
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, h, b: (b, h, grid.q_block(i)))
    kernel = functools.partial(_threshold_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                               scale=scale, num_q_blocks=num_q_blocks)
    bounds_spec = pl.BlockSpec((num_q_blocks,), lambda i, h, b: (0,))
    (thresholds,) = pallas_call_with_initial_outputs(
        kernel,
        inputs=(q, q_scale, k_smooth, tau, row_offsets, num_sink_blocks, local_first_block),
        initial_outputs=initial_outputs,
        grid=grid.shape,
        in_specs=[grid.q_rows_spec(block_q, head_dim), row_spec, grid.kv_spec(padded_kv_len, head_dim),
                  pl.BlockSpec((q_heads,), lambda i, h, b: (0,)),
                  pl.BlockSpec((num_q_blocks + 1,), lambda i, h, b: (0,)), bounds_spec, bounds_spec],
        out_specs=[row_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sale_row_thresholds",
    )
    return thresholds


def _compaction_kernel(hits_ref, row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, indices_ref,
                       counts_ref, *, q_len, kv_len, block_q, max_sink_blocks, max_local_blocks, num_q_blocks):
    q_block = num_q_blocks - 1 - pl.program_id(0)
    regions = _Regions(q_block, row_offsets_ref, num_sink_blocks_ref, local_first_block_ref, q_len=q_len,
                       kv_len=kv_len, block_q=block_q)
    writer = _ListWriter(indices_ref, row_offsets_ref[q_block], regions, max_sink_blocks=max_sink_blocks,
                         max_local_blocks=max_local_blocks)
    count = writer.sink()
    first_middle, end_middle = regions.num_sink, regions.local_start
    # Chunks aligned to COMPACTION_CHUNK, so every read stays inside the (padded) row of flags.
    first_chunk = first_middle // COMPACTION_CHUNK

    def chunk_body(chunk, count):
        start = (first_chunk + chunk) * COMPACTION_CHUNK
        ids = start + jnp.arange(COMPACTION_CHUNK)
        in_middle = (ids >= first_middle) & (ids < end_middle)
        block_hit = jnp.where(in_middle & (hits_ref[pl.ds(start, COMPACTION_CHUNK)] > 0), 1, 0).astype(jnp.int32)
        return writer.middle_hits(count, start, block_hit)

    num_chunks = jnp.where(end_middle > first_middle, pl.cdiv(end_middle, COMPACTION_CHUNK) - first_chunk, 0)
    count = jax.lax.fori_loop(0, num_chunks, chunk_body, count)
    counts_ref[q_block] = writer.local_and_tail(count)


@functools.partial(jax.jit, static_argnames=("num_slots", "q_len", "kv_len", "block_q", "max_sink_blocks",
                                             "max_local_blocks", "index_dtype", "interpret"))
def compact_hits(hits, row_offsets, num_sink_blocks, local_first_block, *, num_slots: int, q_len: int, kv_len: int,
                 block_q: int, max_sink_blocks: int, max_local_blocks: int, index_dtype=jnp.int16,
                 interpret: bool = False, initial_outputs=None):
    """The kept-block lists of `select_blocks` from per-block hit flags `hits [B, Hq, nQ, nK_pad]` (nonzero = a
    middle block some row's estimate selects; flags outside each q block's middle region are ignored; nK_pad a
    multiple of COMPACTION_CHUNK): sink blocks, middle hits and local blocks, packed as `select_blocks` packs them.
    Region bounds as in `select_blocks`. Returns `indices [B, Hq, num_slots]` and `counts [B, Hq, nQ]`."""
    batch, q_heads, num_q_blocks, padded_k_blocks = hits.shape
    if padded_k_blocks % COMPACTION_CHUNK:
        raise ValueError(f"hits rows ({padded_k_blocks} flags) must be padded to a multiple of {COMPACTION_CHUNK}")
    grid = QBlockGrid(num_q_blocks, q_heads, q_heads, batch)
    kernel = functools.partial(
        _compaction_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, max_sink_blocks=max_sink_blocks,
        max_local_blocks=max_local_blocks, num_q_blocks=num_q_blocks)
    bounds_spec = pl.BlockSpec((num_q_blocks,), lambda i, h, b: (0,))
    return pallas_call_with_initial_outputs(
        kernel,
        inputs=(hits, row_offsets, num_sink_blocks, local_first_block),
        initial_outputs=initial_outputs,
        grid=grid.shape,
        in_specs=[pl.BlockSpec((None, None, None, padded_k_blocks), lambda i, h, b: (b, h, grid.q_block(i), 0)),
                  pl.BlockSpec((num_q_blocks + 1,), lambda i, h, b: (0,)), bounds_spec, bounds_spec],
        out_specs=[pl.BlockSpec((None, None, num_slots), lambda i, h, b: (b, h, 0)),
                   pl.BlockSpec((None, None, num_q_blocks), lambda i, h, b: (b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((batch, q_heads, num_slots), index_dtype),
                   jax.ShapeDtypeStruct((batch, q_heads, num_q_blocks), jnp.int32)],
        interpret=interpret,
        name="sale_compact_hits",
    )
