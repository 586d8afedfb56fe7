"""The paper's per-head threshold search (docs/algorithm.md, section 8).

For each layer and q head: start at `tau0`; while the per-row L1 error of SALE's output against dense attention is
`>= theta`, halve `tau`, and below `tau_min` make the head dense (`tau = 0`). Over several samples keep the smallest
`tau` per head. All heads of a layer search together: each round is one `sale_attention` call with the current
per-head thresholds (traced, so no recompilation), run with exactly the inference `SaleConfig` and backend, except
that the sparse path runs at every length (`measured_config`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sale_jax.api import dense_attention, sale_attention
from sale_jax.calibration.inputs import layer_inputs, measured_config
from sale_jax.config import SaleConfig
from sale_jax.thresholds import DEFAULT_TAU, Thresholds

DEFAULT_THETA = 0.4  # the paper's bound for Llama-3.1-8B
DEFAULT_TAU_MIN = 1e-4


def per_row_l1_error(out: jax.Array, reference: jax.Array) -> jax.Array:
    """f32 `[Hq]`: `sum |out - reference|` over batch, rows and head dims of each head, divided by the rows."""
    diff = jnp.abs(out.astype(jnp.float32) - reference.astype(jnp.float32))
    return diff.sum(axis=(0, 1, 3)) / (out.shape[0] * out.shape[1])


def search_thresholds(head_errors: Callable[[np.ndarray], np.ndarray], num_heads: int, theta: float, tau0: float,
                      tau_min: float) -> np.ndarray:
    """The halving search for all heads at once. `head_errors(tau)` returns each head's error at thresholds `tau`.

    A head stops at the first `tau` whose error is under `theta`; one halved below `tau_min` becomes dense (0).
    """
    tau = np.full(num_heads, tau0, np.float64)
    searching = np.ones(num_heads, bool)
    while searching.any():
        errors = np.asarray(head_errors(tau.astype(np.float32)))
        failed = searching & (errors >= theta)
        searching = failed
        tau[failed] /= 2
        too_small = failed & (tau < tau_min)
        tau[too_small] = 0.0
        searching &= ~too_small
    return tau.astype(np.float32)


def calibrate_layer(q: jax.Array, k: jax.Array, v: jax.Array, config: SaleConfig, theta: float = DEFAULT_THETA,
                    tau0: float = DEFAULT_TAU, tau_min: float = DEFAULT_TAU_MIN) -> np.ndarray:
    """Thresholds f32 `[Hq]` for one layer's inputs (`q [B, T, Hq, D]`, `k, v [B, S, Hkv, D]`)."""
    dense = dense_attention(q, k, v, scale=config.scale)
    config = measured_config(config)

    def head_errors(tau):
        return per_row_l1_error(sale_attention(q, k, v, jnp.asarray(tau), config), dense)

    return search_thresholds(head_errors, q.shape[2], theta, tau0, tau_min)


def calibrate(layer_samples: Iterable[Iterable[Sequence[jax.Array]]], num_layers: int, num_q_heads: int,
              config: SaleConfig, theta: float = DEFAULT_THETA, tau0: float = DEFAULT_TAU,
              tau_min: float = DEFAULT_TAU_MIN, model_name: str = "", progress: bool = True) -> Thresholds:
    """Calibrates `[num_layers, num_q_heads]` thresholds.

    Args:
      layer_samples: per sample, an iterable over layers of the `(q, k, v)` that layer saw in a dense forward pass.
        Layers are consumed one at a time, so a generator keeps only one layer's inputs in memory.
      num_layers, num_q_heads: the model's shape; every sample must supply exactly `num_layers` layers.
      config: the inference configuration (blocks, regions, quantization, backend) the thresholds are for.
      theta: the per-row L1 error bound; tau0, tau_min: the search's start and the point where a head goes dense.
      model_name: recorded in the returned thresholds (and their file).
      progress: show a tqdm bar and a per-layer summary.
    """
    if not (theta > 0 and tau0 > 0 and 0 < tau_min <= tau0):
        raise ValueError(f"need theta > 0 and 0 < tau_min <= tau0, got theta={theta}, tau0={tau0}, "
                         f"tau_min={tau_min}")
    total = len(layer_samples) * num_layers if hasattr(layer_samples, "__len__") else None
    smallest = np.full((num_layers, num_q_heads), np.inf, np.float32)
    with tqdm(total=total, desc="calibrating", unit="layer", disable=not progress) as bar:
        for sample_index, layer, (q, k, v) in layer_inputs(layer_samples, num_layers, num_q_heads):
            tau = calibrate_layer(q, k, v, config, theta, tau0, tau_min)
            smallest[layer] = np.minimum(smallest[layer], tau)
            bar.set_postfix(sample=sample_index, layer=layer, dense_heads=int((tau == 0).sum()))
            bar.update(1)
        if progress:
            for layer, tau in enumerate(smallest):
                bar.write(f"layer {layer:3d}: tau min {tau.min():.2e} median {np.median(tau):.2e} "
                          f"max {tau.max():.2e}, dense heads {int((tau == 0).sum())}/{num_q_heads}")
    return Thresholds(jnp.asarray(smallest), model_name=model_name, config=config,
                      recipe={"name": "paper", "theta": theta, "tau0": tau0, "tau_min": tau_min})
