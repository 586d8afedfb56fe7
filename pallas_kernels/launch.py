"""Launch helpers shared by the kernels: the (q block, q head, batch) grid walked longest rows first (optionally
(q block, kv head, batch), one program for the q heads of a kv head), and `pallas_call` with optional initial output
buffers, so tests can poison outputs and prove every element is written by the kernel (a fresh output buffer may
already hold the right values by chance, e.g. zeros)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.experimental import pallas as pl


class QBlockGrid:
    """Grid `(num_q_blocks, q_heads, batch)` whose first axis visits q blocks last to first: causal rows grow with
    the q block, so the longest programs start first and the short ones fill the tail.

    With `group_heads`, the grid is `(num_q_blocks, kv_heads, batch)` instead: one program per kv head handles the
    `group` q heads that share it, and the q-head axis of the per-q-head specs holds `group` heads (`head_block`)."""

    def __init__(self, num_q_blocks: int, q_heads: int, kv_heads: int, batch: int, *, group_heads: bool = False):
        self.num_q_blocks = num_q_blocks
        self.group = q_heads // kv_heads
        self.group_heads = group_heads
        self.shape = (num_q_blocks, kv_heads if group_heads else q_heads, batch)

    @property
    def head_block(self) -> int | None:
        """Block size of a q-head axis: the group's heads when grouped, else one squeezed head (`None`)."""
        return self.group if self.group_heads else None

    def kv_head(self, head_index):
        """The kv head of grid index `head_index` (`pl.program_id(1)` in kernels)."""
        return head_index if self.group_heads else head_index // self.group

    def q_block(self, program_index):
        """The q block of grid index `program_index` (in index maps, and with `pl.program_id(0)` in kernels)."""
        return self.num_q_blocks - 1 - program_index

    def q_rows_spec(self, block_q: int, head_dim: int) -> pl.BlockSpec:
        """`[B, T, Hq, D]` rows of this program's q block and head (grouped: `[block_q, group, D]`, its heads)."""
        return pl.BlockSpec((None, block_q, self.head_block, head_dim), lambda i, h, b: (b, self.q_block(i), h, 0))

    def kv_spec(self, kv_len: int, head_dim: int) -> pl.BlockSpec:
        """The whole `[B, S, Hkv, D]` sequence of this q head's kv head (GQA: read in place, never repeated)."""
        return pl.BlockSpec((None, kv_len, None, head_dim), lambda i, h, b: (b, 0, self.kv_head(h), 0))


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
