"""The Mosaic GPU estimate kernel's contract (`mosaic_estimate.estimate_hits`) in plain jnp: the inputs it takes,
checked once for the kernel and the reference alike, and the hit flags it must compute (see that module's
docstring for the formula). The kernel's tests hold it to `estimate_hits_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FLAG_DTYPE = jnp.dtype(jnp.int8)  # one hit flag per key block: a byte keeps the kernel's rows of flags small
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))  # accepted; the kernel runs on fp8


def check_inputs(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *, block_q,
                  block_k, middle_start):
    """Shapes and dtypes shared by the kernel and the reference; returns (B, T, Hq, D, S, Hkv)."""
    if q_codes.ndim != 4 or k_codes.ndim != 4:
        raise ValueError(f"q_codes and k_codes must be [B, T, Hq, D] and [B, S, Hkv, D], got {q_codes.shape} and "
                         f"{k_codes.shape}")
    if q_codes.dtype != k_codes.dtype or q_codes.dtype not in CODE_DTYPES:
        raise ValueError(f"q_codes and k_codes must both be int8 or both float8_e4m3fn (4-bit codes are exact in "
                         f"either), got {q_codes.dtype} and {k_codes.dtype}")
    batch, q_len, q_heads, head_dim = q_codes.shape
    kv_batch, kv_len, kv_heads, kv_dim = k_codes.shape
    if kv_batch != batch or kv_dim != head_dim:
        raise ValueError(f"k_codes {k_codes.shape} does not match q_codes {q_codes.shape} in batch or head_dim")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} must be a multiple of kv heads {kv_heads}")
    expected = {
        "row_factor": (row_factor, (batch, q_heads, q_len), jnp.float32),
        "row_threshold": (row_threshold, (batch, q_heads, q_len), jnp.float32),
        "k_scale": (k_scale, (batch, kv_heads, kv_len), jnp.float32),
        "column_bias": (column_bias, (batch, q_heads, kv_len), jnp.float32),
    }
    for name, (array, shape, dtype) in expected.items():
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"{name} must be {jnp.dtype(dtype).name} {shape}, got {array.dtype} {array.shape}")
    if block_q <= 0 or q_len % block_q:
        raise ValueError(f"q length {q_len} must be a positive multiple of block_q {block_q} (pad it)")
    if block_k <= 0 or kv_len % block_k:
        raise ValueError(f"key length {kv_len} must be a positive multiple of block_k {block_k} (pad it)")
    if middle_end.shape != (q_heads, q_len // block_q) or middle_end.dtype != jnp.int32:
        raise ValueError(f"middle_end must be int32 [{q_heads}, {q_len // block_q}] (one end per q head and q "
                         f"block), got {middle_end.dtype} {middle_end.shape}")
    if not 0 <= middle_start <= kv_len:
        raise ValueError(f"middle_start {middle_start} must lie in [0, key length {kv_len}]")
    return batch, q_len, q_heads, head_dim, kv_len, kv_heads


def block_range(middle_end, *, block_k, middle_start, num_k_blocks):
    """[first, end) key blocks that are estimated, per q head and q block (end may be below first: nothing
    estimated)."""
    end = jnp.clip(middle_end // block_k, 0, num_k_blocks)
    return middle_start // block_k, end


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "middle_start"))
def estimate_margins_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *,
                               block_q: int, block_k: int, middle_start: int):
    """Best excess of each block, f32 [B, Hq, nQ, nK] (-inf where not estimated): the hit test is `margin > 0`.

    In f32 as the formula is written (the kernel's order differs, see the module docstring). One q block at a
    time, so long sequences fit.
    """
    batch, q_len, q_heads, head_dim, kv_len, kv_heads = check_inputs(
        q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, block_q=block_q,
        block_k=block_k, middle_start=middle_start)
    group = q_heads // kv_heads
    num_q_blocks, num_k_blocks = q_len // block_q, kv_len // block_k
    # Heads grouped as [Hkv, G] so each kv head is read in place, never repeated.
    q_blocks = q_codes.reshape(batch, num_q_blocks, block_q, kv_heads, group, head_dim).swapaxes(0, 1)
    row_factor = row_factor.reshape(batch, kv_heads, group, num_q_blocks, block_q)
    row_threshold = row_threshold.reshape(batch, kv_heads, group, num_q_blocks, block_q)
    column_bias = column_bias.reshape(batch, kv_heads, group, kv_len)

    def one_q_block(args):
        q, factor, threshold = args  # [B, rows, Hkv, G, D], [B, Hkv, G, rows] twice
        dots = jnp.einsum("brkgd,bskd->bkgrs", q.astype(jnp.int8), k_codes.astype(jnp.int8),
                          preferred_element_type=jnp.int32)
        excess = k_scale[:, :, None, None, :] * dots.astype(jnp.float32) + (
            column_bias[:, :, :, None, :] * factor[..., None] - threshold[..., None])
        return jnp.max(excess.reshape(*excess.shape[:4], num_k_blocks, block_k), axis=(3, 5))

    best = jax.lax.map(one_q_block, (q_blocks, jnp.moveaxis(row_factor, 3, 0), jnp.moveaxis(row_threshold, 3, 0)))
    best = jnp.moveaxis(best, 0, 3).reshape(batch, q_heads, num_q_blocks, num_k_blocks)
    first, end = block_range(middle_end, block_k=block_k, middle_start=middle_start, num_k_blocks=num_k_blocks)
    block_ids = jnp.arange(num_k_blocks)
    estimated = (block_ids >= first) & (block_ids < end[..., None])  # [Hq, nQ, nK]
    return jnp.where(estimated[None], best, -jnp.inf)


def estimate_hits_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end, *,
                            block_q: int, block_k: int, middle_start: int):
    """Plain-jnp `hits` int8 [B, Hq, nQ, nK]: what `estimate_hits` computes."""
    margins = estimate_margins_reference(q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias,
                                         middle_end, block_q=block_q, block_k=block_k, middle_start=middle_start)
    return (margins > 0).astype(FLAG_DTYPE)
