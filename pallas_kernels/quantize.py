"""Pass 1 kernel: smooth one of Q or K by its sequence mean and quantize it to symmetric 4-bit codes held in int8.

One program per (row tile, head, batch element). The mean (a reduction over the whole sequence) comes in as an
input: a kernel cannot both reduce over the sequence and use the result in one pass without a grid-wide barrier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.launch import pallas_call_with_initial_outputs

CODE_MAX = 7


def _round_half_even(x: jax.Array) -> jax.Array:
    """Rounds f32 `|x| < 2**23` to int32, ties to even, with exact integer steps. Triton has no rounding primitive,
    and the `(x + 1.5 * 2**23) - 1.5 * 2**23` trick is folded away by XLA's CPU compiler in interpret mode."""
    truncated = x.astype(jnp.int32)
    fraction = jnp.abs(x - truncated.astype(jnp.float32))  # exact
    away = (fraction > 0.5) | ((fraction == 0.5) & (truncated % 2 != 0))
    return truncated + jnp.where(away, jnp.where(x < 0, -1, 1), 0)


def _quantize_kernel(x_ref, mean_ref, codes_ref, scale_ref, *smooth_ref, length: int, tile: int,
                     per_tile_scale: bool):
    rows = pl.program_id(0) * tile + jnp.arange(tile)
    smooth = x_ref[...].astype(jnp.float32) - mean_ref[...][None, :]
    smooth = jnp.where((rows < length)[:, None], smooth, 0.0)  # padding rows must not enter a block's scale
    amax = jnp.max(jnp.abs(smooth), axis=1)
    if per_tile_scale:
        amax = jnp.broadcast_to(jnp.max(amax), amax.shape)
    scale = jnp.where(amax == 0, 1.0, amax / CODE_MAX)
    codes = _round_half_even(smooth / scale[:, None])
    codes_ref[...] = jnp.clip(codes, -CODE_MAX, CODE_MAX).astype(jnp.int8)
    scale_ref[...] = scale
    if smooth_ref:
        smooth_ref[0][...] = smooth.astype(smooth_ref[0].dtype)


@functools.partial(jax.jit, static_argnames=("length", "tile", "per_tile_scale", "return_smooth", "interpret"))
def quantize_rows(x: jax.Array, mean: jax.Array, *, length: int, tile: int, per_tile_scale: bool,
                  return_smooth: bool, interpret: bool = False, initial_outputs=None):
    """Quantizes `x: [B, L_pad, H, D]` (rows past `length` are padding) around `mean: f32[B, H, D]`.

    Returns int8 codes `[B, L_pad, H, D]` (0 on padding rows), f32 scales `[B, H, L_pad]`, and with
    `return_smooth` the smoothed rows `x - mean` in x's dtype `[B, L_pad, H, D]` (padding rows 0). With
    `per_tile_scale`, all `tile` rows of a tile share one scale (the per-block granularity, with `tile` equal to
    the block size).
    """
    batch, padded_length, heads, head_dim = x.shape
    if padded_length % tile:
        raise ValueError(f"padded length {padded_length} is not a multiple of the tile {tile}")
    grid = (padded_length // tile, heads, batch)
    row_spec = pl.BlockSpec((None, tile, None, head_dim), lambda i, h, b: (b, i, h, 0))
    kernel = functools.partial(_quantize_kernel, length=length, tile=tile, per_tile_scale=per_tile_scale)
    return pallas_call_with_initial_outputs(
        kernel,
        inputs=(x, mean),
        initial_outputs=initial_outputs,
        grid=grid,
        in_specs=[row_spec, pl.BlockSpec((None, None, head_dim), lambda i, h, b: (b, h, 0))],
        out_specs=[row_spec, pl.BlockSpec((None, None, tile), lambda i, h, b: (b, h, i))]
        + [row_spec] * return_smooth,
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, jnp.int8),
            jax.ShapeDtypeStruct((batch, heads, padded_length), jnp.float32),
        ] + [jax.ShapeDtypeStruct(x.shape, x.dtype)] * return_smooth,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sale_quantize",
    )
