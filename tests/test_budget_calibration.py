"""The budget recipes' cost tables (sale_jax.calibration): the allocation by price, the price search, and the
density budget on synthetic layers without a model. With a model: tests/test_model_calibration.py."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from experiments.lib import workloads
from sale_jax import calibration
from sale_jax.calibration import CostTable, search_price

SALE = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16,
                           backend="reference")


def _table(rng, layers=3, heads=4):
    """Costs that fall and densities that rise toward dense (grid index 0), as SALE's do."""
    taus = calibration.TAU_GRID
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


def test_density_recipe_without_a_model_spends_at_most_its_density_on_synthetic_layers(rng):
    seed = int(rng.integers(2**31))
    samples = [[(w.q, w.k, w.v) for w in (workloads.llm_like_qkv(seed + 2 * sample + layer, 1, 512, 4, 2, 32,
                                                                  dtype=jnp.float32, head_seed=layer)
                                          for layer in range(2))] for sample in range(2)]
    # Inference would run these short samples dense; calibration measures the sparse path all the same, and
    # records the configuration inference runs.
    inference = dataclasses.replace(SALE, dense_below=1 << 20)
    sparsest = calibration.calibrate_to_density(samples, 2, 4, inference, density=1e-3, progress=False)
    budget = 0.5 * (sparsest.recipe_params["calibration_density"] + 1.0)
    thresholds = calibration.calibrate_to_density(samples, 2, 4, inference, density=budget, progress=False)
    assert thresholds.recipe_params | {"calibration_density": 0} == {
        "name": "density_budget", "cost": "l1", "density": budget, "calibration_density": 0, "prompts": 2}
    assert thresholds.config == inference
    measured = np.mean([[float(sale_jax.select_blocks(q, k, thresholds.layer(layer), SALE).density_per_head().mean())
                         for layer, (q, k, _) in enumerate(sample)] for sample in samples])
    np.testing.assert_allclose(measured, thresholds.recipe_params["calibration_density"], atol=1e-6)
    assert sparsest.recipe_params["calibration_density"] <= measured <= budget
    with pytest.raises(ValueError, match="expected num_layers=3"):
        calibration.calibrate_to_density(samples, 3, 4, SALE, density=0.5, progress=False)
    with pytest.raises(ValueError, match="density must be in"):
        calibration.calibrate_to_density(samples, 2, 4, SALE, density=0.0, progress=False)
