"""SALE's computation pass as a Pallas Mosaic GPU kernel (Hopper): block-sparse flash attention over kept key
blocks, with the same inputs and outputs as `block_sparse_attention.py` (the Triton kernel, the portable path).

A CTA takes one 128-row q block. Each step gathers `keys_per_step // block_k` kept blocks of K and V
into one shared-memory tile by TMA (one copy per block, `stages` steps in flight), so the tensor cores see
`keys_per_step`-key wgmmas however small `block_k` is:

    S = Q K^T (wgmma, f32)  ->  online softmax in registers  ->  O += P V (wgmma, P from registers).

The schedule is FlashAttention-3's ping-pong: the q block's two 64-row halves are consumer warpgroups (wgmma's M
is 64) that take turns on the tensor cores, one's softmax under the other's wgmmas, while a producer warpgroup
loads the K/V tiles they share. The kernel is built for block_q 128 only: at 64 rows a CTA has too little work
between its barrier waits, and the Triton kernel runs block_q 64 (docs/tuning.md#mosaic-computation).
Exponentials use the hardware's approximate `ex2` (`approx_math`), as FlashAttention and the Triton kernel do.

Kept blocks come in ascending order, so only the steps at a row's end can reach past its first query position:
the leading steps run without the causal mask (a lower bound on how many, computed from the layout's row), the
rest with it and with the step's unused gather slots (past `count`) masked out.

tests/test_mosaic_sparse_attention.py checks it against the reference in Mosaic GPU interpret mode on a CPU and
natively on a GPU, and runs its lowering for sm_90 on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # query rows per consumer warpgroup: wgmma's M; keeps S (64 x keys) and O (64 x D) in registers
CONSUMERS = 2
BLOCK_Q = CONSUMERS * ROWS  # a CTA's q block
HEAD_DIMS = (64, 128)
KEYS_PER_STEP = (64, 128)  # S (64 x keys f32) and P share the registers with O; 256 keys would spill
# Of the 227 KB a CTA may hold on Hopper, what the tiles may take: Mosaic GPU adds barriers and alignment (2.6 KB
# more than the tiles at 128-key steps, three stages, head_dim 128, which then no longer fit).
_MAX_SMEM_BYTES = 224 * 1024
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma's 16-bit operands
_LOG2_E = math.log2(math.e)
# Finite stand-in for -inf in masked scores: keeps exp2(m_prev - m_next) defined when a row has seen no key yet.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _transforms():
    """Shared-memory layout wgmma reads rows of 16-bit elements from: 8 x 64 tiles, 128-byte swizzle."""
    return plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)


@dataclasses.dataclass(frozen=True)
class _KeptList:
    """One q block's kept key blocks as a kernel streams them: `gather` blocks per step into one K and one V tile."""
    indices_gmem: Any
    batch: Any
    head: Any
    slot_base: Any
    visible: Any  # the row's slots: its causally visible key blocks
    count: Any  # its kept blocks, the first `count` slots
    gather: int
    block_k: int

    @property
    def num_steps(self):
        return pl.cdiv(self.count, self.gather)

    def block(self, position):
        """The kept key block at `position`; past the list's end its last slot (a valid block, masked out)."""
        return self.indices_gmem[self.batch, self.head,
                                 self.slot_base + jnp.minimum(position, self.visible - 1)].astype(jnp.int32)

    def step_blocks(self, step):
        """The `gather` kept blocks of step `step`: loaded ahead of their copies, so the loads' latency hides
        behind the work in between (the next block's index prefetched, as in the Triton kernel)."""
        return [self.block(step * self.gather + j) for j in range(self.gather)]

    def fetch(self, blocks, source_gmem, tile_smem, barrier):
        """Copies `blocks` (a step's) of `source_gmem` ([S, D] of one kv head) into `tile_smem` (one arrival on
        `barrier` per block)."""
        for j, block in enumerate(blocks):
            plgpu.copy_gmem_to_smem(source_gmem.at[pl.ds(block * self.block_k, self.block_k)],
                                    tile_smem.at[pl.ds(j * self.block_k, self.block_k)], barrier)

    def unmasked_steps(self, first_pos):
        """Leading steps whose keys all precede `first_pos`: kept blocks at or past `(first_pos + 1) // block_k`
        may not, and SALE's layouts keep all of them (the local window), so at least `count - (visible -
        that)` leading blocks need no causal mask (fewer if a hand-made layout drops some: masking them is then
        merely redundant)."""
        first_full_end = (first_pos + 1) // self.block_k
        return jnp.maximum(self.count - (self.visible - first_full_end), 0) // self.gather


