"""SALE's computation pass as a Pallas Mosaic GPU kernel (Hopper): block-sparse flash attention over kept key
blocks, with the same inputs and outputs as `block_sparse_attention.py` (the Triton kernel, the portable path).

A warpgroup owns 64 query rows (wgmma's M). Each step gathers `keys_per_step // block_k` kept blocks of K and V
into one shared-memory tile by TMA (one copy per block, `stages` steps in flight), so the tensor cores see
`keys_per_step`-key wgmmas however small `block_k` is:

    S = Q K^T (wgmma, f32)  ->  online softmax in registers  ->  O += P V (wgmma, P from registers).

Schedules: one warpgroup per CTA that issues its own copies (a 128-row q block runs as two CTAs reading the same
list; several CTAs share an SM), optionally with the next step's Q K^T issued before this step's softmax
(`overlap_softmax`); or FlashAttention-3's ping-pong (`consumers=2`): two consumer warpgroups take turns on the
tensor cores while a producer warpgroup loads their tiles (the halves of a 128-row q block share them; two
64-row q blocks each have their own). Exponentials use the
hardware's approximate `ex2` (`approx_math`), as FlashAttention and the Triton kernel do.

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


def _scores(q_smem, k_tile, keys_per_step, scale, after_issue=None):
    """S = Q K^T in log2 units; `after_issue` runs while the wgmma is in flight."""
    def mma(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.T)
        if after_issue is not None:
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


def _add_values(acc, p, v_tile, p_smem, *, in_place, before_issue=None):
    """acc + P V, with P from registers or through `p_smem` when given; `before_issue` runs just before the wgmma.

    `in_place` accumulates into acc's own registers (`run_state`, as FlashAttention-3 does: no second 64 x D
    accumulator); interpret mode lacks the primitive `run_state` turns wgmma into, so there the product goes to a
    fresh accumulator and is added."""
    p = p.astype(v_tile.dtype)
    if p_smem is not None:
        p_smem[...] = p
        plgpu.commit_smem()  # visible to the tensor cores' reads
        p = p_smem
    if before_issue is not None:
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


def _one_warpgroup_kernel(q_gmem, k_gmem, v_gmem, indices_gmem, counts_gmem, row_offsets_gmem, out_gmem, lse_gmem,
                          q_smem, k_smem, v_smem, lse_smem, q_barrier, k_barriers, v_barriers, *p_smem, q_len,
                          kv_len, block_q, block_k, keys_per_step, stages, scale, group, in_place, overlap_softmax):
    """One CTA, one warpgroup: 64 query rows; its own TMA copies `stages` steps ahead. With `overlap_softmax`, the
    next step's Q K^T runs on the tensor cores during this step's softmax (FlashAttention-3's intra-warpgroup
    pipelining)."""
    p_smem = p_smem[0] if p_smem else None
    q_slice = q_gmem.shape[1] // ROWS - 1 - jax.lax.axis_index("q_slice")  # longest rows first
    head, batch = jax.lax.axis_index("head"), jax.lax.axis_index("batch")
    k_rows, v_rows = k_gmem.at[batch, :, head // group], v_gmem.at[batch, :, head // group]
    first_row = q_slice * ROWS
    first_pos = first_row + (kv_len - q_len)
    kept = _kept_list(indices_gmem, counts_gmem, row_offsets_gmem, batch, head, first_row // block_q,
                      gather=keys_per_step // block_k, block_k=block_k)
    plgpu.copy_gmem_to_smem(q_gmem.at[batch, pl.ds(first_row, ROWS), head], q_smem, q_barrier.at[0])

    def fetch(step, blocks):
        slot = step % stages
        kept.fetch(blocks, k_rows, k_smem.at[slot], k_barriers.at[slot])
        kept.fetch(blocks, v_rows, v_smem.at[slot], v_barriers.at[slot])

    for step in range(stages):
        pl.when(step < kept.num_steps)(functools.partial(fetch, step, kept.step_blocks(step)))

    def refill(step, blocks):
        """After step `step`'s wgmmas are done (reading their accumulators waited for them), its slot takes step
        `step + stages`, whose blocks were loaded at the start of the step."""
        pl.when(step + stages < kept.num_steps)(functools.partial(fetch, step + stages, blocks))

    def attend(step, state, *, masked):
        slot = step % stages
        upcoming = kept.step_blocks(step + stages)
        plgpu.barrier_wait(k_barriers.at[slot])
        s = _scores(q_smem, k_smem.at[slot], keys_per_step, scale)
        if masked:
            s = _causal_mask(s, step, kept, first_pos)
        p, state = _softmax(s, state)
        plgpu.barrier_wait(v_barriers.at[slot])
        acc = _add_values(state.acc, p, v_smem.at[slot], p_smem, in_place=in_place)
        refill(step, upcoming)
        return state._replace(acc=acc)

    def attend_overlapped(step, carry, *, masked):
        state, s = carry  # this step's scores, computed during the previous step
        slot, next_slot = step % stages, (step + 1) % stages
        upcoming = kept.step_blocks(step + stages)
        if masked:
            s = _causal_mask(s, step, kept, first_pos)

        def overlapped(next_scores_ref):
            # After the last step this multiplies a stale tile (stages >= 2: never one being refilled); discarded.
            pl.when(step + 1 < kept.num_steps)(lambda: plgpu.barrier_wait(k_barriers.at[next_slot]))
            plgpu.wgmma(next_scores_ref, q_smem, k_smem.at[next_slot].T)
            p, new_state = _softmax(s, state)
            plgpu.barrier_wait(v_barriers.at[slot])
            acc = _add_values(new_state.acc, p, v_smem.at[slot], p_smem, in_place=in_place)  # waits for both
            return new_state._replace(acc=acc), next_scores_ref[...] * (scale * _LOG2_E)

        state, next_s = pl.run_scoped(overlapped, plgpu.ACC((ROWS, keys_per_step), jnp.float32))
        refill(step, upcoming)
        return state, next_s

    plgpu.barrier_wait(q_barrier.at[0])
    unmasked = kept.unmasked_steps(first_pos)
    state = _initial_state(q_smem.shape[-1])
    if overlap_softmax:
        pl.when(kept.num_steps > 0)(lambda: plgpu.barrier_wait(k_barriers.at[0]))
        carry = (state, _scores(q_smem, k_smem.at[0], keys_per_step, scale))
        carry = jax.lax.fori_loop(0, unmasked, functools.partial(attend_overlapped, masked=False), carry)
        state, _ = jax.lax.fori_loop(unmasked, kept.num_steps, functools.partial(attend_overlapped, masked=True),
                                     carry)
    else:
        state = jax.lax.fori_loop(0, unmasked, functools.partial(attend, masked=False), state)
        state = jax.lax.fori_loop(unmasked, kept.num_steps, functools.partial(attend, masked=True), state)
    _store_outputs(state, q_smem, lse_smem, out_gmem.at[batch, pl.ds(first_row, ROWS), head],
                   lse_gmem.at[batch, head, pl.ds(first_row, ROWS)])


def _ping_pong_kernel(q_gmem, k_gmem, v_gmem, indices_gmem, counts_gmem, row_offsets_gmem, out_gmem, lse_gmem,
                      q_smem, k_smem, v_smem, lse_smem, q_barriers, k_barriers, v_barriers, k_consumed, v_consumed,
                      schedule, *p_smem, q_len, kv_len, block_q, block_k, keys_per_step, stages, scale, group,
                      in_place):
    """Two consumer warpgroups of 64 rows each and a producer warpgroup that loads their K/V tiles; the consumers
    take turns on the tensor cores (FlashAttention-3's ping-pong), so one's softmax runs under the other's wgmmas.

    At block_q 128 a CTA is one q block: its halves share one list and one set of tiles. At block_q 64 a CTA is
    two neighbouring q blocks, each with its list and tiles (the second may be past the last q block: no work)."""
    num_q_blocks = q_gmem.shape[1] // block_q
    shared = block_q == 2 * ROWS
    group_index = jax.lax.axis_index("q_group")
    head, batch = jax.lax.axis_index("head"), jax.lax.axis_index("batch")
    warpgroup = jax.lax.axis_index("warpgroup")
    gather = keys_per_step // block_k

    def consumer_list(consumer):
        """(q block, kept list) of a consumer; a q block past the last one keeps nothing."""
        if shared:
            q_block = num_q_blocks - 1 - group_index  # longest rows first
            return q_block, _kept_list(indices_gmem, counts_gmem, row_offsets_gmem, batch, head, q_block,
                                       gather=gather, block_k=block_k)
        q_block = 2 * (pl.cdiv(num_q_blocks, 2) - 1 - group_index) + consumer
        kept = _kept_list(indices_gmem, counts_gmem, row_offsets_gmem, batch, head,
                          jnp.minimum(q_block, num_q_blocks - 1), gather=gather, block_k=block_k)
        return q_block, dataclasses.replace(kept, count=jnp.where(q_block < num_q_blocks, kept.count, 0))

    lists = [consumer_list(c)[1] for c in range(2)]
    most_steps = jnp.maximum(lists[0].num_steps, lists[1].num_steps)
    # Tiles, their barriers and their consumption barriers: one set, or one per consumer.
    def tile(ref, consumer, slot):
        return ref.at[slot] if shared else ref.at[consumer, slot]

    def barrier(ref, consumer, slot):
        return ref.at[slot] if shared else ref.at[consumer * stages + slot]

    @pl.when(warpgroup == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        k_rows, v_rows = k_gmem.at[batch, :, head // group], v_gmem.at[batch, :, head // group]

        def fetch(consumer, step):
            slot = step % stages
            blocks = lists[consumer].step_blocks(step)  # loaded while the slot is still in use
            for rows, tiles, ready, consumed in ((k_rows, k_smem, k_barriers, k_consumed),
                                                 (v_rows, v_smem, v_barriers, v_consumed)):
                pl.when(step >= stages)(lambda: plgpu.barrier_wait(barrier(consumed, consumer, slot)))
                lists[consumer].fetch(blocks, rows, tile(tiles, consumer, slot), barrier(ready, consumer, slot))

        @pl.loop(0, most_steps)
        def _(step):  # two lists: their steps interleaved, in the order the consumers take their turns
            for consumer in range(1 if shared else 2):
                pl.when(step < lists[consumer].num_steps)(functools.partial(fetch, consumer, step))

        # The consumptions of the last steps, which no fetch waited for: every phase of a barrier is observed by
        # each warpgroup that waits on it (what Mosaic GPU's interpret mode checks; free here, at the end).
        for consumer in range(1 if shared else 2):
            @pl.loop(jnp.maximum(lists[consumer].num_steps - stages, 0), lists[consumer].num_steps)
            def _(step, consumer=consumer):
                plgpu.barrier_wait(barrier(k_consumed, consumer, step % stages))
                plgpu.barrier_wait(barrier(v_consumed, consumer, step % stages))

    @pl.when(warpgroup < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_block, kept = consumer_list(warpgroup)
        first_row = q_block * block_q + (warpgroup * ROWS if shared else 0)
        first_pos = first_row + (kv_len - q_len)
        my_q, my_lse = q_smem.at[warpgroup], lse_smem.at[warpgroup]
        my_p = p_smem[0].at[warpgroup] if p_smem else None
        present = q_block < num_q_blocks
        rows = pl.ds(jnp.minimum(first_row, q_gmem.shape[1] - ROWS), ROWS)
        pl.when(present)(lambda: plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], my_q,
                                                         q_barriers.at[warpgroup]))

        def take_turn():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        def wait_for_the_tensor_cores(slot=None):
            plgpu.barrier_arrive(schedule)  # this softmax is done
            if slot is not None:
                plgpu.barrier_wait(barrier(v_barriers, warpgroup, slot))
            plgpu.barrier_wait(schedule)  # the other warpgroup has issued its wgmmas

        def attend(step, state, *, masked):
            slot = step % stages
            plgpu.barrier_wait(barrier(k_barriers, warpgroup, slot))
            s = _scores(my_q, tile(k_smem, warpgroup, slot), keys_per_step, scale, after_issue=take_turn)
            plgpu.barrier_arrive(barrier(k_consumed, warpgroup, slot))
            if masked:
                s = _causal_mask(s, step, kept, first_pos)
            p, state = _softmax(s, state)
            acc = _add_values(state.acc, p, tile(v_smem, warpgroup, slot), my_p, in_place=in_place,
                              before_issue=functools.partial(wait_for_the_tensor_cores, slot))
            plgpu.barrier_arrive(barrier(v_consumed, warpgroup, slot))
            return state._replace(acc=acc)

        pl.when(present)(lambda: plgpu.barrier_wait(q_barriers.at[warpgroup]))
        pl.when(warpgroup == 1)(take_turn)  # the second warpgroup starts half a step behind
        unmasked = kept.unmasked_steps(first_pos)
        state = jax.lax.fori_loop(0, unmasked, functools.partial(attend, masked=False),
                                  _initial_state(q_smem.shape[-1]))
        state = jax.lax.fori_loop(unmasked, kept.num_steps, functools.partial(attend, masked=True), state)
        if not shared:  # the turns of the other consumer's extra steps
            @pl.loop(kept.num_steps, most_steps)
            def _(step):
                take_turn()
                wait_for_the_tensor_cores()
        pl.when(warpgroup == 0)(take_turn)  # the first balances the second's extra turn
        pl.when(present)(lambda: _store_outputs(state, my_q, my_lse, out_gmem.at[batch, rows, head],
                                                lse_gmem.at[batch, head, rows]))


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_k", "scale", "keys_per_step",
                                             "stages", "consumers", "overlap_softmax", "p_in_smem", "interpret"))
def mosaic_block_sparse_attention(q, k, v, indices, counts, row_offsets, *, q_len: int, kv_len: int, block_q: int,
                                  block_k: int, scale: float, keys_per_step: int = 128, stages: int = 2,
                                  consumers: int = 1, overlap_softmax: bool = False, p_in_smem: bool = False,
                                  interpret=False):
    """`block_sparse_attention`'s contract on Hopper: out `[B, T_pad, Hq, D]` (input dtype) and the natural
    log-sum-exp f32 `[B, Hq, T_pad]`; `interpret` is False or a `plgpu.InterpretGPUParams`.

    `consumers`: 1, a warpgroup per 64 query rows that loads its own tiles; 2 (block_q 128 only), the two halves
    of a q block as consumer warpgroups of one CTA, sharing tiles a producer warpgroup loads, in turns on the
    tensor cores. `overlap_softmax` (one consumer, stages >= 2) issues each step's Q K^T before the previous
    step's softmax. `p_in_smem` stages the probabilities P through shared memory for the P V wgmma instead of
    passing them from registers; interpret mode models only shared-memory wgmma operands, so it always stages them.

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
    if consumers not in (1, 2) or (consumers == 2 and block_q not in (ROWS, 2 * ROWS)):
        raise ValueError(f"consumers must be 1, or 2 with block_q {ROWS} or {2 * ROWS} (a warpgroup per 64-row q "
                         f"block or half), got consumers={consumers} at block_q {block_q}")
    if overlap_softmax and (consumers != 1 or stages < 2):
        raise ValueError(f"overlap_softmax needs one consumer and stages >= 2 (the next step's tile is read while "
                         f"this step's is in use), got consumers={consumers}, stages={stages}")
    p_in_smem = p_in_smem or bool(interpret)
    # Two consumers of 64-row q blocks stream two lists into two sets of tiles; halves of a q block share one.
    tile_sets = consumers if block_q == ROWS else 1
    tile_bytes = 2 * keys_per_step * head_dim * q.dtype.itemsize * tile_sets  # K and V of one step
    # Per consumer: q (then the output), P, the log-sum-exp.
    other_bytes = consumers * (ROWS * (head_dim + keys_per_step * p_in_smem) * q.dtype.itemsize + ROWS * 4)
    if stages < 1 or stages * tile_bytes + other_bytes > _MAX_SMEM_BYTES:
        raise ValueError(f"stages must be at least 1 and keep stages * {tile_bytes} bytes of K/V tiles and "
                         f"{other_bytes} other bytes within {_MAX_SMEM_BYTES} bytes of shared memory, got {stages}")
    num_q_blocks = padded_q_len // block_q
    if counts.shape != (batch, q_heads, num_q_blocks) or row_offsets.shape != (num_q_blocks + 1,):
        raise ValueError(f"counts must be [B, Hq, nQ] = {(batch, q_heads, num_q_blocks)} and row_offsets [nQ + 1], "
                         f"got {counts.shape} and {row_offsets.shape}")
    if indices.ndim != 3 or indices.shape[:2] != (batch, q_heads):
        raise ValueError(f"indices must be [B, Hq, slots], got {indices.shape}")

    knobs = dict(q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k, keys_per_step=keys_per_step,
                 stages=stages, scale=scale, group=q_heads // kv_heads, in_place=not interpret)
    gather = keys_per_step // block_k
    per_set = (tile_sets,) if tile_sets > 1 else ()
    tiles = [plgpu.SMEM((*per_set, stages, keys_per_step, head_dim), q.dtype, transforms=_transforms())] * 2  # K, V
    # An arrival per gathered block.
    tile_barriers = [plgpu.Barrier(num_arrivals=gather, num_barriers=tile_sets * stages)] * 2
    per_consumer = (consumers,) if consumers > 1 else ()
    q_tile = plgpu.SMEM((*per_consumer, ROWS, head_dim), q.dtype, transforms=_transforms())
    lse_row = plgpu.SMEM((*per_consumer, ROWS), jnp.float32)
    p_tile = [plgpu.SMEM((*per_consumer, ROWS, keys_per_step), q.dtype, transforms=_transforms())] * p_in_smem
    if consumers == 1:
        body = functools.partial(_one_warpgroup_kernel, **knobs, overlap_softmax=overlap_softmax)
        scratch = [q_tile, *tiles, lse_row, plgpu.Barrier(num_barriers=1), *tile_barriers, *p_tile]
        launch = dict(grid=(padded_q_len // ROWS, q_heads, batch), grid_names=("q_slice", "head", "batch"))
    else:
        body = functools.partial(_ping_pong_kernel, **knobs)
        # A slot is free once every consumer of its tiles is done with it.
        consumed = [plgpu.Barrier(num_arrivals=consumers // tile_sets, num_barriers=tile_sets * stages)] * 2
        scratch = [q_tile, *tiles, lse_row, plgpu.Barrier(num_barriers=consumers), *tile_barriers, *consumed,
                   plgpu.Barrier(num_arrivals=consumers), *p_tile]  # the turns on the tensor cores
        q_groups = num_q_blocks if tile_sets == 1 else pl.cdiv(num_q_blocks, 2)
        launch = dict(grid=(q_groups, q_heads, batch), grid_names=("q_group", "head", "batch"),
                      num_threads=consumers + 1, thread_name="warpgroup")
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32)),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret or None,
        **launch,
    )(q, k, v, indices, counts.astype(jnp.int32), row_offsets.astype(jnp.int32))
