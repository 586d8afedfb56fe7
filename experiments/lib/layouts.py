"""Synthetic block layouts for timing the computation pass at a chosen density."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import sale_jax


def random_layout(seed: int, batch: int, heads: int, grid: sale_jax.BlockGrid, density: float) -> sale_jax.BlockLayout:
    """Each visible block kept with probability `density`, the diagonal block always (every row sees a key)."""
    rng = np.random.default_rng(seed)
    mask = rng.uniform(size=(batch, heads, grid.num_q_blocks, grid.num_k_blocks)) < density
    mask[:, :, np.arange(grid.num_q_blocks), grid.visible_counts - 1] = True
    return sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)