def _kept_list(indices_gmem, counts_gmem, row_offsets_gmem, batch, head, q_block, *, gather, block_k):
    slot_base = row_offsets_gmem[q_block]
    return _KeptList(indices_gmem, batch, head, slot_base, row_offsets_gmem[q_block + 1] - slot_base,
                     counts_gmem[batch, head, q_block], gather, block_k)


class _RowState(NamedTuple):
    """A slice's online softmax: output accumulator, running max (log2 units) and sum of exponentials."""
    acc: Any
    row_max: Any
    row_sum: Any


def _initial_state(head_dim):
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    return _RowState(plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA),
                     plgpu.layout_cast(jnp.full((ROWS,), _MASKED, jnp.float32), row_layout),
                     plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout))


def _scores(q_smem, k_tile, keys_per_step, scale, after_issue):
    """S = Q K^T in log2 units; `after_issue` runs while the wgmma is in flight."""
    def mma(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.T)
        after_issue()
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC((ROWS, keys_per_step), jnp.float32)) * (scale * _LOG2_E)


def _causal_mask(s, step, kept: _KeptList, first_pos):
    """Scores of keys after their row's position, or in gather slots past the list's end, set to _MASKED."""
    shape = s.shape
    rows_pos = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + first_pos
    columns = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    key_pos = jnp.zeros_like(columns)
    kept_key = jnp.zeros_like(columns, dtype=jnp.bool_)
    for j in range(kept.gather):
        in_block = (columns >= j * kept.block_k) & (columns < (j + 1) * kept.block_k)
        position = step * kept.gather + j
        key_pos = jnp.where(in_block, kept.block(position) * kept.block_k + columns - j * kept.block_k, key_pos)
        kept_key = jnp.where(in_block, position < kept.count, kept_key)
    return jnp.where(kept_key & (key_pos <= rows_pos), s, _MASKED)


def _softmax(s, state: _RowState):
    """The step's probabilities P (f32) and the state with its rows rescaled to the new max (P V not yet added)."""
    new_max = jnp.maximum(state.row_max, jnp.max(s, axis=1))
    correction = jnp.exp2(state.row_max - new_max)
    p = jnp.exp2(s - jax.lax.broadcast_in_dim(new_max, s.shape, [0]))
    row_sum = state.row_sum * correction + jnp.sum(p, axis=1)
    return p, _RowState(state.acc * jax.lax.broadcast_in_dim(correction, state.acc.shape, [0]), new_max, row_sum)


def _add_values(acc, p, v_tile, p_smem, *, in_place, before_issue):
    """acc + P V, with P from registers or through `p_smem` when given; `before_issue` runs just before the wgmma.

    `in_place` accumulates into acc's own registers (`run_state`, as FlashAttention-3 does: no second 64 x D
    accumulator); interpret mode lacks the primitive `run_state` turns wgmma into, so there the product goes to a
    fresh accumulator and is added."""
    p = p.astype(v_tile.dtype)
    if p_smem is not None:
        p_smem[...] = p
        plgpu.commit_smem()  # visible to the tensor cores' reads
        p = p_smem
    before_issue()

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, p, v_tile)

    if in_place:
        return pl.run_state(mma)(plgpu.ACC.init(acc))

    def product(acc_ref):
        mma(acc_ref)
        return acc_ref[...]

    return acc + pl.run_scoped(product, plgpu.ACC(acc.shape, jnp.float32))


def _store_outputs(state: _RowState, out_smem, lse_smem, out_gmem, lse_gmem):
    # A row that saw no kept key (hand-made layouts only) keeps the masked max: output 0, log-sum-exp -inf.
    saw_key = state.row_max > _MASKED / 2
    safe_sum = jnp.where(saw_key, state.row_sum, 1.0)
    out = state.acc / jax.lax.broadcast_in_dim(safe_sum, state.acc.shape, [0])
    out_smem[...] = jnp.where(jax.lax.broadcast_in_dim(saw_key, out.shape, [0]), out, 0.0).astype(out_smem.dtype)
    lse_smem[...] = jnp.where(saw_key, state.row_max / _LOG2_E + jnp.log(safe_sum), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem)
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
    plgpu.wait_smem_to_gmem(0)


