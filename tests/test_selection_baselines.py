"""The comparison selections: their knobs' limits, monotonicity, and XAttention's antidiagonal estimate."""

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from experiments.lib import selection_baselines
from sale_jax.reference.selection import selection_margins_reference
from tests import cases, oracle


def _setup(rng):
    case = cases.draw_case(rng, block_q=16, block_k=8)
    q, k, _ = cases.draw_structured_qkv(rng, case)
    grid = sale_jax.BlockGrid(case.q_len, case.kv_len, 16, 8)
    cfg = case.config
    _, always = oracle.region_blocks(case.q_len, case.kv_len, 16, 8, cfg.sink_tokens, cfg.local_tokens)
    return case, q, k, grid, always


def test_sink_local_is_the_always_kept_region(rng):
    case, _, _, grid, always = _setup(rng)
    mask = selection_baselines.sink_local_mask(case.batch, case.q_heads, grid, case.config)
    np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(always, mask.shape))


def test_pooled_topk_keeps_the_requested_count_and_grows_with_the_fraction(rng):
    case, q, k, grid, always = _setup(rng)
    middle = grid.visible_mask & ~always
    previous = None
    for fraction in (0.0, 0.3, 0.6, 1.0):
        mask = np.asarray(selection_baselines.pooled_topk_mask(q, k, grid, case.config, fraction))
        assert np.all(mask[..., always]) and not np.any(mask & ~grid.visible_mask)
        np.testing.assert_array_equal((mask & middle).sum(-1),
                                      np.broadcast_to(np.ceil(fraction * middle.sum(-1)), mask.shape[:3]))
        if previous is not None:
            assert not np.any(previous & ~mask)
        previous = mask


def test_xattention_antidiagonal_mass_and_threshold_limits(rng):
    case, q, k, grid, always = _setup(rng)
    low = np.asarray(selection_baselines.xattention_mask(q, k, grid, case.config, stride=4, threshold=0.0))
    np.testing.assert_array_equal(low, np.broadcast_to(always, low.shape))
    masks = [np.asarray(selection_baselines.xattention_mask(q, k, grid, case.config, 4, t)) for t in (0.3, 0.7, 0.95)]
    for looser, tighter in zip(masks, masks[1:]):
        assert not np.any(looser & ~tighter)
    full = np.asarray(selection_baselines.xattention_mask(q, k, grid, case.config, stride=4, threshold=1.0))
    assert full.sum() >= masks[-1].sum()
    with pytest.raises(ValueError, match="stride"):
        selection_baselines.xattention_mask(q, k, grid, case.config, stride=32, threshold=0.9)


def test_xattention_ranks_blocks_by_antidiagonal_sums():
    """One query group whose antidiagonal with one far key group is large: that block must be the first kept."""
    stride, head_dim = 4, 16
    q = np.zeros((1, 64, 1, head_dim))
    k = np.zeros((1, 64, 1, head_dim))
    rows = np.arange(48, 52)  # q group 12, keys group 2 (positions 8..11): antidiagonal pairs (51,8) ... (48,11)
    for t in range(stride):
        direction = np.eye(head_dim)[t]
        q[0, rows[stride - 1 - t], 0] = 6 * direction
        k[0, 8 + t, 0] = 6 * direction
    config = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=8, sink_tokens=0, local_tokens=1, backend="reference")
    grid = sale_jax.BlockGrid(64, 64, 16, 8)
    mask = np.asarray(selection_baselines.xattention_mask(jnp.asarray(q), jnp.asarray(k), grid, config, stride, 0.3))
    assert mask[0, 0, 3, 1]  # q block 3 (rows 48..63) keeps key block 1 (keys 8..15)
    assert mask[0, 0, 3].sum() == 3  # and otherwise only its two local blocks (keys 48..63)


def test_exact_estimator_matches_the_oracle(rng):
    case, q, k, grid, _ = _setup(rng)
    tau = cases.draw_tau(rng, case.q_heads)
    always, margins = selection_margins_reference(q, k, tau, case.config, estimator="exact")
    got = np.asarray(always | (margins > 0))
    cfg = case.config
    surely, maybe = oracle.selection(q, k, np.asarray(tau), bq=16, bk=8, sink=cfg.sink_tokens, local=cfg.local_tokens,
                                     granularity=cfg.quant_granularity, scale=case.scale, dtype_name="float32",
                                     exact_estimate=True)
    assert not np.any(surely & ~got) and not np.any(got & ~maybe)
    with pytest.raises(ValueError, match="estimator"):
        selection_margins_reference(q, k, tau, case.config, estimator="int2")
