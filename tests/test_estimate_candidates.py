"""The reduced-estimate candidates of experiments/lib/estimate_candidates.py: at full rank the channel subset is
the full 4-bit estimate bit for bit, channels come in rotary pairs, the joint basis is orthonormal and lossless at
full rank, adversarial needles move the planted key only in the dimensions a basis drops, and the certified bound
never falls below the full estimate's margins (and meets them at full rank); 2:4 pruning keeps the two largest codes
of each four, and its adversarial needles use only the channels it drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_wgmma
from experiments.lib import estimate_candidates as candidates, workloads
from sale_jax import SaleConfig
from sale_jax.reference.quantize import quantize_reference
from sale_jax.reference.selection import selection_margins_reference

CONFIG = SaleConfig(backend="reference", block_q=32, block_k=32, sink_tokens=32, local_tokens=32, dense_below=0)


def _qk(rng, seq_len=256, q_heads=4, kv_heads=2, head_dim=32):
    q = jnp.asarray(rng.standard_normal((1, seq_len, q_heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, seq_len, kv_heads, head_dim)), jnp.float32)
    return q, k


def test_channel_subset_at_full_rank_is_the_full_estimate(rng):
    work = workloads.llm_like_qkv(int(rng.integers(1 << 30)), 1, 256, 4, 2, 32, dtype=jnp.float32)
    basis = candidates.channel_subset_basis(work.q, work.k, 32)
    np.testing.assert_array_equal(np.asarray(basis), np.broadcast_to(np.eye(32), (2, 32, 32)))
    full = selection_margins_reference(work.q, work.k, jnp.ones(4), CONFIG)[1]
    np.testing.assert_array_equal(np.asarray(candidates.reduced_margins(work.q, work.k, basis, CONFIG)),
                                  np.asarray(full))


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_channels_come_in_rotary_pairs(rng, rank):
    q, k = _qk(rng)
    loud = int(rng.integers(32))  # one channel dominating q and k: it and its rotary partner must be chosen
    q, k = q.at[..., loud].mul(20.0), k.at[..., loud].mul(20.0)
    channels = np.asarray(candidates.channel_subset_basis(q, k, rank).argmax(axis=1))  # [Hkv, rank]
    partner = np.asarray(candidates.rotary_partner(32))
    for head in channels:
        assert len(set(head)) == rank
        assert set(partner[head]) == set(head)
        assert loud in head and partner[loud] in head
    # The partner is the channel workloads.rotate turns together with it.
    x = jnp.zeros((1, 1, 1, 32)).at[..., loud].set(1.0)
    turned = np.flatnonzero(np.abs(np.asarray(workloads.rotate(x, jnp.asarray([7]))[0, 0, 0])) > 1e-6)
    assert set(turned) == {loud, partner[loud]}


def test_joint_basis_is_orthonormal_and_lossless_at_full_rank(rng):
    q, k = _qk(rng)
    direction = rng.standard_normal(32)
    q = q + 5.0 * jnp.asarray(direction / np.linalg.norm(direction), jnp.float32) * jnp.asarray(
        rng.standard_normal((1, 256, 4, 1)), jnp.float32)
    basis = candidates.joint_pca_basis(q, k, 32)
    np.testing.assert_allclose(np.einsum("hdr,hds->hrs", basis, basis), np.broadcast_to(np.eye(32), (2, 32, 32)),
                               atol=1e-5)
    group_k = jnp.repeat(k, 2, axis=2)
    highest = jax.lax.Precision.HIGHEST  # f32 dots (a GPU's default would be TF32)
    full = jnp.einsum("bthd,bshd->bhts", q, group_k, precision=highest)
    reduced = jnp.einsum("bthr,bshr->bhts", candidates.project(q, basis), candidates.project(group_k, jnp.repeat(
        basis, 2, axis=0)), precision=highest)
    np.testing.assert_allclose(np.asarray(reduced), np.asarray(full), atol=1e-3)
    # The planted direction is the top principal direction of every kv head.
    top = np.asarray(candidates.joint_pca_basis(q, k, 2))[:, :, 0]
    assert np.all(np.abs(top @ direction) / np.linalg.norm(direction) > 0.95)


@pytest.mark.parametrize("family", ["channels", "pca"])
def test_adversarial_needles_live_in_the_dropped_dimensions(rng, family):
    seed = int(rng.integers(1 << 30))
    work = workloads.llm_like_qkv(seed, 1, 512, 4, 2, 32, dtype=jnp.float32, num_needles=3)
    plain_k = np.asarray(workloads.llm_like_qkv(seed, 1, 512, 4, 2, 32, dtype=jnp.float32, num_needles=0).k)
    choose = candidates.channel_subset_basis if family == "channels" else candidates.joint_pca_basis
    basis = choose(work.q, work.k, 8)
    scale = 32 ** -0.5
    keys = candidates.adversarial_needle_keys(work.q, jnp.asarray(plain_k), work.needle_rows, work.needle_keys,
                                              candidates.outside_basis(basis), 1.0, scale)
    delta = np.asarray(keys) - plain_k  # [1, S, Hkv, D]
    kept_part = np.einsum("bskd,kdr->bskr", delta, np.asarray(basis))
    assert np.linalg.norm(kept_part) < 1e-4 * np.linalg.norm(delta)
    # Each needle's score rises by the row's log-sum-exp gap (strength 1), though its reduced score does not move.
    rows, needle_keys = np.asarray(work.needle_rows[0]), np.asarray(work.needle_keys[0])
    q = np.asarray(work.q[0])
    for head in range(4):
        group_keys = list(needle_keys[2 * (head // 2):2 * (head // 2) + 2].ravel())
        for row, key in zip(rows[head], needle_keys[head]):
            if group_keys.count(key) > 1:  # two needles on one key: both raises add up
                continue
            scores = scale * plain_k[0, :row + 1, head // 2] @ q[row, head]
            gap = np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - scores[key]
            change = scale * q[row, head] @ delta[0, key, head // 2]
            assert gap > 1.0
            np.testing.assert_allclose(change, gap, rtol=1e-3)


def test_bad_rank_is_refused(rng):
    q, k = _qk(rng)
    for rank in (0, 3, 34):
        with pytest.raises(ValueError, match="rank"):
            candidates.channel_subset_basis(q, k, rank)
        with pytest.raises(ValueError, match="rank"):
            candidates.joint_pca_basis(q, k, rank)


@pytest.mark.parametrize("family", ["channels", "pca"])
def test_certified_bound_is_never_below_the_full_estimate(rng, family):
    work = workloads.llm_like_qkv(int(rng.integers(1 << 30)), 1, 256, 4, 2, 32, dtype=jnp.float32)
    ones = jnp.ones((4,), jnp.float32)
    full = np.asarray(selection_margins_reference(work.q, work.k, ones, CONFIG)[1])
    finite = np.isfinite(full)
    choose = {"channels": candidates.channel_subset_basis, "pca": candidates.joint_pca_basis}[family]
    for rank in (2, 8, 16):
        bound = np.asarray(candidates.certified_bound_margins(work.q, work.k, choose(work.q, work.k, rank), CONFIG))
        np.testing.assert_array_equal(np.isfinite(bound), finite)
        # f32 rounding of the projected dots: 1e-4 relative to the margins' scale.
        assert np.all(bound[finite] >= full[finite] - 1e-4 * np.abs(full[finite]).max()), rank
        assert np.mean(bound[finite] > full[finite] + 1e-3) > 0.5, f"rank {rank} of 32 bounds loosely"
    at_full_rank = candidates.certified_bound_margins(work.q, work.k, choose(work.q, work.k, 32), CONFIG)
    np.testing.assert_allclose(np.asarray(at_full_rank)[finite], full[finite], atol=1e-3)


def test_tiles_needing_estimate_counts_whole_tiles_and_the_last_partial_one():
    # One query block, one head, 5 middle key blocks in tiles of 2: [0, 1] [2, 3] [4, pad].
    middle = np.array([True, True, True, True, True])[None, None, None]
    bound = np.array([-1.0, 0.5, -1.0, -2.0, 3.0])[None, None, None]
    assert candidates.tiles_needing_estimate(bound, middle, 0.0, 2) == pytest.approx(2 / 3)
    assert candidates.tiles_needing_estimate(bound, middle, 0.0, 1) == pytest.approx(2 / 5)
    # A block outside the middle (sink, local or invisible) never makes a tile needed.
    assert candidates.tiles_needing_estimate(bound, middle & (bound < 1), 0.0, 2) == pytest.approx(1 / 2)


def test_structured_sparse_margins_refuse_an_unknown_operand(rng):
    q, k = _qk(rng)
    with pytest.raises(ValueError, match="operand"):
        candidates.structured_sparse_margins(q, k, CONFIG, "v")


def test_adversarial_needles_for_2_4_codes_use_only_the_pruned_channels(rng):
    seed = int(rng.integers(1 << 30))
    work = workloads.llm_like_qkv(seed, 1, 512, 4, 2, 32, dtype=jnp.float32, num_needles=3)
    plain_k = np.asarray(workloads.llm_like_qkv(seed, 1, 512, 4, 2, 32, dtype=jnp.float32, num_needles=0).k)
    dropped_of = candidates.outside_structured_sparse(work.q, work.k, work.needle_rows, CONFIG)
    keys = candidates.adversarial_needle_keys(work.q, jnp.asarray(plain_k), work.needle_rows, work.needle_keys,
                                              dropped_of, 1.0, 32 ** -0.5)
    delta = np.asarray(keys) - plain_k  # [1, S, Hkv, D]
    quant = quantize_reference(work.q, work.k, granularity=CONFIG.quant_granularity, block_q=CONFIG.block_q,
                               block_k=CONFIG.block_k)
    kept = np.asarray(sparse_wgmma.prune(quant.q_codes)) != 0  # [1, L, Hq, D]
    rows, needle_keys = np.asarray(work.needle_rows[0]), np.asarray(work.needle_keys[0])
    for head in range(4):
        group_keys = list(needle_keys[2 * (head // 2):2 * (head // 2) + 2].ravel())
        for row, key in zip(rows[head], needle_keys[head]):
            if group_keys.count(key) > 1:  # two needles on one key: their moves add up
                continue
            moved = delta[0, key, head // 2]
            assert np.linalg.norm(moved) > 0
            assert np.all(moved[kept[0, row, head]] == 0), (head, row)
