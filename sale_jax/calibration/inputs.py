"""What every recipe measures: each layer's `(q, k, v)` from a dense forward pass, under the inference
configuration with its sparse path at every length."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax

from sale_jax.config import SaleConfig


def measured_config(config: SaleConfig) -> SaleConfig:
    """`config` with `dense_below=0`: calibration always measures the sparse path, since thresholds found on short
    samples serve the long prompts that do run it."""
    return dataclasses.replace(config, dense_below=0)


def layer_inputs(layer_samples: Iterable[Iterable[Sequence[jax.Array]]], num_layers: int, num_q_heads: int):
    """Yields `(sample_index, layer, (q, k, v))` over each sample's layers, one at a time, checking that every
    sample supplies exactly `num_layers` layers of `num_q_heads` q heads and that there is a sample."""
    num_samples = 0
    for sample_index, sample in enumerate(layer_samples):
        layer = -1
        for layer, (q, k, v) in enumerate(sample):
            if layer >= num_layers:
                raise ValueError(f"sample {sample_index} has more than num_layers={num_layers} layers")
            if q.shape[2] != num_q_heads:
                raise ValueError(f"sample {sample_index}, layer {layer}: q has {q.shape[2]} heads, "
                                 f"expected num_q_heads={num_q_heads}")
            yield sample_index, layer, (q, k, v)
        if layer != num_layers - 1:
            raise ValueError(f"sample {sample_index} has {layer + 1} layers, expected num_layers={num_layers}")
        num_samples += 1
    if num_samples == 0:
        raise ValueError("layer_samples yielded no sample")
