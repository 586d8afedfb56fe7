"""The budget calibration recipes: the allocation by price, the price search, the loss gradients they weigh
attention errors by, whole-model calibration to a KL or density budget (sale_jax.budget_calibration,
models.calibration), and the density budget on synthetic layers without a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from experiments.lib import workloads
from models import checkpoint, llama
from models.calibration import _dense_sensitivities, _kl_from_dense, calibrate_model
from sale_jax import budget_calibration
from sale_jax.budget_calibration import CostTable, search_price

FIXTURE = "tests/fixtures/tiny_llama"
SALE = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                           backend="reference")


def _table(rng, layers=3, heads=4):
    """Costs that fall and densities that rise toward dense (grid index 0), as SALE's do."""
    taus = budget_calibration.TAU_GRID
    cost = np.sort(rng.uniform(0, 1, (layers, len(taus), heads)), axis=1) * rng.uniform(0.1, 10, (layers, 1, heads))
    cost[:, 0] = 0.0
    density = np.sort(rng.uniform(0.05, 1, (layers, len(taus), heads)), axis=1)[:, ::-1].copy()
    density[:, 0] = 1.0
    return CostTable(cost, density, taus)


def test_allocation_minimizes_density_plus_priced_cost_per_head(rng):
    table = _table(rng)
    for price in (0.0, 0.3, 3.0, 1e9):
        taus = table.allocate(price)
        index = np.searchsorted(table.taus, taus)
        chosen = np.take_along_axis(table.density + price * table.cost, index[:, None], axis=1)[:, 0]
        best = (table.density + price * table.cost).min(axis=1)
        np.testing.assert_allclose(chosen, best)
    # Free errors buy the sparsest thresholds; priceless ones keep the dense head.
    assert np.all(table.allocate(0.0) == table.taus[-1])
    assert np.all(table.allocate(1e12) == 0.0)


@pytest.mark.parametrize("accepted_above", [True, False])
def test_price_search_finds_the_edge_of_the_accepted_range(rng, accepted_above):
    table = _table(rng)

    def total_cost(taus):
        index = np.searchsorted(table.taus, taus)
        return np.take_along_axis(table.cost, index[:, None], axis=1).sum()

    def total_density(taus):
        index = np.searchsorted(table.taus, taus)
        return np.take_along_axis(table.density, index[:, None], axis=1).mean()

    if accepted_above:  # a budget on the error: the sparsest allocation within it
        budget = 0.5 * total_cost(table.allocate(1e-6))
        price, taus = search_price(table, lambda t: total_cost(t) <= budget, accepted_above=True)
        assert total_cost(taus) <= budget
        assert total_cost(table.allocate(price * 0.99)) > budget or price <= 1e-6 * 1.01
    else:  # a budget on density: the most accurate allocation within it
        budget = 0.5 * (total_density(table.allocate(1e-6)) + 1.0)
        price, taus = search_price(table, lambda t: total_density(t) <= budget, accepted_above=False)
        assert total_density(taus) <= budget
        assert total_density(table.allocate(price * 1.01)) > budget


def test_loss_gradients_match_finite_differences(rng):
    model = checkpoint.load_llama(FIXTURE, dtype="float32")
    tokens = jnp.asarray(rng.integers(0, 256, size=(1, 48)), jnp.int32)
    scored = jnp.arange(32, 48)
    with jax.default_matmul_precision("highest"):
        log_p, qkvs, grads = _dense_sensitivities(model, tokens, scored)
        assert len(qkvs) == len(grads) == model.config.num_layers
        greedy = jnp.argmax(log_p, axis=-1)
        layer = 1
        direction = jnp.asarray(rng.normal(size=grads[layer].shape), jnp.float32)
        step = 1e-2

        def loss(shift):
            shifts = [jnp.zeros_like(g) for g in grads]
            shifts[layer] = shift
            shifted, _ = model.scored_log_probs(tokens, scored, head_shifts=shifts)
            return -jnp.take_along_axis(shifted, greedy[..., None], axis=-1).sum()

        def central(h):
            return (loss(h * direction) - loss(-h * direction)) / (2 * h)

        # Richardson's extrapolation of two central differences cancels their O(step^2) truncation.
        numeric = (4 * central(step / 2) - central(step)) / 3
        analytic = jnp.sum(grads[layer] * direction)
        unshifted = float(loss(jnp.zeros_like(direction)))
    # What is left is the f32 rounding of the losses (a few ulps each, amplified by 1 / step in the differences;
    # 3x that of one difference at `step` after the extrapolation) and the O(step^4) truncation.
    rounding = 3 * 8 * abs(unshifted) * np.finfo(np.float32).eps / (2 * step)
    assert abs(float(analytic) - float(numeric)) <= rounding + 1e-3 * abs(float(analytic)), (analytic, numeric)


@pytest.fixture(scope="module")
def sale_model():
    return checkpoint.load_llama(FIXTURE, dtype="float32", attention="sale", sale=SALE)


