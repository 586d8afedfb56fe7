"""`pallas_call` with optional initial output buffers, so tests can poison outputs and prove every element is
written by the kernel (a fresh output buffer may already hold the right values by chance, e.g. zeros)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.experimental import pallas as pl


def pallas_call_with_initial_outputs(kernel, *, inputs: Sequence[jax.Array], in_specs, out_specs, out_shape,
                                     initial_outputs: Sequence[jax.Array] | None, **kwargs):
    """Like `pl.pallas_call(kernel, ...)(*inputs)`; with `initial_outputs`, the outputs start as those buffers
    (aliased, so elements the kernel skips keep their initial values)."""
    if initial_outputs is None:
        return pl.pallas_call(kernel, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kwargs)(*inputs)
    initial_outputs = tuple(initial_outputs)
    for given, wanted in zip(initial_outputs, out_shape, strict=True):
        if given.shape != wanted.shape or given.dtype != wanted.dtype:
            raise ValueError(f"initial output {given.shape} {given.dtype} does not match {wanted.shape} {wanted.dtype}")
    num_inputs = len(inputs)

    def kernel_skipping_initial_refs(*refs):
        return kernel(*refs[:num_inputs], *refs[num_inputs + len(initial_outputs):])

    return pl.pallas_call(
        kernel_skipping_initial_refs,
        in_specs=list(in_specs) + list(out_specs),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={num_inputs + i: i for i in range(len(initial_outputs))},
        **kwargs,
    )(*inputs, *initial_outputs)