def _ping_pong_kernel(q_gmem, k_gmem, v_gmem, indices_gmem, counts_gmem, row_offsets_gmem, out_gmem, lse_gmem,
                      q_smem, k_smem, v_smem, lse_smem, q_barriers, k_barriers, v_barriers, k_consumed, v_consumed,
                      schedule, *p_smem, q_len, kv_len, block_k, keys_per_step, stages, scale, group, in_place):
    """A CTA is one 128-row q block: its halves are two consumer warpgroups that share one kept list and the K/V
    tiles a producer warpgroup loads, and take turns on the tensor cores (FlashAttention-3's ping-pong), so one's
    softmax runs under the other's wgmmas."""
    num_q_blocks = q_gmem.shape[1] // BLOCK_Q
    q_block = num_q_blocks - 1 - jax.lax.axis_index("q_block")  # longest rows first
    head, batch = jax.lax.axis_index("head"), jax.lax.axis_index("batch")
    warpgroup = jax.lax.axis_index("warpgroup")
    kept = _kept_list(indices_gmem, counts_gmem, row_offsets_gmem, batch, head, q_block,
                      gather=keys_per_step // block_k, block_k=block_k)

    @pl.when(warpgroup == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        k_rows, v_rows = k_gmem.at[batch, :, head // group], v_gmem.at[batch, :, head // group]

        @pl.loop(0, kept.num_steps)
        def _(step):
            slot = step % stages
            blocks = kept.step_blocks(step)  # loaded while the slot is still in use
            for rows, tiles, ready, consumed in ((k_rows, k_smem, k_barriers, k_consumed),
                                                 (v_rows, v_smem, v_barriers, v_consumed)):
                pl.when(step >= stages)(lambda: plgpu.barrier_wait(consumed.at[slot]))
                kept.fetch(blocks, rows, tiles.at[slot], ready.at[slot])

        # The consumptions of the last steps, which no fetch waited for: every phase of a barrier is observed by
        # each warpgroup that waits on it (what Mosaic GPU's interpret mode checks; free here, at the end).
        @pl.loop(jnp.maximum(kept.num_steps - stages, 0), kept.num_steps)
        def _(step):
            plgpu.barrier_wait(k_consumed.at[step % stages])
            plgpu.barrier_wait(v_consumed.at[step % stages])

    @pl.when(warpgroup < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        first_row = q_block * BLOCK_Q + warpgroup * ROWS
        first_pos = first_row + (kv_len - q_len)
        my_q, my_lse = q_smem.at[warpgroup], lse_smem.at[warpgroup]
        my_p = p_smem[0].at[warpgroup] if p_smem else None
        rows = pl.ds(first_row, ROWS)
        plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], my_q, q_barriers.at[warpgroup])

        def take_turn():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        def wait_for_the_tensor_cores(slot):
            plgpu.barrier_arrive(schedule)  # this softmax is done
            plgpu.barrier_wait(v_barriers.at[slot])
            plgpu.barrier_wait(schedule)  # the other warpgroup has issued its wgmmas

        def attend(step, state, *, masked):
            slot = step % stages
            plgpu.barrier_wait(k_barriers.at[slot])
            s = _scores(my_q, k_smem.at[slot], keys_per_step, scale, after_issue=take_turn)
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                s = _causal_mask(s, step, kept, first_pos)
            p, state = _softmax(s, state)
            acc = _add_values(state.acc, p, v_smem.at[slot], my_p, in_place=in_place,
                              before_issue=functools.partial(wait_for_the_tensor_cores, slot))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return state._replace(acc=acc)

        plgpu.barrier_wait(q_barriers.at[warpgroup])
        pl.when(warpgroup == 1)(take_turn)  # the second warpgroup starts half a step behind
        unmasked = kept.unmasked_steps(first_pos)
        state = jax.lax.fori_loop(0, unmasked, functools.partial(attend, masked=False),
                                  _initial_state(q_smem.shape[-1]))
        state = jax.lax.fori_loop(unmasked, kept.num_steps, functools.partial(attend, masked=True), state)
        pl.when(warpgroup == 0)(take_turn)  # the first balances the second's extra turn
        _store_outputs(state, my_q, my_lse, out_gmem.at[batch, rows, head], lse_gmem.at[batch, head, rows])


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_k", "scale", "keys_per_step",
                                             "stages", "interpret"))
