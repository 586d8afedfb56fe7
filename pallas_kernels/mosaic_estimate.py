"""SALE's low-bit score estimate as a Pallas Mosaic GPU kernel (Hopper): one hit flag per (q block, key block).

For batch b, q head h (kv head h // G), q block i and key block j, with 4-bit codes and f32 factors,

    dots[r, c]   = sum_d q_codes[b, r, h, d] * k_codes[b, c, h // G, d]                       (exact)
    excess[r, c] = k_scale[b, h // G, c] * dots[r, c]
                   + (column_bias[b, h, c] * row_factor[b, h, r] - row_threshold[b, h, r])
    hits[b, h, i, j] = max over the block's rows r and keys c of excess > 0,

for middle_start // block_k <= j < middle_end[h, i] // block_k, and 0 for every other key block (a head whose ends
are 0, a streaming head, is not estimated at all). It is the hot loop of the selection pass (`middle_tile` in
`selection.py`); `sale_jax`'s `mosaic_gpu` backend runs it between the Triton kernels `row_thresholds` and
`compact_hits`. This module holds the kernels and their launch; beside it, `mosaic_estimate_reference` (the inputs'
checks and the plain-jnp reference), `mosaic_estimate_operands` (the operands' layouts and the offset terms) and
`mosaic_estimate_inline` (the code below Pallas's array level).

How (the alternatives each choice was timed against are in docs/tuning.md#mosaic-estimate):
- The codes go to the tensor cores as float8_e4m3fn, which holds 4-bit codes exactly: Hopper's fp8 `wgmma` runs
  at the int8 rate into an f32 accumulator, whose code sums (|x| < 2**13) are exact.
- The offsets go to the tensor cores too. Since k_scale > 0, `excess > 0` is `dots + offset > 0` with
  `offset[r, c] = row_factor[r] * (column_bias[c] / k_scale[c]) - row_threshold[r] / k_scale[c]`, a rank-2
  product: a tf32 `wgmma` of per-row and per-key terms (`operands.offset_terms`, each factor split into tf32 halves so
  the sum keeps about 2**-20 of its size) starts every tile's accumulator, and the epilogue is a test of sign
  bits alone.
- The epilogue works below Pallas's array level, on the accumulator's registers (`inline.warp_or_hit_flags`):
  per thread the AND of each block's registers as bits (its sign bit is 1 only if every one is negative), one bit
  per block, one `redux.sync.or` per warp, and lane j of every warp stores block j's flag; no shuffles and no
  warpgroup barrier per tile. Interpret mode cannot run inline Mosaic GPU code, so there the array-level epilogue
  stands in: each block's keys reduced per row, then its rows across the warps, four blocks per cross-warp sum
  (`_packed_row_counts`).
- Keys arrive by TMA `max_concurrent_steps` tiles ahead (`plgpu.emit_pipeline`); each CTA is one warpgroup with a
  modest shared-memory footprint, so several CTAs share an SM and one's epilogue runs while another's wgmma
  occupies the tensor cores.
- `compute_warpgroups=2`: a 128-row q block's halves as two warpgroups taking turns on the tensor cores, fed by
  a TMA warpgroup, with tiles up to 256 keys (`_split_rows_kernel`); the caller picks it by key length.
- Both kernels run the same per-tile body (`_tile_flags`).
- With `q_positions` the q codes come 2:4-compressed (`SaleConfig.estimate="sparse_q"`) and the dots run as
  Hopper's sparse fp8 wgmma (`sparse_wgmma`, inline PTX: Pallas has no sparse wgmma) after the offsets' tf32 one;
  each thread reads its metadata register from shared memory per instruction. The wgmmas are issued and committed
  in one inline body (`inline.issue_sparse`) and waited for at the start of the warp-level epilogue.

Structure: grid (q block, group of `heads_per_cta` q heads, batch); a CTA loads its q rows and row terms once,
walks the key tiles of `tile_k` keys that hold middle blocks (a dynamic trip count read from `middle_end`, none
for a streaming head), reduces each tile to one flag per `block_k` keys and keeps a row of flags per q head in
shared memory, written out by one TMA copy per head at the end (so every output element is written, zeros
included). The q heads of a CTA share each key tile's codes, loaded once: the key tiles stream from L2, the estimate's bound where its dots are
2:4-sparse (docs/tuning.md#estimate-floor).

tests/test_mosaic_estimate.py checks it against `reference.estimate_hits_reference` in Mosaic GPU interpret mode
and runs Mosaic GPU's lowering for sm_90 on a CPU (everything short of ptxas), and natively on a GPU. The kernel's float
operations differ from the reference's (tf32 halves, the excess divided by k_scale), so a block whose best excess
is within f32 rounding of 0 can flip relative to the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_estimate_inline as inline
from pallas_kernels import mosaic_estimate_operands as operands
from pallas_kernels import mosaic_estimate_reference as reference
from pallas_kernels import sparse_wgmma

MAX_ACC_ELEMENTS = 64 * 256  # f32 accumulator of one warpgroup: 128 registers a thread, room left for the epilogue
_MAX_HITS_SMEM_BYTES = 64 * 1024  # the CTA's rows of flags stay in shared memory until the end
_TMA_BYTES = 16  # a TMA copy moves whole multiples of 16 bytes: the output's rows of flags are padded to them


_COUNT_BITS = 8  # a field holds how many of a block's rows hit: at most 128 < 2**8
_FIELDS_PER_WORD = 32 // _COUNT_BITS


def _packed_row_counts(row_best):
    """Per block, whether any row's best excess is > 0, from per-row maxima `row_best` (a list of [rows] vectors):
    each row's hit bits are packed into 8-bit fields of one int32 word per four blocks, so one cross-warp sum per
    word counts the hitting rows of four blocks at once (instead of one cross-warp max per block)."""
    hits = []
    for first in range(0, len(row_best), _FIELDS_PER_WORD):
        group = row_best[first:first + _FIELDS_PER_WORD]
        word = functools.reduce(jnp.add, [(best > 0).astype(jnp.int32) << (_COUNT_BITS * field)
                                          for field, best in enumerate(group)])
        total = jnp.sum(word)
        hits += [((total >> (_COUNT_BITS * field)) & ((1 << _COUNT_BITS) - 1)) > 0 for field in range(len(group))]
    return hits


def _tile_range(middle_end_gmem, head, q_block, *, num_q_blocks, block_k, tile_k, middle_start, num_k_blocks):
    """(first_block, end_block, first_tile, num_tiles) of a q block's estimated keys, from the ends flattened to
    `[Hq * nQ]`. Tiles are aligned to tile_k, so the first and last may hold sink or local blocks, which the
    kernels mask or clear."""
    first_block, end_block = reference.block_range(middle_end_gmem[head * num_q_blocks + q_block], block_k=block_k,
                                          middle_start=middle_start, num_k_blocks=num_k_blocks)
    first_tile = first_block * block_k // tile_k
    return first_block, end_block, first_tile, jnp.maximum(pl.cdiv(end_block * block_k, tile_k) - first_tile, 0)


def _clear_outside(hits_smem, first_block, end_block, first_tile, num_tiles, blocks_per_tile):
    """After the warp-level epilogues: the flags of the first and last tile's blocks outside [first_block,
    end_block) back to 0."""
    plgpu.commit_smem()  # every warp's flags stored before they are cleared
    for i in range(blocks_per_tile - 1):
        before, after = first_tile * blocks_per_tile + i, end_block + i

        @pl.when(before < first_block)
        def _():
            hits_smem[before] = 0

        @pl.when(after < (first_tile + num_tiles) * blocks_per_tile)
        def _():
            hits_smem[after] = 0


def _tile_flags(q_smem, row_terms_smem, k_smem, key_terms_smem, flags_smem, first_tile, step, *, rows, block_k,
                tile_k, warp_level, after_issue=None, block_range=None, q_metadata_smem=None):
    """The per-tile body of both kernels: `rows` q rows against key tile `first_tile + step`, its flags into
    `flags_smem` (one reference.FLAG_DTYPE per key block).

    The offsets (tf32) and the dots (fp8) go into one f32 accumulator whose sign is the excess's; `after_issue`
    runs while the wgmmas are in flight. Natively the warp-level epilogue ORs the tile's hits into the flags (the
    caller clears the blocks outside the estimated range afterwards); in interpret mode the array-level epilogue
    stores every block's flag, kept only inside `block_range = (first_block, end_block)` when one is given.

    With `q_metadata_smem` the q codes are 2:4-compressed (`sparse_wgmma`) and the dots run as sparse wgmmas
    (natively only)."""
    tile = first_tile + step
    blocks_per_tile = tile_k // block_k
    if q_metadata_smem is not None:
        excess_over_scale = inline.issue_sparse(rows=rows, tile_k=tile_k, head_dim=k_smem.shape[1])(
            row_terms_smem, key_terms_smem, q_smem, q_metadata_smem, k_smem)
        if after_issue is not None:
            after_issue()
        inline.warp_or_hit_flags(block_k=block_k, tile_k=tile_k, in_flight=True)(
            excess_over_scale, flags_smem.at[pl.ds(tile * blocks_per_tile, blocks_per_tile)])
        return

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, row_terms_smem, key_terms_smem.T)  # the offsets (tf32)
        plgpu.wgmma(acc_ref, q_smem, k_smem.T)  # + the dots (fp8); both operands K-major, as wgmma needs
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    excess_over_scale = pl.run_scoped(mma, plgpu.ACC((rows, tile_k), jnp.float32))  # excess's sign
    if warp_level:
        inline.warp_or_hit_flags(block_k=block_k, tile_k=tile_k)(
            excess_over_scale, flags_smem.at[pl.ds(tile * blocks_per_tile, blocks_per_tile)])
        return
    offsets = range(0, tile_k, block_k)
    row_best = [jnp.max(excess_over_scale[:, offset:offset + block_k], axis=1) for offset in offsets]
    for offset, hit in zip(offsets, _packed_row_counts(row_best)):
        block = (tile * tile_k + offset) // block_k
        if block_range is not None:
            first_block, end_block = block_range
            hit = hit & (block >= first_block) & (block < end_block)
        flags_smem[block] = hit.astype(flags_smem.dtype)


def _estimate_kernel(q_gmem, k_gmem, row_terms_gmem, key_terms_gmem, middle_end_gmem, q_metadata_gmem, hits_gmem,
                     q_smem, row_terms_smem, hits_smem, q_barriers, q_metadata_smem, *, block_q, block_k, tile_k,
                     middle_start, group, max_concurrent_steps, warp_level, heads_per_cta):
    """One CTA: q block `q_block` of `heads_per_cta` consecutive q heads (of one kv head) against the key tiles of
    their middle blocks, each tile's codes loaded once for all of them (the q metadata refs are None unless the q
    codes are 2:4-compressed). The heads' scratch rows are indexed by their place in the CTA's group."""
    num_q_blocks = q_gmem.shape[1] // block_q
    num_k_blocks, head_dim = k_gmem.shape[1] // block_k, k_gmem.shape[3]
    q_block = num_q_blocks - 1 - jax.lax.axis_index("q_block")  # longest rows first
    first_head, batch = jax.lax.axis_index("head_group") * heads_per_cta, jax.lax.axis_index("batch")
    rows = pl.ds(q_block * block_q, block_q)

    for i in range(heads_per_cta):
        head = first_head + i
        copies = [(q_gmem.at[batch, rows, head], q_smem.at[i]),
                  (row_terms_gmem.at[batch, head, rows], row_terms_smem.at[i])]
        if q_metadata_gmem is not None:
            row_groups = block_q // sparse_wgmma.ROWS
            copies.append((q_metadata_gmem.at[batch, head, pl.ds(q_block * row_groups, row_groups)],
                           q_metadata_smem.at[i]))
        for operand, (source, target) in enumerate(copies):  # a barrier per q head and operand
            plgpu.copy_gmem_to_smem(source, target, q_barriers.at[i * len(copies) + operand])
    hits_smem[...] = jnp.zeros(hits_smem.shape, hits_smem.dtype)
    plgpu.commit_smem()  # its warpgroup barrier orders every zero before any flag stored below
    tile_range = functools.partial(_tile_range, middle_end_gmem, q_block=q_block, num_q_blocks=num_q_blocks,
                                   block_k=block_k, tile_k=tile_k, middle_start=middle_start,
                                   num_k_blocks=num_k_blocks)
    ranges = [tile_range(first_head + i) for i in range(heads_per_cta)]  # the first tile is every head's
    first_tile = ranges[0][2]
    for barrier in range(q_barriers.shape[0]):
        plgpu.barrier_wait(q_barriers.at[barrier])

    def tile_body(indices, k_smem, *key_terms_smem):
        for i, (first_block, end_block, _, num_tiles) in enumerate(ranges):
            @pl.when(indices[0] < num_tiles)
            def _():
                _tile_flags(q_smem.at[i], row_terms_smem.at[i], k_smem, key_terms_smem[i], hits_smem.at[i],
                            first_tile, indices[0], rows=block_q, block_k=block_k, tile_k=tile_k,
                            warp_level=warp_level, block_range=(first_block, end_block),
                            q_metadata_smem=None if q_metadata_smem is None else q_metadata_smem.at[i])

    terms_spec = plgpu.BlockSpec((tile_k, operands.OFFSET_TERMS), lambda t: (first_tile + t, 0),
                                 transforms=operands.terms_transforms())
    plgpu.emit_pipeline(
        tile_body,
        grid=(inline.balanced(jnp.maximum, [num_tiles for *_, num_tiles in ranges]),),
        in_specs=[
            plgpu.BlockSpec((tile_k, head_dim), lambda t: (first_tile + t, 0),
                            transforms=operands.mma_transforms(head_dim)),
            *[terms_spec] * heads_per_cta,
        ],
        max_concurrent_steps=max_concurrent_steps,
    )(k_gmem.at[batch, :, first_head // group], *[key_terms_gmem.at[batch, first_head + i]
                                                   for i in range(heads_per_cta)])

    if warp_level:
        for i, (first_block, end_block, _, num_tiles) in enumerate(ranges):
            _clear_outside(hits_smem.at[i], first_block, end_block, first_tile, num_tiles, tile_k // block_k)
    plgpu.commit_smem()  # flags visible to the TMA engine
    for i in range(heads_per_cta):
        plgpu.copy_smem_to_gmem(hits_smem.at[i, :hits_gmem.shape[-1]], hits_gmem.at[batch, first_head + i, q_block])
    plgpu.wait_smem_to_gmem(0)


SPLIT_ROWS = 64  # rows of a q block per compute warpgroup in the split kernel (wgmma's M)


def _split_rows_kernel(q_gmem, k_gmem, row_terms_gmem, key_terms_gmem, middle_end_gmem, q_metadata_gmem, hits_gmem,
                       q_smem, row_terms_smem, hits_smem, q_barriers, schedule, done, q_metadata_smem, *, block_k,
                       tile_k, middle_start, group, max_concurrent_steps, warp_level, cluster_heads):
    """compute_warpgroups=2: a 128-row q block as two 64-row compute warpgroups that share each key tile, which a
    third warpgroup loads by TMA. Each accumulator is 64 x tile_k, so tiles can be twice as wide as one
    warpgroup's 128 rows allow; the two take turns issuing their wgmmas (FlashAttention-3's ping-pong), so one's
    epilogue runs under the other's.

    `cluster_heads` > 1: a cluster of that many CTAs, q heads of one kv head at the same q block, receives each key
    tile's codes by one TMA multicast, so the codes cross L2 once per cluster rather than once per q head. The
    cluster's CTAs walk the same tiles, the union of their heads' middle keys.

    Each warpgroup ORs its flags into its own row of `hits_smem` (no ordering between them); after the last tile
    the first combines both rows, keeps the blocks in [first_block, end_block) and copies the result out."""
    block_q = 2 * SPLIT_ROWS
    num_q_blocks = q_gmem.shape[1] // block_q
    num_k_blocks, head_dim = k_gmem.shape[1] // block_k, k_gmem.shape[3]
    q_block = num_q_blocks - 1 - jax.lax.axis_index("q_block")  # longest rows first
    batch, first_head = jax.lax.axis_index("batch"), jax.lax.axis_index("head_group") * cluster_heads
    head = first_head + (jax.lax.axis_index("cluster") if cluster_heads > 1 else 0)
    wg = jax.lax.axis_index("wg")
    tile_range = functools.partial(_tile_range, middle_end_gmem, q_block=q_block, num_q_blocks=num_q_blocks,
                                   block_k=block_k, tile_k=tile_k, middle_start=middle_start,
                                   num_k_blocks=num_k_blocks)
    first_block, end_block, first_tile, _ = tile_range(head)
    num_tiles = inline.balanced(jnp.maximum, [tile_range(first_head + i)[3] for i in range(cluster_heads)])
    def take_turn():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < 2)
    def _():
        rows = pl.ds(q_block * block_q + wg * SPLIT_ROWS, SPLIT_ROWS)
        plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], q_smem.at[wg], q_barriers.at[wg])
        plgpu.copy_gmem_to_smem(row_terms_gmem.at[batch, head, rows], row_terms_smem.at[wg], q_barriers.at[2 + wg])
        if q_metadata_gmem is not None:
            plgpu.copy_gmem_to_smem(q_metadata_gmem.at[batch, head, pl.ds(2 * q_block + wg, 1)],
                                    q_metadata_smem.at[wg], q_barriers.at[4 + wg])
        hits_smem[wg] = jnp.zeros(hits_smem.shape[1:], hits_smem.dtype)
        plgpu.commit_smem()  # its warpgroup barrier orders every zero before any flag stored below
        for operand in range(q_barriers.shape[0] // 2):  # this half's q codes, row terms and metadata
            plgpu.barrier_wait(q_barriers.at[2 * operand + wg])

    def compute_thread(run_pipeline):
        # The turns outside the loop go here, inside the pipeline's allocations: entering them is a barrier across
        # the whole CTA, which would deadlock with the second warpgroup waiting for the first's turn.
        pl.when(wg == 1)(take_turn)  # the second warpgroup starts half a step behind
        run_pipeline(())
        pl.when(wg == 0)(take_turn)  # the first balances the second's extra turn

    def tile_body(indices, k_smem, key_terms_smem, carry):
        # take_turn: the other warpgroup issues its wgmmas while this one waits for its own. The flags are masked
        # to [first_block, end_block) once both rows are combined.
        _tile_flags(q_smem.at[wg], row_terms_smem.at[wg], k_smem, key_terms_smem, hits_smem.at[wg], first_tile,
                    indices[0], rows=SPLIT_ROWS, block_k=block_k, tile_k=tile_k, warp_level=warp_level,
                    after_issue=take_turn,
                    q_metadata_smem=None if q_metadata_smem is None else q_metadata_smem.at[wg])
        return carry

    plgpu.emit_pipeline_warp_specialized(
        tile_body,
        grid=(num_tiles,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tile_k, head_dim), lambda t: (first_tile + t, 0),
                            transforms=operands.mma_transforms(head_dim),
                            collective_axes=("cluster",) if cluster_heads > 1 else None),
            plgpu.BlockSpec((tile_k, operands.OFFSET_TERMS), lambda t: (first_tile + t, 0),
                            transforms=operands.terms_transforms()),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=max_concurrent_steps,
        compute_context=compute_thread,
    )(k_gmem.at[batch, :, head // group], key_terms_gmem.at[batch, head])

    @pl.when(wg < 2)
    def _():
        plgpu.commit_smem()  # this warpgroup's flags visible to the other
        plgpu.barrier_arrive(done)
        plgpu.barrier_wait(done)

    @pl.when(wg == 0)
    def _():
        blocks = plgpu.broadcasted_iota(jnp.int32, hits_smem.shape[1:], 0, layout=plgpu.Layout.WG_STRIDED(
            hits_smem.shape[1:], vec_size=1))
        estimated = (blocks >= first_block) & (blocks < end_block)
        either = (hits_smem[0] | hits_smem[1]).astype(jnp.int32)  # 8-bit values take bitwise operations only
        hits_smem[0] = jnp.where(estimated, either, 0).astype(hits_smem.dtype)
        plgpu.commit_smem()  # flags visible to the TMA engine
        plgpu.copy_smem_to_gmem(hits_smem.at[0, :hits_gmem.shape[-1]], hits_gmem.at[batch, head, q_block])
        plgpu.wait_smem_to_gmem(0)


def _check_compressed(q_values, q_positions, k_codes):
    """The 2:4-compressed q codes' shapes; returns a stand-in with the dense codes' shape and dtype."""
    head_dim = k_codes.shape[-1]
    dense_shape = (*q_values.shape[:-1], head_dim)
    if (q_values.shape[-1] * 2 != head_dim or q_positions.shape != (*q_values.shape[:-1], head_dim // 4)
            or q_positions.dtype != jnp.uint8):
        raise ValueError(f"2:4-compressed q codes must be values [..., {head_dim // 2}] and uint8 positions "
                         f"[..., {head_dim // 4}] (head_dim {head_dim}), got {q_values.shape} and {q_positions.dtype} "
                         f"{q_positions.shape}")
    return jax.ShapeDtypeStruct(dense_shape, q_values.dtype)


# estimate_hits' launch knobs, static under jit.
STATIC_ARGNAMES = ("block_q", "block_k", "tile_k", "middle_start", "max_concurrent_steps", "compute_warpgroups",
                   "cluster_heads", "heads_per_cta", "interpret")


@functools.partial(jax.jit, static_argnames=STATIC_ARGNAMES)
def estimate_hits(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *, block_q: int,
                  block_k: int, tile_k: int, middle_start: int, max_concurrent_steps: int = 2,
                  compute_warpgroups: int = 1, cluster_heads: int = 1, heads_per_cta: int = 1, q_positions=None,
                  interpret=False):
    """Hit flags int8 [B, Hq, nQ, nK] (see the module docstring); codes int8 or float8_e4m3fn; `interpret` is
    False or a `plgpu.InterpretGPUParams` (Mosaic GPU interpret mode, for CPUs: the array-level epilogue stands in
    for the warp-level one, which is inline Mosaic GPU code interpret mode cannot run).

    `q_positions`: q_codes are 2:4-compressed (`sparse_wgmma.compress`: values [B, T, Hq, D / 2], these uint8
    positions [B, T, Hq, D / 4]) and the dots run as sparse wgmmas at twice the dense rate; the flags are those of
    the decompressed codes. Interpret mode estimates the decompressed codes.

    `compute_warpgroups`: 1, one warpgroup per CTA holds the whole q block's accumulator; 2 (block_q 128), the
    q block's halves as two warpgroups fed by a TMA warpgroup (`_split_rows_kernel`), tiles up to 256 keys.

    `cluster_heads` (with compute_warpgroups 2): CTAs of that many q heads of one kv head form a cluster that
    receives each key tile's codes by one TMA multicast; it must divide the q heads per kv head.

    `heads_per_cta` (with compute_warpgroups 1): each CTA estimates that many q heads of one kv head, loading each
    key tile's codes once for all of them; it must divide the q heads per kv head.

    Lengths must be padded by the caller: T to a multiple of `block_q`, S to a multiple of `tile_k`.
    """
    if block_q not in (64, 128):
        raise ValueError(f"block_q must be 64 or 128 (wgmma rows come in groups of 64), got {block_q}")
    if tile_k not in (64, 128, 256):
        raise ValueError(f"tile_k must be 64, 128 or 256 (wgmma N is at most 256), got {tile_k}")
    if block_k <= 0 or block_k % 8 or tile_k % block_k:
        raise ValueError(f"block_k {block_k} must be a multiple of 8 that divides tile_k {tile_k}")
    if compute_warpgroups not in (1, 2) or (compute_warpgroups == 2 and block_q != 2 * SPLIT_ROWS):
        raise ValueError(f"compute_warpgroups must be 1, or 2 at block_q {2 * SPLIT_ROWS}, got {compute_warpgroups} "
                         f"at block_q {block_q}")
    rows_per_warpgroup = block_q // compute_warpgroups
    if rows_per_warpgroup * tile_k > MAX_ACC_ELEMENTS:
        raise ValueError(f"{rows_per_warpgroup} rows x tile_k {tile_k} per warpgroup exceeds {MAX_ACC_ELEMENTS}: "
                         f"the f32 accumulator would not fit in registers (use block_q=64, tile_k=128 or "
                         f"compute_warpgroups=2)")
    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps must be at least 1, got {max_concurrent_steps}")
    if cluster_heads != 1 and compute_warpgroups != 2:
        raise ValueError(f"cluster_heads {cluster_heads} needs compute_warpgroups=2 (the TMA warpgroup's pipeline "
                         f"multicasts; the one-warpgroup kernel's does not)")
    if heads_per_cta != 1 and compute_warpgroups != 1:
        raise ValueError(f"heads_per_cta {heads_per_cta} needs compute_warpgroups=1 (the split-rows kernel shares "
                         f"key tiles across q heads by cluster_heads instead)")
    dense_q = q_codes if q_positions is None else _check_compressed(q_codes, q_positions, k_codes)
    if q_positions is not None and interpret:
        q_codes, q_positions = sparse_wgmma.decompress(q_codes, q_positions), None
    batch, q_len, q_heads, head_dim, kv_len, kv_heads = reference.check_inputs(
        dense_q, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, block_q=block_q,
        block_k=block_k, middle_start=middle_start)
    for name, heads in (("cluster_heads", cluster_heads), ("heads_per_cta", heads_per_cta)):
        if heads < 1 or (q_heads // kv_heads) % heads:
            raise ValueError(f"{name} {heads} must divide the q heads per kv head, {q_heads // kv_heads}: the "
                             f"heads that share key tiles share one kv head")
    if kv_len % tile_k:
        raise ValueError(f"key length {kv_len} must be a multiple of tile_k {tile_k} (pad it)")
    if head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256 (swizzled fp8 rows for wgmma), got {head_dim}")
    num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k
    # Zeroed by one vector store per thread of the warpgroup, so whole multiples of 256.
    padded_flags = pl.cdiv(num_k_blocks, 256) * 256
    output_flags = pl.cdiv(num_k_blocks, _TMA_BYTES) * _TMA_BYTES
    flag_rows = compute_warpgroups * heads_per_cta
    if flag_rows * padded_flags * reference.FLAG_DTYPE.itemsize > _MAX_HITS_SMEM_BYTES:
        raise ValueError(f"{num_k_blocks} key blocks: the flags (a row per compute warpgroup and q head, "
                         f"{flag_rows} rows) must fit in {_MAX_HITS_SMEM_BYTES} bytes of shared memory (split the "
                         f"keys into launches)")

    launch = dict(out_type=jax.ShapeDtypeStruct((batch, q_heads, num_q_blocks, output_flags), reference.FLAG_DTYPE),
                  interpret=interpret or None)
    fp8_codes = (q_codes.astype(jnp.float8_e4m3fn), k_codes.astype(jnp.float8_e4m3fn))
    row_terms, key_terms = operands.offset_terms(row_factor, row_threshold, k_scale, column_bias)
    knobs = dict(block_k=block_k, tile_k=tile_k, middle_start=middle_start, group=q_heads // kv_heads,
                 max_concurrent_steps=max_concurrent_steps, warp_level=not interpret)
    sparse = q_positions is not None
    q_width = head_dim // 2 if sparse else head_dim
    q_operands = dict(dtype=jnp.float8_e4m3fn, transforms=operands.mma_transforms(q_width))
    # One barrier per q operand: the codes, the row terms and, when sparse, the metadata.
    num_q_operands = 3 if sparse else 2
    metadata_words = (head_dim // sparse_wgmma.DENSE_K, sparse_wgmma.THREADS)
    if compute_warpgroups == 1:
        kernel = functools.partial(_estimate_kernel, block_q=block_q, **knobs, heads_per_cta=heads_per_cta)
        heads = (heads_per_cta, block_q)
        scratch = [plgpu.SMEM((*heads, q_width), **q_operands),
                   plgpu.SMEM((*heads, operands.OFFSET_TERMS), jnp.float32, transforms=operands.terms_transforms()),
                   plgpu.SMEM((heads_per_cta, padded_flags), reference.FLAG_DTYPE),
                   plgpu.Barrier(num_barriers=heads_per_cta * num_q_operands)]
        metadata_scratch = plgpu.SMEM((heads_per_cta, block_q // sparse_wgmma.ROWS, *metadata_words), jnp.int32)
        launch |= dict(grid=(num_q_blocks, q_heads // heads_per_cta, batch),
                       grid_names=("q_block", "head_group", "batch"))
    else:
        kernel = functools.partial(_split_rows_kernel, **knobs, cluster_heads=cluster_heads)
        halves = (2, SPLIT_ROWS)
        scratch = [plgpu.SMEM((*halves, q_width), **q_operands),
                   plgpu.SMEM((*halves, operands.OFFSET_TERMS), jnp.float32, transforms=operands.terms_transforms()),
                   plgpu.SMEM((2, padded_flags), reference.FLAG_DTYPE),
                   plgpu.Barrier(num_barriers=2 * num_q_operands),  # each half's q operands
                   plgpu.Barrier(num_arrivals=2),  # the turns on the tensor cores
                   plgpu.Barrier(num_arrivals=2)]  # both halves' flags stored
        metadata_scratch = plgpu.SMEM((2, 1, *metadata_words), jnp.int32)
        launch |= dict(grid=(num_q_blocks, batch, q_heads // cluster_heads), grid_names=("q_block", "batch",
                       "head_group"), num_threads=3, thread_name="wg")
        if cluster_heads > 1:  # the cluster multiplies the last grid axis: its CTAs are consecutive q heads
            launch |= dict(cluster=(cluster_heads,), cluster_names=("cluster",))
    inputs = [*fp8_codes, row_terms, key_terms, middle_end.reshape(-1)]
    if sparse:
        positions = jnp.moveaxis(q_positions, 2, 1)  # [B, Hq, T, D / 4]
        hits = plgpu.kernel(kernel, scratch_types=[*scratch, metadata_scratch], **launch)(
            *inputs, sparse_wgmma.metadata_words(positions))
    else:
        hits = plgpu.kernel(_without_metadata(kernel, len(inputs)), scratch_types=scratch, **launch)(*inputs)
    return hits[..., :num_k_blocks]


def _without_metadata(kernel, num_inputs: int):
    """`kernel` (whose refs are the inputs, the q metadata, the output, the scratch and the q metadata's scratch)
    called with dense q codes: both metadata refs None."""
    def dense_kernel(*refs):
        return kernel(*refs[:num_inputs], None, *refs[num_inputs:], None)
    return dense_kernel
