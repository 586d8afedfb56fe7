"""SALE's low-bit score estimate as a Pallas Mosaic GPU kernel (Hopper): one hit flag per (q block, key block).

For batch b, q head h (kv head h // G), q block i and key block j, with 4-bit codes (int8 or float8_e4m3fn, which
holds them exactly) and f32 factors,

    dots[r, c]   = sum_d q_codes[b, r, h, d] * k_codes[b, c, h // G, d]                       (exact)
    excess[r, c] = k_scale[b, h // G, c] * f32(dots[r, c])
                   + (column_bias[b, h, c] * row_factor[b, h, r] - row_threshold[b, h, r])
    hits[b, h, i, j] = max over the block's rows r and keys c of excess > 0,

for middle_start // block_k <= j < middle_end[i] // block_k, and 0 for every other key block. It is the hot loop of
the selection pass (`middle_tile` in `selection.py`); `sale_jax`'s `pallas_mosaic` backend runs it between the
Triton kernels `row_thresholds` and `compact_hits`.

Why Mosaic GPU rather than Triton: Triton issues the MMA and the f32 epilogue of a tile one after the other. Here
the MMA is Hopper's asynchronous `wgmma` reading both operands from shared memory, keys arrive by TMA a tile or
two ahead (`plgpu.emit_pipeline`), and each CTA is a single warpgroup with a modest shared-memory footprint, so that
several CTAs share an SM and one's epilogue (scale, threshold, reduce) runs while another's wgmma occupies the
tensor cores. With fp8 codes the accumulator is f32 already: no int-to-float conversion in the epilogue (measured
10-15% faster than int8 on the H200, at the same MMA rate).

Structure: grid (q block, q head, batch); a CTA loads its q rows once, walks the key tiles of `tile_k` keys that
hold middle blocks (a dynamic trip count read from `middle_end`), reduces each tile to one flag per `block_k` keys
and keeps the row of flags in shared memory, written out by one TMA copy at the end (so every output element is
written, zeros included). The reduction goes over each block's keys first (in-warp) and then its rows (across
warps).

tests/test_mosaic_estimate.py checks it against `estimate_hits_reference` in Mosaic GPU interpret mode and runs
Mosaic GPU's lowering for sm_90 on a CPU (everything short of ptxas), and natively on a GPU;
experiments/bench_mosaic_estimate.py checks and times it there (experiments/results/PERF_NOTES.md). The GPU may
fuse the multiply-adds, so a block whose best excess is within f32 rounding of 0 can flip relative to the
reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_MAX_ACC_ELEMENTS = 64 * 256  # int32 accumulator of one warpgroup: 128 registers a thread, room left for the epilogue
_MAX_HITS_SMEM_BYTES = 64 * 1024  # the CTA's row of flags stays in shared memory until the end
_EPILOGUE_KEYS = 128  # keys per epilogue chunk (64 and 32 measured 4% and 11% slower at 128K)
# int8 codes: s32 accumulators, converted for the f32 epilogue; float8_e4m3fn codes: f32 accumulators straight away
# (Hopper's fp8 wgmma runs at the int8 rate; sums of code products stay far below 2**13, exact either way).
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _check_inputs(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *, block_q,
                  block_k, middle_start):
    """Shapes and dtypes shared by the kernel and the reference; returns (B, T, Hq, D, S, Hkv)."""
    if q_codes.ndim != 4 or k_codes.ndim != 4:
        raise ValueError(f"q_codes and k_codes must be [B, T, Hq, D] and [B, S, Hkv, D], got {q_codes.shape} and "
                         f"{k_codes.shape}")
    if q_codes.dtype != k_codes.dtype or q_codes.dtype not in CODE_DTYPES:
        raise ValueError(f"q_codes and k_codes must both be int8 or both float8_e4m3fn (4-bit codes are exact in "
                         f"either), got {q_codes.dtype} and {k_codes.dtype}")
    batch, q_len, q_heads, head_dim = q_codes.shape
    kv_batch, kv_len, kv_heads, kv_dim = k_codes.shape
    if kv_batch != batch or kv_dim != head_dim:
        raise ValueError(f"k_codes {k_codes.shape} does not match q_codes {q_codes.shape} in batch or head_dim")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} must be a multiple of kv heads {kv_heads}")
    expected = {
        "row_factor": (row_factor, (batch, q_heads, q_len), jnp.float32),
        "row_threshold": (row_threshold, (batch, q_heads, q_len), jnp.float32),
        "k_scale": (k_scale, (batch, kv_heads, kv_len), jnp.float32),
        "column_bias": (column_bias, (batch, q_heads, kv_len), jnp.float32),
    }
    for name, (array, shape, dtype) in expected.items():
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{name} must be {jnp.dtype(dtype).name} {shape}, got {array.dtype} {array.shape}")
    if block_q <= 0 or q_len % block_q:
        raise ValueError(f"q length {q_len} must be a positive multiple of block_q {block_q} (pad it)")
    if block_k <= 0 or kv_len % block_k:
        raise ValueError(f"key length {kv_len} must be a positive multiple of block_k {block_k} (pad it)")
    if middle_end.shape != (q_len // block_q,) or middle_end.dtype != jnp.int32:
        raise ValueError(f"middle_end must be int32 [{q_len // block_q}] (one end per q block), got "
                         f"{middle_end.dtype} {middle_end.shape}")
    if not 0 <= middle_start <= kv_len:
        raise ValueError(f"middle_start {middle_start} must lie in [0, key length {kv_len}]")
    return batch, q_len, q_heads, head_dim, kv_len, kv_heads


def _block_range(middle_end, *, block_k, middle_start, num_k_blocks):
    """[first, end) key blocks that are estimated, per q block (end may be below first: nothing estimated)."""
    end = jnp.clip(middle_end // block_k, 0, num_k_blocks)
    return middle_start // block_k, end


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "middle_start"))
def estimate_margins_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *,
                               block_q: int, block_k: int, middle_start: int):
    """Best excess of each block, f32 [B, Hq, nQ, nK] (-inf where not estimated): the hit test is `margin > 0`.

    The float operations are the kernel's, in the kernel's order. One q block at a time, so long sequences fit.
    """
    batch, q_len, q_heads, head_dim, kv_len, kv_heads = _check_inputs(
        q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, block_q=block_q,
        block_k=block_k, middle_start=middle_start)
    group = q_heads // kv_heads
    num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k
    # Heads grouped as [Hkv, G] so each kv head is read in place, never repeated.
    q_blocks = q_codes.reshape(batch, num_q_blocks, block_q, kv_heads, group, head_dim).swapaxes(0, 1)
    row_factor = row_factor.reshape(batch, kv_heads, group, num_q_blocks, block_q)
    row_threshold = row_threshold.reshape(batch, kv_heads, group, num_q_blocks, block_q)
    column_bias = column_bias.reshape(batch, kv_heads, group, kv_len)

    def one_q_block(args):
        q, factor, threshold = args  # [B, rows, Hkv, G, D], [B, Hkv, G, rows] twice
        dots = jnp.einsum("brkgd,bskd->bkgrs", q.astype(jnp.int8), k_codes.astype(jnp.int8),
                          preferred_element_type=jnp.int32)
        excess = k_scale[:, :, None, None, :] * dots.astype(jnp.float32) + (
            column_bias[:, :, :, None, :] * factor[..., None] - threshold[..., None])
        return jnp.max(excess.reshape(*excess.shape[:4], num_k_blocks, block_k), axis=(3, 5))

    best = jax.lax.map(one_q_block, (q_blocks, jnp.moveaxis(row_factor, 3, 0), jnp.moveaxis(row_threshold, 3, 0)))
    best = jnp.moveaxis(best, 0, 3).reshape(batch, q_heads, num_q_blocks, num_k_blocks)
    first, end = _block_range(middle_end, block_k=block_k, middle_start=middle_start, num_k_blocks=num_k_blocks)
    block_ids = jnp.arange(num_k_blocks)
    estimated = (block_ids[None, :] >= first) & (block_ids[None, :] < end[:, None])
    return jnp.where(estimated, best, -jnp.inf)


def estimate_hits_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *,
                            block_q: int, block_k: int, middle_start: int):
    """Plain-jnp `hits` int32 [B, Hq, nQ, nK]: what `estimate_hits` computes."""
    margins = estimate_margins_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias,
                                         middle_end, block_q=block_q, block_k=block_k, middle_start=middle_start)
    return (margins > 0).astype(jnp.int32)


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


def _mma_transforms(head_dim: int):
    """Shared-memory layout wgmma reads int8 rows of `head_dim` bytes from: 8-row tiles, swizzled."""
    swizzle = plgpu.find_swizzle(head_dim * 8)
    return plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle)


def _estimate_kernel(q_gmem, k_gmem, row_factor_gmem, row_threshold_gmem, k_scale_gmem, bias_gmem, middle_end_gmem,
                     hits_gmem, q_smem, hits_smem, q_barrier, *, block_q, block_k, tile_k, middle_start, group,
                     max_concurrent_steps, packed_reduction, overlap_epilogue):
    num_q_blocks = q_gmem.shape[1] // block_q
    num_k_blocks, head_dim = k_gmem.shape[1] // block_k, k_gmem.shape[3]
    # Later q blocks see more keys: launch them first so the short ones fill the tail.
    q_block = num_q_blocks - 1 - jax.lax.axis_index("q_block")
    head, batch = jax.lax.axis_index("head"), jax.lax.axis_index("batch")
    rows = pl.ds(q_block * block_q, block_q)

    plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], q_smem, q_barrier)
    hits_smem[...] = jnp.zeros(hits_smem.shape, jnp.int32)
    plgpu.commit_smem()  # its warpgroup barrier orders every zero before any flag stored below
    # Straight from GMEM into the accumulator's row layout (once per CTA; `optimized` transfers are SMEM-only).
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    row_factor = plgpu.load(row_factor_gmem.at[batch, head, rows], layout=row_layout, optimized=False)
    row_threshold = plgpu.load(row_threshold_gmem.at[batch, head, rows], layout=row_layout, optimized=False)
    first_block, end_block = _block_range(middle_end_gmem[q_block], block_k=block_k, middle_start=middle_start,
                                          num_k_blocks=num_k_blocks)
    # Tiles are aligned to tile_k, so the first and last may hold sink or local blocks: masked below.
    first_tile = first_block * block_k // tile_k
    num_tiles = jnp.maximum(pl.cdiv(end_block * block_k, tile_k) - first_tile, 0)
    plgpu.barrier_wait(q_barrier)

    float_codes = q_smem.dtype != jnp.int8
    acc_dtype = jnp.float32 if float_codes else jnp.int32

    def flag_tile(dots, k_scale, bias, tile):
        """Stores the flags of key tile `tile` from its dots; `k_scale` and `bias` are its [tile_k] factors (refs
        or values)."""
        # The epilogue walks the tile in chunks so the per-key factors of only one chunk are live in registers
        # beside the accumulator.
        chunk = min(tile_k, _EPILOGUE_KEYS)
        for start in range(0, tile_k, chunk):
            keys = slice(start, start + chunk)
            chunk_dots = dots[:, keys] if float_codes else dots[:, keys].astype(jnp.float32)
            excess = k_scale[keys][None, :] * chunk_dots + (
                bias[keys][None, :] * row_factor[:, None] - row_threshold[:, None])
            # Each block's keys first, per row (in-warp shuffles), then its rows (across the warps): reducing the
            # rows of the whole chunk first measured 1.6x slower for the kernel.
            offsets = range(0, chunk, block_k)
            row_best = [jnp.max(excess[:, offset:offset + block_k], axis=1) for offset in offsets]
            if packed_reduction:
                block_hit = _packed_row_counts(row_best)
            else:
                block_hit = [jnp.max(best) > 0 for best in row_best]
            for offset, hit in zip(offsets, block_hit):
                block = (tile * tile_k + start + offset) // block_k
                hit = hit & (block >= first_block) & (block < end_block)
                hits_smem[block] = hit.astype(jnp.int32)

    def tile_body(indices, k_smem, k_scale_smem, bias_smem):
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.T)  # keys stay D-major in smem: 8-bit wgmma takes no transposes
            return acc_ref[...]

        dots = pl.run_scoped(mma, plgpu.ACC((block_q, tile_k), acc_dtype))
        flag_tile(dots, k_scale_smem, bias_smem, first_tile + indices[0])

    key_layout = plgpu.Layout.WGMMA.reduce(0)

    def overlapped_tile_body(indices, k_smem, k_scale_smem, bias_smem, previous):
        """Issues this tile's wgmma, then runs the previous tile's epilogue while the tensor cores work on it."""
        previous_dots, previous_scale, previous_bias, previous_tile, has_previous = previous
        k_scale = plgpu.load(k_scale_smem, layout=key_layout)
        bias = plgpu.load(bias_smem, layout=key_layout)

        def mma(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.T)
            pl.when(has_previous)(lambda: flag_tile(previous_dots, previous_scale, previous_bias, previous_tile))
            return acc_ref[...]

        dots = pl.run_scoped(mma, plgpu.ACC((block_q, tile_k), acc_dtype))
        return dots, k_scale, bias, first_tile + indices[0], jnp.bool_(True)

    key_tiles = lambda t: (first_tile + t,)
    pipeline = functools.partial(
        plgpu.emit_pipeline,
        grid=(num_tiles,),
        in_specs=[
            plgpu.BlockSpec((tile_k, head_dim), lambda t: (first_tile + t, 0), transforms=_mma_transforms(head_dim)),
            plgpu.BlockSpec((tile_k,), key_tiles),
            plgpu.BlockSpec((tile_k,), key_tiles),
        ],
        max_concurrent_steps=max_concurrent_steps,
    )
    operands = (k_gmem.at[batch, :, head // group], k_scale_gmem.at[batch, head // group], bias_gmem.at[batch, head])
    if overlap_epilogue:
        nothing_yet = (plgpu.layout_cast(jnp.zeros((block_q, tile_k), acc_dtype), plgpu.Layout.WGMMA),
                       plgpu.layout_cast(jnp.zeros((tile_k,), jnp.float32), key_layout),
                       plgpu.layout_cast(jnp.zeros((tile_k,), jnp.float32), key_layout),
                       first_tile, jnp.bool_(False))
        last_dots, last_scale, last_bias, last_tile, has_last = pipeline(
            overlapped_tile_body, init_carry=nothing_yet)(*operands)
        pl.when(has_last)(lambda: flag_tile(last_dots, last_scale, last_bias, last_tile))
    else:
        pipeline(tile_body)(*operands)

    plgpu.commit_smem()  # flags visible to the TMA engine
    plgpu.copy_smem_to_gmem(hits_smem.at[:num_k_blocks], hits_gmem.at[batch, head, q_block])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "tile_k", "middle_start", "max_concurrent_steps",
                                             "packed_reduction", "overlap_epilogue", "interpret"))
def estimate_hits(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *, block_q: int,
                  block_k: int, tile_k: int, middle_start: int, max_concurrent_steps: int = 2,
                  packed_reduction: bool = False, overlap_epilogue: bool = False, interpret=False):
    """Hit flags int32 [B, Hq, nQ, nK] (see the module docstring); `interpret` is False or a
    `plgpu.InterpretGPUParams` (Mosaic GPU interpret mode, for CPUs). `packed_reduction` combines the rows of four
    blocks in one cross-warp reduction (`_packed_row_counts`); `overlap_epilogue` issues each tile's wgmma before
    the previous tile's epilogue, so that they overlap within the warpgroup (both not yet timed on a GPU).

    Lengths must be padded by the caller: T to a multiple of `block_q`, S to a multiple of `tile_k`.
    """
    if block_q not in (64, 128):
        raise ValueError(f"block_q must be 64 or 128 (wgmma rows come in groups of 64), got {block_q}")
    if tile_k not in (64, 128, 256):
        raise ValueError(f"tile_k must be 64, 128 or 256 (wgmma N is at most 256), got {tile_k}")
    if block_k <= 0 or block_k % 8 or tile_k % block_k:
        raise ValueError(f"block_k {block_k} must be a multiple of 8 that divides tile_k {tile_k}")
    if block_q * tile_k > _MAX_ACC_ELEMENTS:
        raise ValueError(f"block_q * tile_k = {block_q * tile_k} exceeds {_MAX_ACC_ELEMENTS}: the int32 "
                         f"accumulator would not fit in registers (use block_q=64 or tile_k=128)")
    if max_concurrent_steps < 1:
        raise ValueError(f"max_concurrent_steps must be at least 1, got {max_concurrent_steps}")
    batch, q_len, q_heads, head_dim, kv_len, kv_heads = _check_inputs(
        q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, block_q=block_q,
        block_k=block_k, middle_start=middle_start)
    if kv_len % tile_k:
        raise ValueError(f"key length {kv_len} must be a multiple of tile_k {tile_k} (pad it)")
    if head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256 (swizzled int8 rows for wgmma), got {head_dim}")
    num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k
    if num_k_blocks % 4 or pl.cdiv(num_k_blocks, 128) * 128 * 4 > _MAX_HITS_SMEM_BYTES:
        raise ValueError(f"{num_k_blocks} key blocks: the int32 row of flags is copied out whole, so it must be a "
                         f"multiple of 16 bytes and fit in {_MAX_HITS_SMEM_BYTES} bytes of shared memory")

    kernel = functools.partial(
        _estimate_kernel, block_q=block_q, block_k=block_k, tile_k=tile_k, middle_start=middle_start,
        group=q_heads // kv_heads, max_concurrent_steps=max_concurrent_steps, packed_reduction=packed_reduction,
        overlap_epilogue=overlap_epilogue)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, q_heads, num_q_blocks, num_k_blocks), jnp.int32),
        scratch_types=[
            plgpu.SMEM((block_q, head_dim), q_codes.dtype, transforms=_mma_transforms(head_dim)),
            # A whole number of 128-flag rows: one zero per thread and register at the start.
            plgpu.SMEM((pl.cdiv(num_k_blocks, 128) * 128,), jnp.int32),
            plgpu.Barrier(num_barriers=1),
        ],
        grid=(num_q_blocks, q_heads, batch),
        grid_names=("q_block", "head", "batch"),
        interpret=interpret or None,
    )(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end)
