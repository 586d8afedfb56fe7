"""Pure-jnp reference of the three SALE passes: the definition the Pallas kernels are held to."""

from sale_jax.reference.attention import block_sparse_attention_reference
from sale_jax.reference.quantize import QuantizedQK, quantize_reference
from sale_jax.reference.selection import select_blocks_reference

__all__ = ["QuantizedQK", "quantize_reference", "select_blocks_reference", "block_sparse_attention_reference"]
