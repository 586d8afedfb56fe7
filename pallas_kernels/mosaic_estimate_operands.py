"""The estimate kernel's operands as the tensor cores read them: the shared-memory layouts of the 8-bit codes and of
the f32 offset terms, and the offsets as a rank-8 product of per-row and per-key terms for one tf32 `wgmma`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def mma_transforms(head_dim: int):
    """Shared-memory layout wgmma reads 8-bit rows of `head_dim` bytes from: 8-row tiles, swizzled."""
    swizzle = plgpu.find_swizzle(head_dim * 8)
    return plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle)


OFFSET_TERMS = 8  # K of the tf32 wgmma that adds the per-row and per-key offsets (its smallest)
_TF32_DROPPED_BITS = 13  # tf32 keeps the top 10 of f32's 23 mantissa bits
_FINITE_THRESHOLD = 1e30  # +-inf thresholds (select nothing / everything) clipped, so hi/lo splits stay finite
# Taken off every offset, so an excess of exactly 0 (a padded key's: no codes, no terms) reads as negative in the
# epilogue's sign-bit test; next to any nonzero term it rounds away.
_ZERO_NUDGE = 2.0 ** -64


def _tf32_split(x):
    """x = hi + lo with hi exact in tf32; the tensor cores keep lo to 10 bits, so x is carried to about 2**-20."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(~((1 << _TF32_DROPPED_BITS) - 1) & 0xFFFFFFFF)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, x - hi


def offset_terms(row_factor, row_threshold, k_scale, column_bias):
    """The kernel's f32 [B, Hq, T, 8] row terms and [B, Hq, S, 8] key terms: their product over the last
    axis is `excess / k_scale - dots - _ZERO_NUDGE = column_bias / k_scale * row_factor - row_threshold / k_scale
    - _ZERO_NUDGE`, each factor split into tf32 halves (hi*hi + hi*lo + lo*hi), so one tf32 wgmma adds it to the
    accumulator."""
    group = column_bias.shape[1] // k_scale.shape[1]
    scale = jnp.repeat(k_scale, group, axis=1)
    inverse = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)  # padded keys have no scale
    factor_hi, factor_lo = _tf32_split(row_factor)
    neg_hi, neg_lo = _tf32_split(-jnp.clip(row_threshold, -_FINITE_THRESHOLD, _FINITE_THRESHOLD))
    bias_hi, bias_lo = _tf32_split(column_bias * inverse)
    inverse_hi, inverse_lo = _tf32_split(inverse)
    row_zero, nudge = jnp.zeros_like(factor_hi), jnp.full_like(factor_hi, -_ZERO_NUDGE)
    key_zero, key_one = jnp.zeros_like(bias_hi), jnp.ones_like(bias_hi)
    rows = jnp.stack([factor_hi, factor_hi, factor_lo, neg_hi, neg_hi, neg_lo, nudge, row_zero], axis=-1)
    keys = jnp.stack([bias_hi, bias_lo, bias_hi, inverse_hi, inverse_lo, inverse_hi, key_one, key_zero], axis=-1)
    return rows, keys


def terms_transforms():
    """wgmma's tf32 operand layout for rows of 8 f32 (32 bytes): 8 x 8 tiles, 32-byte swizzle."""
    return plgpu.TilingTransform((8, OFFSET_TERMS)), plgpu.SwizzleTransform(4 * OFFSET_TERMS)
