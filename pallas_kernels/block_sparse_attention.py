"""Pass 3 kernel: flash attention of one (q block, q head, batch element) over its kept key blocks.

The program walks the q block's packed index list. The index of the next block is loaded one iteration ahead, so
its latency hides behind the current block's K/V loads and dots; the list's tail repeats the last kept index, so
that read never leaves the row. Only blocks that reach past the block's first query position get the causal mask.
K/V are read from the q head's kv head in place (GQA without repeating heads).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.launch import QBlockGrid, pallas_call_with_initial_outputs

_LOG2_E = math.log2(math.e)
_EXACT = jax.lax.Precision.HIGHEST  # IEEE f32 dots for f32 inputs (the default is TF32); no effect on bf16/fp16
# Finite stand-in for -inf in masked scores: keeps exp2(m_prev - m_next) defined when a row has seen no key yet.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _attention_kernel(q_ref, k_ref, v_ref, indices_ref, counts_ref, row_offsets_ref, out_ref, lse_ref, *,
                      q_len, kv_len, block_q, block_k, scale, num_q_blocks):
    q_block = num_q_blocks - 1 - pl.program_id(0)  # QBlockGrid's order: longest rows first
    rows_pos = q_block * block_q + jnp.arange(block_q) + (kv_len - q_len)
    first_pos = q_block * block_q + (kv_len - q_len)
    slot_base = row_offsets_ref[q_block]
    last_slot = row_offsets_ref[q_block + 1] - 1
    num_kept = counts_ref[q_block]
    q = q_ref[...]

    def attend(step, carry):
        acc, row_max, row_sum, block = carry
        next_block = indices_ref[jnp.minimum(slot_base + step + 1, last_slot)].astype(jnp.int32)
        key_start = block * block_k
        k = k_ref[pl.ds(key_start, block_k), :]
        v = v_ref[pl.ds(key_start, block_k), :]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_EXACT,
                                preferred_element_type=jnp.float32)
        s = s * (scale * _LOG2_E)

        def causal_mask(s):
            keys = key_start + jnp.arange(block_k)
            return jnp.where(keys[None, :] <= rows_pos[:, None], s, _MASKED)

        s = jax.lax.cond(key_start + block_k - 1 > first_pos, causal_mask, lambda s: s, s)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        correction = jnp.exp2(row_max - new_max)
        p = jnp.exp2(s - new_max[:, None])
        row_sum = row_sum * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=_EXACT, preferred_element_type=jnp.float32)
        return acc, new_max, row_sum, next_block

    head_dim = q.shape[-1]
    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32),
             jnp.zeros((block_q,), jnp.float32), indices_ref[slot_base].astype(jnp.int32))
    acc, row_max, row_sum, _ = jax.lax.fori_loop(0, num_kept, attend, carry)
    # A row that saw no kept key (hand-made layouts only) keeps the masked max: output 0, log-sum-exp -inf.
    saw_key = row_max > _MASKED / 2
    safe_sum = jnp.where(saw_key, row_sum, 1.0)
    out_ref[...] = jnp.where(saw_key[:, None], acc / safe_sum[:, None], 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(saw_key, (row_max + jnp.log2(safe_sum)) / _LOG2_E, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "block_q", "block_k", "scale", "num_warps",
                                             "num_stages", "interpret"))
def block_sparse_attention(q, k, v, indices, counts, row_offsets, *, q_len: int, kv_len: int, block_q: int,
                           block_k: int, scale: float, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False, initial_outputs=None):
    """Block-sparse causal attention over a packed layout; returns out `[B, T_pad, Hq, D]` (input dtype) and the
    natural log-sum-exp f32 `[B, Hq, T_pad]`.

    Shapes: q `[B, T_pad, Hq, D]` (T_pad a multiple of block_q), k, v `[B, S_pad, Hkv, D]` (S_pad a multiple of
    block_k), indices `[B, Hq, slots]`, counts int32 `[B, Hq, nQ]`, row_offsets int32 `[nQ + 1]`. Query row `i`
    sits at key position `i + kv_len - q_len`. `initial_outputs` (tests only) are buffers the outputs start from.
    """
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len, kv_heads = k.shape[1], k.shape[2]
    num_q_blocks = padded_q_len // block_q
    num_slots = indices.shape[-1]
    kernel = functools.partial(_attention_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                               scale=scale, num_q_blocks=num_q_blocks)

    grid = QBlockGrid(num_q_blocks, q_heads, kv_heads, batch)
    q_spec, kv_spec = grid.q_rows_spec(block_q, head_dim), grid.kv_spec(padded_kv_len, head_dim)
    return pallas_call_with_initial_outputs(
        kernel,
        inputs=(q, k, v, indices, counts, row_offsets),
        initial_outputs=initial_outputs,
        grid=grid.shape,
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, num_slots), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((None, None, num_q_blocks), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((num_q_blocks + 1,), lambda i, h, b: (0,)),
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, h, b: (b, h, grid.q_block(i)))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, q_heads, padded_q_len), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sale_block_sparse_attention",
    )
