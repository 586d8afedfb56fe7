"""How good a block selection is, measured the same way by every accuracy study: density, per-row L1 and relative
L2 error of its attention output against attention over every visible block, and needle recall."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def scored_pairs(grid, config) -> tuple[int, int]:
    """Per head, the (query, key) pairs of the middle blocks (what an estimate scores) and of the sink and local
    blocks (what the exact statistics read)."""
    always = grid.regions(config.sink_tokens, config.local_tokens).always_kept
    rows_per_q_block = np.minimum(grid.q_len - np.arange(grid.num_q_blocks) * grid.block_q, grid.block_q)
    middle_pairs = int(((grid.visible_mask & ~always).sum(-1) * rows_per_q_block).sum() * grid.block_k)
    reference_pairs = int((always.sum(-1) * rows_per_q_block).sum() * grid.block_k)
    return middle_pairs, reference_pairs


def needles_kept(mask, needle_rows, needle_keys, config) -> np.ndarray:
    """bool `[B, Hq, N]`: whether each planted needle's (q block, k block) is kept in the block mask
    `[B, Hq, nQ, nK]`."""
    mask = np.asarray(mask)
    batch, heads = mask.shape[:2]
    return mask[np.arange(batch)[:, None, None], np.arange(heads)[None, :, None],
                np.asarray(needle_rows) // config.block_q, np.asarray(needle_keys) // config.block_k]


def layout_metrics(out, dense, layout, needle_rows, needle_keys, config) -> dict:
    """Overall and per head: density, per-row L1, relative L2 (of `out` against `dense`) and needle recall."""
    diff = jnp.abs(out.astype(jnp.float32) - dense.astype(jnp.float32))
    rows = out.shape[0] * out.shape[1]
    l1 = diff.sum(axis=(0, 1, 3)) / rows
    sq_err = jnp.square(diff).sum(axis=(0, 1, 3))
    sq_ref = jnp.square(dense.astype(jnp.float32)).sum(axis=(0, 1, 3))
    kept = needles_kept(layout.to_mask(), needle_rows, needle_keys, config)
    return {
        "density": float(layout.density()),
        "l1_per_row": float(l1.mean()),
        "relative_l2": float(jnp.sqrt(sq_err.sum() / sq_ref.sum())),
        "needle_recall": float(kept.mean()),
        "per_head": {"density": np.round(np.asarray(layout.density_per_head()), 4).tolist(),
                     "l1_per_row": np.round(np.asarray(l1), 5).tolist(),
                     "relative_l2": np.round(np.asarray(jnp.sqrt(sq_err / sq_ref)), 5).tolist(),
                     "needle_recall": kept.mean(axis=(0, 2)).tolist()},
    }
