"""Cost tables: what each head's thresholds cost, and the thresholds a price buys.

The paper's recipe bounds each head's per-row L1 error of the attention output. That error is measured in the
units of V and counts output the rest of the network ignores as much as the few keys an answer rests on. The
budget recipes instead give each (layer, head) a cost per candidate threshold, and spend the thresholds where they
cost least:

1. Costs. For every threshold of a log-spaced grid on both sides of the default (`TAU_GRID`; 0 is the dense
   head), SALE runs on each layer's own inputs from a dense forward pass. A head's cost is the first-order change
   of the model's loss that its output change causes, `sum_rows |g . (o_sale - o_dense)|`, where `g` is the
   gradient of the loss with respect to that head's attention output (`cost="first_order"`); without gradients
   the cost is the paper's per-row L1 error (`cost="l1"`). Its density is the share of visible blocks it keeps.
2. Allocation. For a price `lam`, each head takes the threshold that minimizes `density + lam * cost`; a larger
   price buys accuracy with density. A head whose cost is flat takes the largest threshold (sink and local
   only: a streaming head); one whose cost rises early stays near dense.
3. Price. The price is bisected (in log space) to the cheapest allocation whose measured objective (the model's
   KL divergence from dense, or the mean density) meets the user's budget. Every step is one evaluation of the
   objective, so the search costs `len(TAU_GRID)` SALE calls per layer plus a few whole-model evaluations:
   linear in layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sale_jax.api import dense_attention, sale_attention
from sale_jax.calibration.inputs import measured_config
from sale_jax.calibration.paper import per_row_l1_error
from sale_jax.config import SaleConfig
from sale_jax.thresholds import DEFAULT_TAU

# 0 (dense), then DEFAULT_TAU * 2**k from 1/8 to 2048 times the default: 0.001 ... 16.4, then inf. At 16.4 a
# middle key must outweigh every sink and local key together many times over, so hardly any middle block remains;
# inf keeps none and the kernels skip the head's estimate (a streaming head), so a head that costs the same at
# both takes inf.
TAU_GRID = np.concatenate([[0.0], DEFAULT_TAU * 2.0 ** np.arange(-3, 12), [np.inf]]).astype(np.float32)
COSTS = ("first_order", "l1")
_PRICE_RANGE = (1e-6, 1e12)
_BISECTION_STEPS = 40


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Per layer, grid threshold and q head: `cost` and `density` (f32 `[L, G, Hq]`), over `taus` (`[G]`)."""

    cost: np.ndarray
    density: np.ndarray
    taus: np.ndarray

    def allocate(self, price: float) -> np.ndarray:
        """Each head's threshold minimizing `density + price * cost` (ties go to the larger threshold)."""
        objective = self.density + price * self.cost
        best_from_top = np.argmin(objective[:, ::-1], axis=1)
        return self.taus[len(self.taus) - 1 - best_from_top]

    def mean_density(self, taus: np.ndarray) -> float:
        """The mean density over layers and heads at thresholds `taus` (`[L, Hq]`, values of `self.taus`)."""
        return float(np.mean(self.layer_density(taus)))

    def spend(self, density: float) -> np.ndarray:
        """The thresholds `[L, Hq]` of least cost whose mean density is at most `density` (the sparsest allocation
        when none is)."""
        _, taus = search_price(self, lambda t: self.mean_density(t) <= density, accepted_above=False)
        return taus

    def layer_density(self, taus: np.ndarray) -> np.ndarray:
        """Each layer's mean density over its heads at thresholds `taus` (`[L, Hq]`, values of `self.taus`)."""
        index = np.searchsorted(self.taus, taus)
        return np.take_along_axis(self.density, index[:, None, :], axis=1)[:, 0].mean(-1)


def head_costs(q: jax.Array, k: jax.Array, v: jax.Array, config: SaleConfig, output_grad: jax.Array | None = None,
               taus: np.ndarray = TAU_GRID) -> tuple[np.ndarray, np.ndarray]:
    """One layer's cost and density (f32 `[G, Hq]`) at each threshold of `taus`, every head at once.

    `output_grad` (`[B, T, Hq, D]`, like the attention output) weighs the output change by what it does to the
    model's loss; `None` takes the paper's per-row L1 error.
    """
    dense = dense_attention(q, k, v, scale=config.scale).astype(jnp.float32)
    config = measured_config(config)
    costs, densities = [], []
    for tau in taus:
        out, layout = sale_attention(q, k, v, jnp.full((q.shape[2],), tau, jnp.float32), config,
                                     return_layout=True)
        costs.append(_cost(out, dense, output_grad))
        densities.append(layout.density_per_head())
    return np.asarray(jnp.stack(costs)), np.asarray(jnp.stack(densities))


@jax.jit
def _cost(out: jax.Array, dense: jax.Array, output_grad: jax.Array | None) -> jax.Array:
    if output_grad is None:
        return per_row_l1_error(out, dense)
    delta = out.astype(jnp.float32) - dense
    per_row = jnp.einsum("bthd,bthd->bth", delta, output_grad.astype(jnp.float32))
    return jnp.abs(per_row).sum(axis=(0, 1))


def search_price(table: CostTable, within_budget: Callable[[np.ndarray], bool],
                 accepted_above: bool = True) -> tuple[float, np.ndarray]:
    """Bisects the log price for the edge of the range `within_budget` accepts, and returns that price and its
    thresholds `[L, Hq]`.

    With `accepted_above` (a budget on the model's error, which a higher price lowers), the smallest accepted price:
    the sparsest allocation within budget; if none is accepted, the largest price (the closest to dense). Otherwise
    (a budget on density, which a higher price raises), the largest accepted price: the most accurate allocation
    within budget; if none is accepted, the smallest price (the sparsest).
    """
    verdicts = {}

    def accepts(log_price):
        taus = table.allocate(np.exp(log_price))
        key = taus.tobytes()
        if key not in verdicts:
            verdicts[key] = bool(within_budget(taus))
        return verdicts[key]

    low, high = (np.log(price) for price in _PRICE_RANGE)
    if accepted_above:
        if accepts(low) or not accepts(high):
            edge = low if accepts(low) else high
            return float(np.exp(edge)), table.allocate(np.exp(edge))
    elif accepts(high) or not accepts(low):
        edge = high if accepts(high) else low
        return float(np.exp(edge)), table.allocate(np.exp(edge))
    for _ in range(_BISECTION_STEPS):
        if np.array_equal(table.allocate(np.exp(low)), table.allocate(np.exp(high))):
            break
        middle = (low + high) / 2
        if accepts(middle) == accepted_above:
            high = middle
        else:
            low = middle
    edge = high if accepted_above else low
    return float(np.exp(edge)), table.allocate(np.exp(edge))
