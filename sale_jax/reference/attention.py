"""Pass 3: exact attention over the kept blocks (docs/algorithm.md, section 6), one query block at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sale_jax.layout import BlockLayout
from sale_jax.ops import grouped_scores, grouped_values, pad_axis
from sale_jax.reference.common import q_block_visibility


def block_sparse_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout,
                                     scale: float) -> tuple[jax.Array, jax.Array]:
    """Softmax over the visible keys of kept blocks, times V. Operands in the input dtype, f32 accumulation.

    Returns the output `[B, T, Hq, D]` in the input dtype and the natural log-sum-exp of the scaled scores,
    f32 `[B, Hq, T]`. A row with no kept visible key (only possible with hand-made layouts) gets output 0 and
    log-sum-exp -inf.
    """
    grid = layout.grid
    batch, q_len, q_heads, head_dim = q.shape
    bq, bk = grid.block_q, grid.block_k
    q_rows = pad_axis(q, 1, bq)
    k_keys, v_keys = pad_axis(k, 1, bk), pad_axis(v, 1, bk)
    kept_blocks = layout.to_mask()  # [B, Hq, nQ, nK]

    def attend_q_block(q_block):
        visible, _ = q_block_visibility(grid, q_block)
        kept_keys = jnp.repeat(kept_blocks[:, :, q_block, :], bk, axis=-1)  # [B, Hq, S_pad]
        allowed = visible & kept_keys[:, :, None, :]
        q_tile = jax.lax.dynamic_slice_in_dim(q_rows, q_block * bq, bq, axis=1)
        scores = scale * grouped_scores(q_tile, k_keys)
        row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        weights = jnp.where(allowed, jnp.exp(scores - row_max[..., None]), 0.0)
        row_sum = jnp.sum(weights, axis=-1)
        out = grouped_values(weights.astype(q.dtype), v_keys)  # [B, bq, Hq, D]
        inv_sum = jnp.where(row_sum > 0, 1.0 / jnp.where(row_sum > 0, row_sum, 1.0), 0.0)
        out = out * inv_sum.transpose(0, 2, 1)[..., None]
        lse = jnp.where(row_sum > 0, row_max + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(attend_q_block, jnp.arange(grid.num_q_blocks))  # [nQ, B, bq, Hq, D], [nQ, B, Hq, bq]
    out = out.transpose(1, 0, 2, 3, 4).reshape(batch, -1, q_heads, head_dim)[:, :q_len]
    lse = lse.transpose(1, 2, 0, 3).reshape(batch, q_heads, -1)[..., :q_len]
    return out, lse
