"""Helpers shared by the reference passes: padding, grouped-query dots and the causal visibility of a q block."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sale_jax.layout import BlockGrid

_HIGHEST = jax.lax.Precision.HIGHEST


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` of `x` up to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """`q: [B, R, Hq, D]` . `k: [B, S, Hkv, D]` -> f32 `[B, Hq, R, S]`; q head `h` reads kv head `h // (Hq/Hkv)`."""
    batch, rows, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, rows, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("brkgd,bskd->bkgrs", grouped, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return scores.reshape(batch, q_heads, rows, k.shape[1])


def grouped_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """`p: [B, Hq, R, S]` . `v: [B, S, Hkv, D]` -> f32 `[B, R, Hq, D]`."""
    batch, q_heads, rows, _ = p.shape
    kv_heads = v.shape[2]
    grouped = p.reshape(batch, kv_heads, q_heads // kv_heads, rows, p.shape[-1])
    out = jnp.einsum("bkgrs,bskd->brkgd", grouped, v, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return out.reshape(batch, rows, q_heads, v.shape[-1])


def q_block_visibility(grid: BlockGrid, q_block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For query block `q_block` (traced): bool `[bq, S_pad]` of (row, key) pairs that are real and causally
    visible, and whether each row is real (not padding)."""
    rows = q_block * grid.block_q + jnp.arange(grid.block_q)
    row_is_real = rows < grid.q_len
    keys = jnp.arange(grid.num_k_blocks * grid.block_k)
    causal = keys[None, :] <= rows[:, None] + grid.query_offset
    visible = row_is_real[:, None] & (keys[None, :] < grid.kv_len) & causal
    return visible, row_is_real
