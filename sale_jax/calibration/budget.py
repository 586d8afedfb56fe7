"""The budget recipes' defaults and checks, and the `density_budget` recipe on layer inputs alone (no model).

With a model (`models.calibration.calibrate_model`) a budget is a KL divergence from the dense model's next-token
distribution (`kl_budget`) or a mean density (`density_budget`), and heads are priced by what their errors do to
the model's loss (`costs`). Without one only the density budget and the per-row L1 price remain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sale_jax.calibration.costs import TAU_GRID, CostTable, head_costs
from sale_jax.calibration.inputs import layer_inputs
from sale_jax.config import SaleConfig
from sale_jax.thresholds import Thresholds

DEFAULT_KL_BUDGET = 0.01  # nats of mean KL divergence from the dense model
DEFAULT_DENSITY_BUDGET = 0.1


def check_density_budget(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


def calibrate_to_density(layer_samples: Iterable[Iterable[Sequence[jax.Array]]], num_layers: int,
                         num_q_heads: int, config: SaleConfig, density: float = DEFAULT_DENSITY_BUDGET,
                         model_name: str = "", progress: bool = True) -> Thresholds:
    """The `density_budget` recipe without a model: every head priced by its per-row L1 error (`cost="l1"`) on
    each layer's `(q, k, v)` (as `sale_jax.calibrate` takes them), and `density` spent where it costs least."""
    check_density_budget(density)
    shape = (num_layers, len(TAU_GRID), num_q_heads)
    cost_sum, density_sum = np.zeros(shape), np.zeros(shape)
    num_samples = 0
    with tqdm(desc="pricing heads", unit="layer", disable=not progress) as bar:
        for sample_index, layer, (q, k, v) in layer_inputs(layer_samples, num_layers, num_q_heads):
            layer_cost, layer_density = head_costs(q, k, v, config)
            cost_sum[layer] += layer_cost
            density_sum[layer] += layer_density
            num_samples = sample_index + 1
            bar.update(1)
    table = CostTable(cost_sum / num_samples, density_sum / num_samples, TAU_GRID)
    taus = table.spend(density)
    recipe = {"name": "density_budget", "cost": "l1", "density": density,
              "calibration_density": table.mean_density(taus), "prompts": num_samples}
    return Thresholds(jnp.asarray(taus), model_name=model_name, recipe=recipe, config=config)
