"""Calibration on heads built to have a known answer, and the halving search itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from experiments.lib import workloads
from sale_jax.calibration import search_thresholds

LENGTH, HEAD_DIM = 2048, 32
CONFIG = sale_jax.SaleConfig(dense_below=0, backend="reference")


def thin_head(rng):
    """Every query sees one strong sink and thousands of middle keys, each ~5e-5 of the sink's weight: below
    tau_min, so never selected, yet together ~9% of late rows' mass, carrying the opposite value of the sink."""
    q = np.zeros((LENGTH, HEAD_DIM))
    q[:, 0] = 1.0
    k = rng.normal(scale=1e-3, size=(LENGTH, HEAD_DIM))
    k[0, 0] = 9.9 * HEAD_DIM ** 0.5  # exp(s_sink - s_middle) = exp(9.9) ~ 2e4
    v = -np.ones((LENGTH, HEAD_DIM))
    v[0] = 1.0
    return q, k, v


def local_head(rng):
    """Each key equals its own query: a sharp diagonal, negligible mass anywhere else."""
    q = 2.0 * rng.standard_normal((LENGTH, HEAD_DIM))
    return q, q.copy(), rng.standard_normal((LENGTH, HEAD_DIM))


def stack_heads(*heads):
    """Per-head (q, k, v) with one kv head each -> [1, L, H, D] arrays."""
    return tuple(jnp.asarray(np.stack([h[i] for h in heads], axis=1)[None], jnp.float32) for i in range(3))


def test_thin_head_goes_dense_and_sharp_head_keeps_tau0(rng):
    q, k, v = stack_heads(thin_head(rng), local_head(rng))
    tau = sale_jax.calibration.calibrate_layer(q, k, v, CONFIG)
    np.testing.assert_array_equal(tau, np.asarray([0.0, sale_jax.DEFAULT_TAU], np.float32))


def test_calibrate_keeps_the_smallest_tau_over_samples_and_round_trips(rng, tmp_path):
    thin, local = thin_head(rng), local_head(rng)
    samples = [[stack_heads(thin, local), stack_heads(local, local)],   # sample 0: layers 0 and 1
               [stack_heads(local, local), stack_heads(local, thin)]]   # sample 1
    thresholds = sale_jax.calibrate(samples, num_layers=2, num_q_heads=2, config=CONFIG, model_name="toy",
                                    progress=False)
    np.testing.assert_array_equal(thresholds.tau, np.asarray([[0.0, 0.008], [0.008, 0.0]], np.float32))
    assert (thresholds.model_name, thresholds.recipe_params["theta"], thresholds.config) == ("toy", 0.4, CONFIG)
    thresholds.save(tmp_path / "t.json")
    loaded = sale_jax.Thresholds.load(tmp_path / "t.json", num_layers=2, num_q_heads=2)
    np.testing.assert_array_equal(loaded.tau, thresholds.tau)
    assert loaded.config == CONFIG


def test_halving_stops_at_the_first_tau_under_the_bound():
    """Head 0 passes from 0.002 down; head 1 never passes; head 2 passes at once."""
    seen = []

    def head_errors(tau):
        seen.append(tau.copy())
        return np.asarray([0.1 if tau[0] <= 0.002 else 1.0, 1.0, 0.0])

    tau = search_thresholds(head_errors, 3, theta=0.4, tau0=0.008, tau_min=1e-4)
    np.testing.assert_allclose(tau, [0.002, 0.0, 0.008])
    assert [t[0] for t in seen] == pytest.approx([0.008, 0.004, 0.002, 0.002, 0.002, 0.002, 0.002])
    # head 1 is tried at 0.008, 0.004, ..., 1.25e-4 (7 rounds), then halving would go below tau_min: dense
    assert len(seen) == 7 and seen[-1][1] == pytest.approx(0.008 / 2 ** 6)


def test_bad_samples_and_arguments_raise(rng):
    layer = stack_heads(local_head(rng), local_head(rng))
    with pytest.raises(ValueError, match="expected num_layers=2"):
        sale_jax.calibrate([[layer]], num_layers=2, num_q_heads=2, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="more than num_layers=1"):
        sale_jax.calibrate([[layer, layer]], num_layers=1, num_q_heads=2, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="expected num_q_heads=4"):
        sale_jax.calibrate([[layer]], num_layers=1, num_q_heads=4, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="no sample"):
        sale_jax.calibrate([], num_layers=1, num_q_heads=2, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match="tau_min"):
        sale_jax.calibrate([[layer]], num_layers=1, num_q_heads=2, config=CONFIG, tau_min=0.1, progress=False)


# The paper recipe's thresholds on fixed LLM-like layers (f32, reference backend, full-f32 matmuls), recorded from
# the recipe as specified: any change to what it computes fails here.
PINNED_PAPER_THRESHOLDS = {
    0.1: [[0.008, 0.008, 0.008, 0.008], [0.004, 0.008, 0.008, 0.008]],
    0.02: [[0.008, 0.004, 0.004, 0.008], [0.004, 0.004, 0.008, 0.008]],
}


@pytest.mark.parametrize("theta", sorted(PINNED_PAPER_THRESHOLDS))
def test_paper_recipe_gives_its_pinned_thresholds(theta):
    config = sale_jax.SaleConfig(dense_below=0, block_q=32, block_k=16, sink_tokens=16, local_tokens=32,
                                 backend="reference")
    samples = [[(work.q, work.k, work.v) for work in (
        workloads.llm_like_qkv(100 * sample + layer, 1, 1024, 4, 2, 64, dtype=np.float32, head_seed=layer)
        for layer in range(2))] for sample in range(2)]
    with jax.default_matmul_precision("highest"):
        thresholds = sale_jax.calibrate(samples, 2, 4, config, theta=theta, progress=False)
    np.testing.assert_array_equal(np.asarray(thresholds.tau), np.float32(PINNED_PAPER_THRESHOLDS[theta]))
    assert thresholds.recipe_params == {"name": "paper", "theta": theta, "tau0": 0.008, "tau_min": 1e-4}
