"""Block selections SALE is compared against at equal density (pure jnp, on the same block grid).

All return bool `[B, Hq, nQ, nK]` masks over causally visible blocks and always keep the sink and local blocks
SALE keeps, so that the comparison is about how each method picks the middle blocks:

- `sink_local_mask`: nothing else (the StreamingLLM-style floor).
- `pooled_topk_mask`: per q block, the middle blocks with the highest mean-pooled score `mean(q_I) . mean(k_J)`
  (the MInference / SpargeAttn family of block estimates), keeping a fraction of each row's middle blocks.
- `xattention_mask`: XAttention's antidiagonal estimate. Q rows are regrouped by stride `S` in reverse order and K
  rows in order, so that one dot product of the regrouped rows sums an antidiagonal of an `S x S` tile; a softmax
  over the regrouped keys gives each tile's share of its strided row's attention, summed per block; each q block
  keeps its most massive middle blocks until their cumulative share reaches `threshold`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockRegions
from sale_jax.ops import grouped_scores, pad_axis


def _regions(grid: BlockGrid, config: SaleConfig) -> BlockRegions:
    return grid.regions(config.sink_tokens, config.local_tokens)


def sink_local_mask(batch: int, q_heads: int, grid: BlockGrid, config: SaleConfig) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(_regions(grid, config).always_kept),
                            (batch, q_heads, grid.num_q_blocks, grid.num_k_blocks))


def _keep_top_middle(scores: jax.Array, grid: BlockGrid, config: SaleConfig, keep: jax.Array) -> jax.Array:
    """Keeps, per row, the `keep[..., I]` middle blocks of highest `scores` ([B, Hq, nQ, nK]) plus the always-kept."""
    regions = _regions(grid, config)
    always, middle = jnp.asarray(regions.always_kept), jnp.asarray(regions.middle)
    ranked = jnp.where(middle, scores, -jnp.inf)
    order = jnp.argsort(-ranked, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    return always | (middle & (rank < keep[..., None]))


def pooled_topk_mask(q: jax.Array, k: jax.Array, grid: BlockGrid, config: SaleConfig,
                     keep_fraction: float) -> jax.Array:
    """Keeps `ceil(keep_fraction * middle blocks)` per q block, ranked by mean-pooled block scores."""
    batch, _, q_heads, head_dim = q.shape
    q_pool = pad_axis(q.astype(jnp.float32), 1, grid.block_q).reshape(batch, grid.num_q_blocks, grid.block_q,
                                                                      q_heads, head_dim)
    rows = jnp.minimum(grid.q_len - jnp.arange(grid.num_q_blocks) * grid.block_q, grid.block_q)
    q_mean = q_pool.sum(2) / rows[None, :, None, None]
    k_pool = pad_axis(k.astype(jnp.float32), 1, grid.block_k).reshape(batch, grid.num_k_blocks, grid.block_k,
                                                                      k.shape[2], head_dim)
    keys = jnp.minimum(grid.kv_len - jnp.arange(grid.num_k_blocks) * grid.block_k, grid.block_k)
    k_mean = k_pool.sum(2) / keys[None, :, None, None]
    scores = grouped_scores(q_mean, k_mean)  # [B, Hq, nQ, nK]
    middle_count = _regions(grid, config).middle.sum(-1)
    keep = jnp.ceil(keep_fraction * jnp.asarray(middle_count)).astype(jnp.int32)
    return _keep_top_middle(scores, grid, config, jnp.broadcast_to(keep, scores.shape[:3]))


def xattention_mask(q: jax.Array, k: jax.Array, grid: BlockGrid, config: SaleConfig, stride: int,
                    threshold: float) -> jax.Array:
    """XAttention's selection with antidiagonal stride `stride` and cumulative-mass `threshold` in (0, 1]."""
    bq, bk = grid.block_q, grid.block_k
    if bq % stride or bk % stride:
        raise ValueError(f"stride {stride} must divide block_q {bq} and block_k {bk}")
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q_rows = pad_axis(q.astype(jnp.float32), 1, bq)
    k_rows = pad_axis(k.astype(jnp.float32), 1, bk)
    # Reverse each group of `stride` query rows, then concatenate the group: row r of the result dotted with
    # key group c sums q[r*S + S-1-t] . k[c*S + t] over t, an antidiagonal of the S x S tile.
    q_groups = q_rows.reshape(batch, -1, stride, q_heads, head_dim)[:, :, ::-1]
    q_strided = q_groups.transpose(0, 1, 3, 2, 4).reshape(batch, -1, q_heads, stride * head_dim)
    k_strided = k_rows.reshape(batch, -1, stride, kv_heads, head_dim).transpose(0, 1, 3, 2, 4).reshape(
        batch, -1, kv_heads, stride * head_dim)
    scores = grouped_scores(q_strided, k_strided) * (head_dim ** -0.5 / stride)  # [B, Hq, T/S, S_pad/S]
    row_pos = (jnp.arange(q_strided.shape[1]) * stride + stride - 1) + grid.query_offset
    key_pos = jnp.arange(k_strided.shape[1]) * stride
    visible = (key_pos[None, :] <= row_pos[:, None]) & (key_pos[None, :] < grid.kv_len)
    share = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    share = share.reshape(batch, q_heads, grid.num_q_blocks, bq // stride, grid.num_k_blocks, bk // stride)
    mass = share.sum(axis=(3, 5))  # [B, Hq, nQ, nK]
    regions = _regions(grid, config)
    always, middle = jnp.asarray(regions.always_kept), jnp.asarray(regions.middle)
    # The always-kept blocks count toward the mass first; then middle blocks by decreasing mass.
    middle_mass = jnp.where(middle, mass, 0.0)
    needed = jnp.maximum(threshold * mass.sum(-1) - jnp.where(always, mass, 0.0).sum(-1), 0.0)
    order = jnp.argsort(-middle_mass, axis=-1)
    sorted_mass = jnp.take_along_axis(middle_mass, order, axis=-1)
    before = jnp.cumsum(sorted_mass, axis=-1) - sorted_mass  # mass of the blocks ranked above
    keep_sorted = (before < needed[..., None]) & (sorted_mass > 0)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(batch)[:, None, None, None], jnp.arange(q_heads)[None, :, None, None],
        jnp.arange(grid.num_q_blocks)[None, None, :, None], order].set(keep_sorted)
    return always | (middle & keep)