def mosaic_block_sparse_attention(q, k, v, indices, counts, row_offsets, *, q_len: int, kv_len: int, block_q: int,
                                  block_k: int, scale: float, keys_per_step: int = 128, stages: int = 2,
                                  interpret=False):
    """`block_sparse_attention`'s contract on Hopper, at block_q 128: out `[B, T_pad, Hq, D]` (input dtype) and the
    natural log-sum-exp f32 `[B, Hq, T_pad]`; `interpret` is False or a `plgpu.InterpretGPUParams`.

    Each step gathers `keys_per_step` keys of kept blocks; `stages` steps of K/V tiles are in flight. Natively P
    goes to the P V wgmma from registers; interpret mode models only shared-memory wgmma operands, so there P is
    staged through shared memory.

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
    if block_q != BLOCK_Q or padded_q_len % block_q:
        raise ValueError(f"block_q must be {BLOCK_Q} (two warpgroups of {ROWS} rows) and divide the padded q length "
                         f"{padded_q_len}, got block_q {block_q}")
    if block_k % 8 or keys_per_step % block_k or keys_per_step not in KEYS_PER_STEP or padded_kv_len % block_k:
        raise ValueError(f"keys_per_step {keys_per_step} must be one of {KEYS_PER_STEP} and a multiple of block_k "
                         f"{block_k}, itself a multiple of 8 that divides the padded key length {padded_kv_len}")
    p_in_smem = bool(interpret)
    tile_bytes = 2 * keys_per_step * head_dim * q.dtype.itemsize  # K and V of one step
    # Per consumer: q (then the output), P in interpret mode, the log-sum-exp.
    other_bytes = CONSUMERS * (ROWS * (head_dim + keys_per_step * p_in_smem) * q.dtype.itemsize + ROWS * 4)
    if stages < 1 or stages * tile_bytes + other_bytes > _MAX_SMEM_BYTES:
        raise ValueError(f"stages must be at least 1 and keep stages * {tile_bytes} bytes of K/V tiles and "
                         f"{other_bytes} other bytes within {_MAX_SMEM_BYTES} bytes of shared memory, got {stages}")
    num_q_blocks = padded_q_len // block_q
    if counts.shape != (batch, q_heads, num_q_blocks) or row_offsets.shape != (num_q_blocks + 1,):
        raise ValueError(f"counts must be [B, Hq, nQ] = {(batch, q_heads, num_q_blocks)} and row_offsets [nQ + 1], "
                         f"got {counts.shape} and {row_offsets.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (batch, q_heads):
        raise ValueError(f"indices must be [B, Hq, slots], got {indices.shape}")

    body = functools.partial(_ping_pong_kernel, q_len=q_len, kv_len=kv_len, block_k=block_k,
                             keys_per_step=keys_per_step, stages=stages, scale=scale, group=q_heads // kv_heads,
                             in_place=not interpret)
    tiles = [plgpu.SMEM((stages, keys_per_step, head_dim), q.dtype, transforms=_transforms())] * 2  # K, V
    tile_barriers = [plgpu.Barrier(num_arrivals=keys_per_step // block_k, num_barriers=stages)] * 2  # per block
    consumed = [plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages)] * 2  # a slot is free once both are done
    q_tile = plgpu.SMEM((CONSUMERS, ROWS, head_dim), q.dtype, transforms=_transforms())
    lse_row = plgpu.SMEM((CONSUMERS, ROWS), jnp.float32)
    p_tile = [plgpu.SMEM((CONSUMERS, ROWS, keys_per_step), q.dtype, transforms=_transforms())] * p_in_smem
    schedule = plgpu.Barrier(num_arrivals=CONSUMERS)  # the turns on the tensor cores
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32)),
        scratch_types=[q_tile, *tiles, lse_row, plgpu.Barrier(num_barriers=CONSUMERS), *tile_barriers, *consumed,
                       schedule, *p_tile],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret or None,
        grid=(num_q_blocks, q_heads, batch), grid_names=("q_block", "head", "batch"),
        num_threads=CONSUMERS + 1, thread_name="warpgroup",
    )(q, k, v, indices, counts.astype(jnp.int32), row_offsets.astype(jnp.int32))
