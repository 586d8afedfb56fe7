"""The 2:4 format of the sparse wgmma's A operand: which channels `compress` keeps, that `decompress` undoes it,
and how `metadata_words` lays the position codes out over the warpgroup's registers. Whether the tensor cores read
them that way is the GPU's to say: tests/test_mosaic_estimate.py runs the sparse kernel natively against the
reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_wgmma


def test_compress_keeps_the_two_largest_of_every_four_channels(rng):
    codes = rng.integers(-7, 8, (3, 64, 2, 128)).astype(np.int8)
    codes[0, 0, 0, :4] = [5, -5, 5, 1]  # ties go to the lower channels
    values, positions = sparse_wgmma.compress(jnp.asarray(codes))
    assert values.shape == (3, 64, 2, 64) and values.dtype == jnp.int8
    assert positions.shape == (3, 64, 2, 32) and positions.dtype == jnp.uint8
    first, second = np.asarray(positions) & 3, np.asarray(positions) >> 2
    assert (first < second).all() and (second < 4).all()
    groups = codes.reshape(3, 64, 2, 32, 4).astype(np.int32)
    kept = np.take_along_axis(groups, np.stack([first, second], -1).astype(np.int64), axis=-1)
    np.testing.assert_array_equal(np.asarray(values).reshape(kept.shape), kept)
    dropped_max = np.sort(np.abs(groups), axis=-1)[..., :2].max(-1)
    assert (np.abs(kept).min(-1) >= dropped_max).all(), "a dropped channel is larger than a kept one"
    assert (first[0, 0, 0, 0], second[0, 0, 0, 0]) == (0, 1)


def test_prune_zeroes_all_but_the_two_largest_of_each_four():
    codes = jnp.asarray([[3, -5, 1, 0, 2, 2, -2, 1, 0, 0, 0, 7]], jnp.int8)
    # Ties go to the lower channel: 2, 2, -2 keeps the first two; 0, 0, 0, 7 keeps a zero and the 7.
    np.testing.assert_array_equal(np.asarray(sparse_wgmma.prune(codes)), [[3, -5, 0, 0, 2, 2, 0, 0, 0, 0, 0, 7]])


def test_decompress_restores_the_kept_channels_and_zeroes_the_rest(rng):
    codes = jnp.asarray(rng.integers(-7, 8, (2, 64, 3, 64)), jnp.float8_e4m3fn)
    dense = np.asarray(sparse_wgmma.decompress(*sparse_wgmma.compress(codes)).astype(jnp.float32))
    original = np.asarray(codes.astype(jnp.float32))
    assert ((dense == 0) | (dense == original)).all()
    assert (np.count_nonzero(dense.reshape(-1, 4), axis=-1) <= 2).all()
    # Kept values equal what they replaced, so the pruned code sums are a subset of the dense ones.
    assert np.abs(dense).sum() >= 0.5 * np.abs(original).sum()


def test_metadata_words_hold_each_row_groups_codes_once(rng):
    """Thread t's word for instruction i of row group m holds, nibble s, the code of row
    `64 m + 16 (t // 32) + (t % 32) // 4 + 8 (t % 2)` and group `16 i + 8 ((t // 2) % 2) + s`."""
    positions = rng.integers(0, 16, (2, 128, 64)).astype(np.uint8)  # [B, rows, D / 4], D = 256
    words = np.asarray(sparse_wgmma.metadata_words(jnp.asarray(positions))).view(np.uint32)
    assert words.shape == (2, 2, 4, 128)
    decoded = np.full(positions.shape, 255, np.int64)
    for b, m, i, t in np.ndindex(words.shape):
        for s in range(8):
            row = 64 * m + 16 * (t // 32) + (t % 32) // 4 + 8 * (t % 2)
            group = 16 * i + 8 * ((t // 2) % 2) + s
            assert decoded[b, row, group] == 255, "a code placed twice"
            decoded[b, row, group] = (int(words[b, m, i, t]) >> (4 * s)) & 0xF
    np.testing.assert_array_equal(decoded, positions)


@pytest.mark.parametrize("shape", [(60, 32), (64, 24)])
def test_metadata_words_refuse_partial_instructions(shape):
    with pytest.raises(ValueError, match="rows a multiple of 64 and D of 64"):
        sparse_wgmma.metadata_words(jnp.zeros(shape, jnp.uint8))


def test_compress_refuses_head_dims_off_the_groups():
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse_wgmma.compress(jnp.zeros((2, 6), jnp.int8))
