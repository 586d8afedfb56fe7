"""Pallas GPU kernels (Triton lowering) for the three SALE passes.

A leaf package: arrays and static ints in, arrays out. It imports nothing from `sale_jax`; the API in
`sale_jax.pallas_backend` pads the inputs, calls these kernels and assembles the results.
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.quantize import quantize_rows
from pallas_kernels.selection import select_blocks

__all__ = ["block_sparse_attention", "quantize_rows", "select_blocks"]
