"""SALE's sink / middle / local regions: `BlockGrid.regions` against the spec's statement (the oracle), and every
backend's always-kept blocks against `BlockGrid.regions`.

A backend's always-kept blocks are what it keeps at a threshold no estimate reaches (tau 1e30: the middle region
is dropped whole); at a threshold every estimate passes (tau 1e-30) it keeps every visible block, so the middle it
estimates is exactly the visible blocks outside the sink and local ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from tests import oracle

INTERPRET = jax.default_backend() != "gpu"


@pytest.mark.parametrize("trial", range(6))
def test_regions_follow_the_spec(rng, trial):
    kv_len = int(rng.integers(1, 400))
    q_len = kv_len if trial % 2 else int(rng.integers(1, kv_len + 1))
    block_q, block_k = int(rng.choice([4, 16, 64])), int(rng.choice([4, 8, 32]))
    sink, local = int(rng.choice([0, 1, 5, 32, 1000])), int(rng.choice([1, 7, 128, 1000]))
    grid = sale_jax.BlockGrid(q_len, kv_len, block_q, block_k)
    regions = grid.regions(sink, local)
    visible, always = oracle.region_blocks(q_len, kv_len, block_q, block_k, sink, local)
    np.testing.assert_array_equal(regions.always_kept, always)
    np.testing.assert_array_equal(regions.middle, visible & ~always)
    # The bounds are ordered and the three regions tile each row's visible blocks.
    assert np.all(regions.num_sink_blocks <= regions.local_first_block)
    assert np.all(regions.local_first_block <= grid.visible_counts)
    k_blocks = np.arange(grid.num_k_blocks)[None, :]
    sink_blocks = k_blocks < regions.num_sink_blocks[:, None]
    local_blocks = (k_blocks >= regions.local_first_block[:, None]) & grid.visible_mask
    np.testing.assert_array_equal(sink_blocks | local_blocks, always)
    assert not np.any(sink_blocks & local_blocks)
    assert regions.max_sink_blocks == sink_blocks.sum(-1).max()
    assert regions.max_local_blocks == local_blocks.sum(-1).max()
    assert regions.sink_blocks * block_k >= min(sink, grid.num_k_blocks * block_k)


# (q_len, kv_len, block_q, block_k, sink_tokens, local_tokens): the defaults on an odd length; chunked prefill with
# no sink and the smallest local region; a local region wider than the sequence; a sink longer than the sequence;
# a chunk shorter than one q block.
GEOMETRIES = [
    (300, 300, 64, 32, 32, 128),
    (77, 517, 64, 16, 0, 1),
    (200, 460, 128, 32, 40, 1000),
    (130, 130, 64, 16, 600, 20),
    (5, 333, 128, 32, 16, 64),
]


@pytest.mark.parametrize("backend", ["reference", "triton", "mosaic_gpu"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"T{g[0]}_S{g[1]}_bq{g[2]}_bk{g[3]}_sink{g[4]}_local{g[5]}"
                                                      for g in GEOMETRIES])
def test_every_backend_keeps_the_grids_regions(rng, backend, geometry):
    q_len, kv_len, block_q, block_k, sink, local = geometry
    config = sale_jax.SaleConfig(block_q=block_q, block_k=block_k, sink_tokens=sink, local_tokens=local,
                                 backend=backend, interpret=INTERPRET and backend != "reference", dense_below=0)
    # Unit-variance rows: scores within a few units of each other, far inside the thresholds' 69-nat margins.
    q = jnp.asarray(rng.standard_normal((1, q_len, 2, 64)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, kv_len, 1, 64)), jnp.bfloat16)
    layout = sale_jax.select_blocks(q, k, jnp.asarray([1e30, 1e-30], jnp.float32), config)
    grid = layout.grid
    mask = np.asarray(layout.to_mask())
    np.testing.assert_array_equal(mask[0, 0], grid.regions(sink, local).always_kept)
    np.testing.assert_array_equal(mask[0, 1], grid.visible_mask)
