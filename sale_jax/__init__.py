"""sale-jax: SALE sparse attention for long-context prefill (arXiv 2505.24179) in JAX."""

from sale_jax import nn
from sale_jax.api import block_sparse_attention, dense_attention, sale_attention, select_blocks
from sale_jax.calibration import calibrate
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout, BlockRegions, ChunkedLayout
from sale_jax.thresholds import DEFAULT_TAU, STREAMING, Thresholds

__all__ = [
    "BlockGrid",
    "BlockLayout",
    "BlockRegions",
    "ChunkedLayout",
    "DEFAULT_TAU",
    "STREAMING",
    "SaleConfig",
    "Thresholds",
    "block_sparse_attention",
    "calibrate",
    "dense_attention",
    "nn",
    "sale_attention",
    "select_blocks",
]
