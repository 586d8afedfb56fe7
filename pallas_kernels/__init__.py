"""Pallas GPU kernels for the three SALE passes: Triton lowering, plus the selection's low-bit estimate and the
computation pass as Mosaic GPU kernels (Hopper).

A leaf package: arrays and static ints in, arrays out. It imports nothing from `sale_jax`; the backends
`sale_jax.triton_backend` and `sale_jax.mosaic_gpu_backend` pad the inputs, pass the block geometry and SALE's
regions as arrays and ints, call these kernels and assemble the results.
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.mosaic_estimate import estimate_hits
from pallas_kernels.mosaic_sparse_attention import mosaic_block_sparse_attention
from pallas_kernels.quantize import quantize_rows
from pallas_kernels.selection import COMPACTION_CHUNK, compact_hits, row_thresholds, select_blocks

__all__ = ["COMPACTION_CHUNK", "block_sparse_attention", "compact_hits", "estimate_hits", "quantize_rows",
           "mosaic_block_sparse_attention", "row_thresholds", "select_blocks"]
