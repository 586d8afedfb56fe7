"""Calibrating a Llama's SALE thresholds from its own dense forward passes (docs/algorithm.md, section 8)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

import sale_jax
from models.llama import Llama


def calibrate_model(model: Llama, prompts: Sequence[jax.Array], theta: float = 0.4, model_name: str = "",
                    progress: bool = True, **search) -> sale_jax.Thresholds:
    """Per-layer, per-head thresholds from `prompts` (each int `[T]` or `[1, T]`), with the model's own SALE
    configuration (the one inference runs). Layers are captured one at a time from a dense forward pass; `search`
    passes `tau0` / `tau_min` on to `sale_jax.calibrate`."""
    samples = [model.attention_inputs(jnp.atleast_2d(jnp.asarray(prompt, jnp.int32))) for prompt in prompts]
    config = model.config
    return sale_jax.calibrate(samples, config.num_layers, config.num_heads, config.sale, theta=theta,
                              model_name=model_name, progress=progress, **search)
