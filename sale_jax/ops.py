"""Array operations the backends share: padding, grouped-query dots, and the smoothing means and column
correction that both the reference and the kernels' glue quantize around (so both see bit-identical means)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import sparse_wgmma

_HIGHEST = jax.lax.Precision.HIGHEST


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` of `x` up to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def grouped_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """`q: [B, R, Hq, D]` . `k: [B, S, Hkv, D]` -> f32 `[B, Hq, R, S]`; q head `h` reads kv head `h // (Hq/Hkv)`."""
    batch, rows, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, rows, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("brkgd,bskd->bkgrs", grouped, k, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return scores.reshape(batch, q_heads, rows, k.shape[1])


def grouped_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """`p: [B, Hq, R, S]` . `v: [B, S, Hkv, D]` -> f32 `[B, R, Hq, D]`."""
    batch, q_heads, rows, _ = p.shape
    kv_heads = v.shape[2]
    grouped = p.reshape(batch, kv_heads, q_heads // kv_heads, rows, p.shape[-1])
    out = jnp.einsum("bkgrs,bskd->brkgd", grouped, v, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return out.reshape(batch, rows, q_heads, v.shape[-1])


def smoothing_means(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 means over the sequence: `[B, 1, Hq, D]` of Q and `[B, 1, Hkv, D]` of K."""
    return jnp.mean(q.astype(jnp.float32), axis=1, keepdims=True), jnp.mean(k.astype(jnp.float32), axis=1,
                                                                              keepdims=True)


def column_bias(q_mean: jax.Array, k_smooth: jax.Array) -> jax.Array:
    """f32 `[B, Hq, S]`: `c_j = qbar . Ks_j` per q head, from `q_mean [B, 1, Hq, D]` and f32 `k_smooth`."""
    batch, _, q_heads, head_dim = q_mean.shape
    kv_heads = k_smooth.shape[2]
    grouped = q_mean.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    bias = jnp.einsum("bkgd,bskd->bkgs", grouped, k_smooth, precision=_HIGHEST)
    return bias.reshape(batch, q_heads, -1)


def estimated_q_codes(q_codes: jax.Array, estimate: str) -> jax.Array:
    """The q codes the selection's estimate multiplies under `SaleConfig.estimate`: all of them (`"full"`), or
    pruned to 2:4 (`"sparse_q"`, the rule `sparse_wgmma.compress` keeps for the sparse tensor cores)."""
    if estimate == "sparse_q":
        return sparse_wgmma.prune(q_codes)
    return q_codes