def test_kl_budget_recipe_meets_its_budget_on_the_model_and_trades_density_for_it(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160) for _ in range(2)]
    tight = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=1e-3, score_tokens=48, progress=False)
    loose = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=0.3, score_tokens=48, progress=False)
    assert tight.recipe_params["name"] == "kl_budget" and tight.config == SALE
    for thresholds, budget in ((tight, 1e-3), (loose, 0.3)):
        # Measured again, independently of the search, on the same prompts.
        dense = llama.with_attention(sale_model, "dense")
        kls = []
        for prompt in prompts:
            tokens = jnp.asarray(prompt, jnp.int32)[None]
            scored = jnp.arange(tokens.shape[1] - 48, tokens.shape[1])
            reference, _ = dense.scored_log_probs(tokens, scored)
            kls.append(float(_kl_from_dense(sale_model, tokens, scored, reference, thresholds)))
        assert np.mean(kls) <= budget
        # Within f32 rounding: on a GPU the calibration's program and this one reduce in different orders.
        np.testing.assert_allclose(np.mean(kls), thresholds.recipe_params["calibration_kl"], rtol=1e-2, atol=1e-7)
    # A smaller price takes, per head, a point of no higher density on the same (dense-pass) inputs.
    assert loose.recipe_params["calibration_density"] <= tight.recipe_params["calibration_density"]


def test_kl_budget_recipe_scores_the_positions_it_is_given(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160) for _ in range(2)]
    positions = [np.sort(rng.choice(160, size=12, replace=False)) for _ in prompts]
    thresholds = calibrate_model(sale_model, prompts, "kl_budget", kl_budget=1e-3, scored_positions=positions,
                                 progress=False)
    assert thresholds.recipe_params["scored"] == "given" and thresholds.recipe_params["scored_per_prompt"] == 12
    dense = llama.with_attention(sale_model, "dense")
    kls = []
    for prompt, scored in zip(prompts, positions):
        tokens = jnp.asarray(prompt, jnp.int32)[None]
        reference, _ = dense.scored_log_probs(tokens, jnp.asarray(scored))
        kls.append(float(_kl_from_dense(sale_model, tokens, jnp.asarray(scored), reference, thresholds)))
    assert np.mean(kls) <= 1e-3
    # Within f32 rounding: on a GPU the calibration's program and this one reduce in different orders.
    np.testing.assert_allclose(np.mean(kls), thresholds.recipe_params["calibration_kl"], rtol=1e-2, atol=1e-7)
    for bad in ([positions[0]], [positions[0], np.array([0, 160])], [positions[0], np.array([], np.int32)]):
        with pytest.raises(ValueError, match="scored_positions"):
            calibrate_model(sale_model, prompts, "kl_budget", scored_positions=bad, progress=False)


def test_density_budget_recipe_spends_at_most_its_density(sale_model, rng):
    prompts = [rng.integers(0, 256, size=160)]
    thresholds = calibrate_model(sale_model, prompts, "density_budget", density=0.6, score_tokens=48,
                                 progress=False)
    assert thresholds.recipe_params["calibration_density"] <= 0.6
    # The density it reports is that of the layers' inputs in the dense forward pass: measured again here.
    tokens = jnp.asarray(prompts[0], jnp.int32)[None]
    densities = [float(sale_jax.select_blocks(q, k, thresholds.layer(layer), SALE).density())
                 for layer, (q, k, _) in enumerate(sale_model.attention_inputs(tokens))]
    np.testing.assert_allclose(np.mean(densities), thresholds.recipe_params["calibration_density"], atol=1e-6)


@pytest.mark.parametrize("arguments,message", [
    (dict(recipe="bogus"), "recipe must be one of"),
    (dict(recipe="kl_budget", kl_budget=0.0), "kl_budget must be > 0"),
    (dict(recipe="density_budget"), "density in \\(0, 1\\]"),
    (dict(recipe="kl_budget", cost="l2"), "cost must be one of"),
    (dict(recipe="kl_budget", tau0=0.01), "takes no"),
])
def test_calibrate_model_rejects_bad_recipe_arguments(sale_model, arguments, message):
    with pytest.raises(ValueError, match=message):
        calibrate_model(sale_model, [np.zeros(64, np.int32)], progress=False, **arguments)


def test_density_recipe_without_a_model_spends_at_most_its_density_on_synthetic_layers(rng):
    seed = int(rng.integers(2**31))
    samples = [[(w.q, w.k, w.v) for w in (workloads.llm_like_qkv(seed + 2 * sample + layer, 1, 512, 4, 2, 32,
                                                                  dtype=jnp.float32, head_seed=layer)
                                          for layer in range(2))] for sample in range(2)]
    sparsest = budget_calibration.calibrate_to_density(samples, 2, 4, SALE, density=1e-3, progress=False)
    budget = 0.5 * (sparsest.recipe_params["calibration_density"] + 1.0)
    thresholds = budget_calibration.calibrate_to_density(samples, 2, 4, SALE, density=budget, progress=False)
    assert thresholds.recipe_params | {"calibration_density": 0} == {
        "name": "density_budget", "cost": "l1", "density": budget, "calibration_density": 0, "prompts": 2}
    measured = np.mean([[float(sale_jax.select_blocks(q, k, thresholds.layer(layer), SALE).density_per_head().mean())
                         for layer, (q, k, _) in enumerate(sample)] for sample in samples])
    np.testing.assert_allclose(measured, thresholds.recipe_params["calibration_density"], atol=1e-6)
    assert sparsest.recipe_params["calibration_density"] <= measured <= budget
    with pytest.raises(ValueError, match="expected num_layers=3"):
        budget_calibration.calibrate_to_density(samples, 3, 4, SALE, density=0.5, progress=False)
    with pytest.raises(ValueError, match="density must be in"):
        budget_calibration.calibrate_to_density(samples, 2, 4, SALE, density=0.0, progress=False)
