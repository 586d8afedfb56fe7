"""The causal visibility of a q block's (row, key) pairs, shared by the reference passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sale_jax.layout import BlockGrid


def q_block_visibility(grid: BlockGrid, q_block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For query block `q_block` (traced): bool `[bq, S_pad]` of (row, key) pairs that are real and causally
    visible, and whether each row is real (not padding)."""
    rows = q_block * grid.block_q + jnp.arange(grid.block_q)
    row_is_real = rows < grid.q_len
    keys = jnp.arange(grid.num_k_blocks * grid.block_k)
    causal = keys[None, :] <= rows[:, None] + grid.query_offset
    visible = row_is_real[:, None] & (keys[None, :] < grid.kv_len) & causal
    return visible, row_is_real
