"""BlockLayout packing: round trips, ordering, padding, density, and the metadata budget at 128K tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from tests import oracle


def _random_grid(rng):
    kv_len = int(rng.integers(1, 300))
    q_len = int(rng.integers(1, kv_len + 1))
    return sale_jax.BlockGrid(q_len, kv_len, int(rng.choice([4, 8, 16])), int(rng.choice([4, 8, 32])))


@pytest.mark.parametrize("trial", range(4))
def test_mask_round_trip_and_packing(rng, trial):
    grid = _random_grid(rng)
    shape = (2, 3, grid.num_q_blocks, grid.num_k_blocks)
    mask = (rng.uniform(size=shape) < rng.uniform()) & grid.visible_mask
    layout = sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)
    np.testing.assert_array_equal(np.asarray(layout.to_mask()), mask)
    indices, counts = np.asarray(layout.indices), np.asarray(layout.counts)
    np.testing.assert_array_equal(counts, mask.sum(-1))
    for b, h, row in np.ndindex(2, 3, grid.num_q_blocks):
        slots = indices[b, h, grid.row_offsets[row]:grid.row_offsets[row + 1]]
        kept = np.flatnonzero(mask[b, h, row])
        np.testing.assert_array_equal(slots[:len(kept)], kept)  # ascending
        padding = kept[-1] if len(kept) else 0
        assert np.all(slots[len(kept):] == padding)
    visible = grid.visible_mask.sum() * 6
    np.testing.assert_allclose(float(layout.density()), mask.sum() / visible, rtol=1e-6)


def test_blocks_outside_the_causal_triangle_are_dropped(rng):
    grid = _random_grid(rng)
    everything = jnp.ones((1, 1, grid.num_q_blocks, grid.num_k_blocks), bool)
    layout = sale_jax.BlockLayout.from_mask(everything, grid)
    np.testing.assert_array_equal(np.asarray(layout.to_mask())[0, 0], grid.visible_mask)
    assert oracle.keeps_every_visible_block(layout)


def test_visible_counts_follow_query_positions():
    grid = sale_jax.BlockGrid(q_len=10, kv_len=100, block_q=4, block_k=8)
    # rows 0..9 sit at positions 90..99; q blocks end at positions 93, 97, 99.
    np.testing.assert_array_equal(grid.visible_counts, [93 // 8 + 1, 97 // 8 + 1, 99 // 8 + 1])


def test_layout_fits_half_the_bytes_of_q_at_128k():
    """Metadata budget: B=1, Hq=32, D=128, bf16, 128K tokens, paper blocks."""
    tokens, heads = 128 * 1024, 32
    grid = sale_jax.BlockGrid(tokens, tokens, 64, 32)
    layout_bytes = heads * (grid.num_slots * jnp.dtype(grid.index_dtype()).itemsize + grid.num_q_blocks * 4)
    q_bytes = tokens * heads * 128 * 2
    assert layout_bytes <= q_bytes / 2, (layout_bytes, q_bytes)


def test_index_dtype_widens_past_int16():
    assert sale_jax.BlockGrid(1024, 1024, 64, 32).index_dtype() == jnp.int16
    assert sale_jax.BlockGrid(64, 2**20 + 64, 64, 32).index_dtype() == jnp.int32
