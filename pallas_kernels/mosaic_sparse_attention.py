"""SALE's computation pass as a Pallas Mosaic GPU kernel (Hopper): block-sparse flash attention over kept key
blocks, with the same inputs and outputs as `block_sparse_attention.py` (the Triton kernel, the portable path).

One CTA is one warpgroup and 64 query rows (wgmma's rows; a 128-row q block runs as two CTAs that read the same
kept-block list). Each step gathers `keys_per_step // block_k` kept blocks of K and V into one shared-memory tile by
TMA (one copy per block, `stages` steps in flight), so the tensor cores see `keys_per_step`-key wgmmas however small
`block_k` is:

    S = Q K^T (wgmma, f32)  ->  online softmax in registers  ->  O += P V (wgmma, P from registers).

Kept blocks come in ascending order, so only the steps at a row's end can reach past its first query position:
the leading steps run without the causal mask (a lower bound on how many, computed from the layout's row), the
rest with it and with the step's unused gather slots (past `count`) masked out.

tests/test_mosaic_sparse_attention.py checks it against the reference in Mosaic GPU interpret mode on a CPU and
natively on a GPU, and runs its lowering for sm_90 on any machine.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # query rows per CTA: one warpgroup's wgmma M; keeps S (64 x keys) and O (64 x D) in registers
HEAD_DIMS = (64, 128)
KEYS_PER_STEP = (64, 128)  # S (64 x keys f32) and P share the registers with O; 256 keys would spill
_MAX_SMEM_BYTES = 226 * 1024  # of the 227 KB a CTA may hold on Hopper: the rest for barriers and alignment
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma's 16-bit operands
_LOG2_E = math.log2(math.e)
# Finite stand-in for -inf in masked scores: keeps exp2(m_prev - m_next) defined when a row has seen no key yet.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _transforms():
    """Shared-memory layout wgmma reads rows of 16-bit elements from: 8 x 64 tiles, 128-byte swizzle."""
    return plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)


def _attention_kernel(q_gmem, k_gmem, v_gmem, indices_gmem, counts_gmem, row_offsets_gmem, out_gmem, lse_gmem,
                      q_smem, k_smem, v_smem, lse_smem, q_barrier, k_barriers, v_barriers, *p_smem, q_len,
                      kv_len, block_q, block_k, keys_per_step, stages, scale, group):
    p_smem = p_smem[0] if p_smem else None
    gather = keys_per_step // block_k
    num_slices = q_gmem.shape[1] // ROWS
    q_slice = num_slices - 1 - jax.lax.axis_index("q_slice")  # longest rows first
    head, batch = jax.lax.axis_index("head"), jax.lax.axis_index("batch")
    kv_head = head // group
    q_block = q_slice * ROWS // block_q
    first_row = q_slice * ROWS
    first_pos = first_row + (kv_len - q_len)
    slot_base = row_offsets_gmem[q_block]
    last_slot = row_offsets_gmem[q_block + 1] - 1
    visible = last_slot - slot_base + 1
    count = counts_gmem[batch, head, q_block]
    num_steps = pl.cdiv(count, gather)

    plgpu.copy_gmem_to_smem(q_gmem.at[batch, pl.ds(first_row, ROWS), head], q_smem, q_barrier.at[0])

    def kept_block(position):
        """The kept key block at `position` of the row's list; past the list's end its last slot (a valid block,
        masked out by the caller)."""
        return indices_gmem[batch, head, slot_base + jnp.minimum(position, visible - 1)].astype(jnp.int32)

    def fetch(step):
        slot = step % stages
        for j in range(gather):
            keys = pl.ds(kept_block(step * gather + j) * block_k, block_k)
            rows = pl.ds(j * block_k, block_k)
            plgpu.copy_gmem_to_smem(k_gmem.at[batch, keys, kv_head], k_smem.at[slot, rows], k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(v_gmem.at[batch, keys, kv_head], v_smem.at[slot, rows], v_barriers.at[slot])

    for step in range(stages):
        pl.when(step < num_steps)(functools.partial(fetch, step))

    # Kept blocks at or past block `first_full_end` may reach past the slice's first query position; the row keeps
    # all of them in SALE's layouts (its local window), so at least `count - (visible - first_full_end)` leading
    # blocks need no causal mask (fewer if a hand-made layout drops some: masking them is then merely redundant).
    first_full_end = (first_pos + 1) // block_k
    unmasked_steps = jnp.maximum(count - (visible - first_full_end), 0) // gather

    head_dim = q_smem.shape[-1]
    rows_pos = plgpu.broadcasted_iota(jnp.int32, (ROWS, keys_per_step), 0, layout=plgpu.Layout.WGMMA) + first_pos
    columns = plgpu.broadcasted_iota(jnp.int32, (ROWS, keys_per_step), 1, layout=plgpu.Layout.WGMMA)

    def attend(step, carry, *, masked):
        acc, row_max, row_sum = carry
        slot = step % stages
        plgpu.barrier_wait(k_barriers.at[slot])

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, keys_per_step), jnp.float32)) * (scale * _LOG2_E)
        if masked:
            key_pos = jnp.zeros_like(columns)
            visible_key = jnp.zeros_like(columns, dtype=jnp.bool_)
            for j in range(gather):
                in_block = (columns >= j * block_k) & (columns < (j + 1) * block_k)
                position = step * gather + j
                key_pos = jnp.where(in_block, kept_block(position) * block_k + columns - j * block_k, key_pos)
                visible_key = jnp.where(in_block, position < count, visible_key)
            s = jnp.where(visible_key & (key_pos <= rows_pos), s, _MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        correction = jnp.exp2(row_max - new_max)
        p = jnp.exp2(s - jax.lax.broadcast_in_dim(new_max, s.shape, [0]))
        row_sum = row_sum * correction + jnp.sum(p, axis=1)
        p = p.astype(v_smem.dtype)
        if p_smem is not None:
            p_smem[...] = p
            plgpu.commit_smem()  # visible to the tensor cores' reads
            p = p_smem
        plgpu.barrier_wait(v_barriers.at[slot])

        def values(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
            return acc_ref[...]

        pv = pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
        # Both wgmmas of this step are done (reading their accumulators waited for them): refill the slot.
        pl.when(step + stages < num_steps)(functools.partial(fetch, step + stages))
        return acc * jax.lax.broadcast_in_dim(correction, acc.shape, [0]) + pv, new_max, row_sum

    carry = (plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((ROWS,), _MASKED, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
             plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
    plgpu.barrier_wait(q_barrier.at[0])
    carry = jax.lax.fori_loop(0, unmasked_steps, functools.partial(attend, masked=False), carry)
    acc, row_max, row_sum = jax.lax.fori_loop(unmasked_steps, num_steps, functools.partial(attend, masked=True),
                                              carry)

    # A row that saw no kept key (hand-made layouts only) keeps the masked max: output 0, log-sum-exp -inf.
    saw_key = row_max > _MASKED / 2
    safe_sum = jnp.where(saw_key, row_sum, 1.0)
    out = acc / jax.lax.broadcast_in_dim(safe_sum, acc.shape, [0])
    q_smem[...] = jnp.where(jax.lax.broadcast_in_dim(saw_key, acc.shape, [0]), out, 0.0).astype(q_smem.dtype)
    lse_smem[...] = jnp.where(saw_key, (row_max + jnp.log2(safe_sum)) / _LOG2_E, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, out_gmem.at[batch, pl.ds(first_row, ROWS), head])
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[batch, head, pl.ds(first_row, ROWS)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_k", "scale", "keys_per_step",
                                             "stages", "p_in_smem", "interpret"))
def mosaic_block_sparse_attention(q, k, v, indices, counts, row_offsets, *, q_len: int, kv_len: int, block_q: int,
                                  block_k: int, scale: float, keys_per_step: int = 128, stages: int = 2,
                                  p_in_smem: bool = False, interpret=False):
    """`block_sparse_attention`'s contract on Hopper: out `[B, T_pad, Hq, D]` (input dtype) and the natural
    log-sum-exp f32 `[B, Hq, T_pad]`; `interpret` is False or a `plgpu.InterpretGPUParams`.

    `p_in_smem` stages the probabilities P through shared memory for the P V wgmma instead of passing them from
    registers; interpret mode models only shared-memory wgmma operands, so it always stages them.

    Shapes: q `[B, T_pad, Hq, D]` (T_pad a multiple of block_q), k, v `[B, S_pad, Hkv, D]` (S_pad a multiple of
    block_k), indices `[B, Hq, slots]`, counts int32 `[B, Hq, nQ]`, row_offsets int32 `[nQ + 1]`. Query row `i`
    sits at key position `i + kv_len - q_len`.
    """
    batch, padded_q_len, q_heads, head_dim = q.shape
    kv_batch, padded_kv_len, kv_heads, kv_dim = k.shape
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a 16-bit float dtype {[d.name for d in DTYPES]}, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if head_dim not in HEAD_DIMS or (kv_batch, kv_dim) != (batch, head_dim) or v.shape != k.shape:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} and k, v must be [B, S, Hkv, D] like q; got q "
                         f"{q.shape}, k {k.shape}, v {v.shape}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} must be a multiple of kv heads {kv_heads}")
    if block_q % ROWS or padded_q_len % block_q:
        raise ValueError(f"block_q {block_q} must be a multiple of {ROWS} that divides the padded q length "
                         f"{padded_q_len}")
    if block_k % 8 or keys_per_step % block_k or keys_per_step not in KEYS_PER_STEP or padded_kv_len % block_k:
        raise ValueError(f"keys_per_step {keys_per_step} must be one of {KEYS_PER_STEP} and a multiple of block_k "
                         f"{block_k}, itself a multiple of 8 that divides the padded key length {padded_kv_len}")
    p_in_smem = p_in_smem or bool(interpret)
    tile_bytes = 2 * keys_per_step * head_dim * q.dtype.itemsize  # K and V of one step
    other_bytes = ROWS * (head_dim + keys_per_step * p_in_smem) * q.dtype.itemsize + ROWS * 4  # q, P, lse
    if stages < 1 or stages * tile_bytes + other_bytes > _MAX_SMEM_BYTES:
        raise ValueError(f"stages must be at least 1 and keep stages * {tile_bytes} bytes of K/V tiles and "
                         f"{other_bytes} other bytes within {_MAX_SMEM_BYTES} bytes of shared memory, got {stages}")
    num_q_blocks = padded_q_len // block_q
    if counts.shape != (batch, q_heads, num_q_blocks) or row_offsets.shape != (num_q_blocks + 1,):
        raise ValueError(f"counts must be [B, Hq, nQ] = {(batch, q_heads, num_q_blocks)} and row_offsets [nQ + 1], "
                         f"got {counts.shape} and {row_offsets.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (batch, q_heads):
        raise ValueError(f"indices must be [B, Hq, slots], got {indices.shape}")

    kernel = functools.partial(
        _attention_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
        keys_per_step=keys_per_step, stages=stages, scale=scale, group=q_heads // kv_heads)
    gather = keys_per_step // block_k
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=_transforms()),  # q, then the output
            plgpu.SMEM((stages, keys_per_step, head_dim), q.dtype, transforms=_transforms()),
            plgpu.SMEM((stages, keys_per_step, head_dim), q.dtype, transforms=_transforms()),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_arrivals=gather, num_barriers=stages),  # one arrival per gathered K block
            plgpu.Barrier(num_arrivals=gather, num_barriers=stages),
        ] + [plgpu.SMEM((ROWS, keys_per_step), q.dtype, transforms=_transforms())] * p_in_smem,
        grid=(padded_q_len // ROWS, q_heads, batch),
        grid_names=("q_slice", "head", "batch"),
        interpret=interpret or None,
    )(q, k, v, indices, counts.astype(jnp.int32), row_offsets.astype(jnp.int32))
