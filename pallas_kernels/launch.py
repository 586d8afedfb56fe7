"""Launch helpers shared by the kernels: the (q block, q head, batch) grid walked longest rows first, and
`pallas_call` with optional initial output buffers, so tests can poison outputs and prove every element is written
by the kernel (a fresh output buffer may already hold the right values by chance, e.g. zeros)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.experimental import pallas as pl


class QBlockGrid:
    """Grid `(num_q_blocks, q_heads, batch)` whose first axis visits q blocks last to first: causal rows grow with
    the q block, so the longest programs start first and the short ones fill the tail."""

    def __init__(self, num_q_blocks: int, q_heads: int, kv_heads: int, batch: int):
        self.num_q_blocks = num_q_blocks
        self.group = q_heads // kv_heads
        self.shape = (num_q_blocks, q_heads, batch)

    def q_block(self, program_index):
        """The q block of grid index `program_index` (in index maps, and with `pl.program_id(0)` in kernels)."""
        return self.num_q_blocks - 1 - program_index

    def q_rows_spec(self, block_q: int, head_dim: int) -> pl.BlockSpec:
        """`[B, T, Hq, D]` rows of this program's q block and head."""
        return pl.BlockSpec((None, block_q, None, head_dim), lambda i, h, b: (b, self.q_block(i), h, 0))

    def kv_spec(self, kv_len: int, head_dim: int) -> pl.BlockSpec:
        """The whole `[B, S, Hkv, D]` sequence of this q head's kv head (GQA: read in place, never repeated)."""
        return pl.BlockSpec((None, kv_len, None, head_dim), lambda i, h, b: (b, 0, h // self.group, 0))


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
