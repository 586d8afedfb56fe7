"""Per-head threshold calibration from each layer's `(q, k, v)` in a dense forward pass.

- `paper`: the paper's halving search, bounded by each head's per-row L1 error (`calibrate`).
- `costs`: each head's cost and density at every threshold of a grid (`head_costs`, `CostTable`), and the price
  search that spends a budget where it costs least (`search_price`).
- `budget`: the budget recipes' defaults and the density budget without a model (`calibrate_to_density`).
- `inputs`: what every recipe measures (`layer_inputs`, `measured_config`).

A model's own forward passes, and the recipes that need its loss (the KL budget), are `models.calibration`'s.
"""

from sale_jax.calibration.budget import (DEFAULT_DENSITY_BUDGET, DEFAULT_KL_BUDGET, calibrate_to_density,
                                         check_density_budget)
from sale_jax.calibration.costs import COSTS, TAU_GRID, CostTable, head_costs, search_price
from sale_jax.calibration.inputs import layer_inputs, measured_config
from sale_jax.calibration.paper import (DEFAULT_TAU_MIN, DEFAULT_THETA, calibrate, calibrate_layer,
                                        per_row_l1_error, search_thresholds)

__all__ = [
    "COSTS",
    "CostTable",
    "DEFAULT_DENSITY_BUDGET",
    "DEFAULT_KL_BUDGET",
    "DEFAULT_TAU_MIN",
    "DEFAULT_THETA",
    "TAU_GRID",
    "calibrate",
    "calibrate_layer",
    "calibrate_to_density",
    "check_density_budget",
    "head_costs",
    "layer_inputs",
    "measured_config",
    "per_row_l1_error",
    "search_price",
    "search_thresholds",
]
