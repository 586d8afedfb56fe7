"""Pass 1: smoothing and symmetric 4-bit codes of Q and K (docs/algorithm.md, section 3)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sale_jax.ops import column_bias, smoothing_means

CODE_MAX = 7  # symmetric 4-bit codes in [-7, 7], no zero point


class QuantizedQK(NamedTuple):
    """Everything the selection pass needs from Q and K.

    q_codes: int8 `[B, T, Hq, D]`, q_scale: f32 `[B, T, Hq]` (per row; with per-block granularity every row of a
    block carries the block's scale). k_codes: int8 `[B, S, Hkv, D]`, k_scale: f32 `[B, S, Hkv]`.
    k_smooth: `K - mean_j K[j]` in the input dtype `[B, S, Hkv, D]`, the operand of the exact statistics.
    column_bias: f32 `[B, Hq, S]`, `c_j = qbar . Ks_j`, which puts back the score part removed by smoothing Q.
    """

    q_codes: jax.Array
    q_scale: jax.Array
    k_codes: jax.Array
    k_scale: jax.Array
    k_smooth: jax.Array
    column_bias: jax.Array


def _scales(smoothed: jax.Array, group: int | None) -> jax.Array:
    """Per-token (`group=None`) or per-`group`-tokens scale `max|x| / 7` over `[B, L, H, D]`; zero groups get 1."""
    amax = jnp.max(jnp.abs(smoothed), axis=-1)  # [B, L, H]
    if group is not None:
        batch, length, heads = amax.shape
        padded = -(-length // group) * group
        amax = jnp.pad(amax, ((0, 0), (0, padded - length), (0, 0)))
        amax = amax.reshape(batch, padded // group, group, heads).max(axis=2)
        amax = jnp.repeat(amax, group, axis=1)[:, :length]
    return jnp.where(amax == 0, 1.0, amax / CODE_MAX)


def _codes(smoothed: jax.Array, scale: jax.Array) -> jax.Array:
    # jnp.round rounds half to even, as the spec asks.
    return jnp.clip(jnp.round(smoothed / scale[..., None]), -CODE_MAX, CODE_MAX).astype(jnp.int8)


def quantize_reference(q: jax.Array, k: jax.Array, *, granularity: str, block_q: int, block_k: int,
                       means: tuple[jax.Array, jax.Array] | None = None) -> QuantizedQK:
    """Smooths Q and K by their means over the sequence (or the given `means`, `ops.smoothing_means` of a longer
    call this one is a query chunk of) and quantizes them to 4-bit codes, all in f32."""
    q_mean, k_mean = smoothing_means(q, k) if means is None else means
    q_smooth, k_smooth = q.astype(jnp.float32) - q_mean, k.astype(jnp.float32) - k_mean
    per_block = granularity == "per_block"
    q_scale = _scales(q_smooth, block_q if per_block else None)
    k_scale = _scales(k_smooth, block_k if per_block else None)
    return QuantizedQK(
        q_codes=_codes(q_smooth, q_scale),
        q_scale=q_scale,
        k_codes=_codes(k_smooth, k_scale),
        k_scale=k_scale,
        k_smooth=k_smooth.astype(k.dtype),
        column_bias=column_bias(q_mean, k_smooth),
    )
