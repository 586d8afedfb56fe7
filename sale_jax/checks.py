"""Input validation for the public API: clear errors naming what was wrong and what is accepted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sale_jax.layout import BlockGrid, BlockLayout
from sale_jax.thresholds import check_values

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_qkv(q, k, v) -> None:
    """Shapes `q: [B, T, Hq, D]`, `k, v: [B, S, Hkv, D]`, `T <= S`, `Hq % Hkv == 0`, one supported dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([batch, length, heads, head_dim]), got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: bfloat16, float16, float32")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    (batch, q_len, q_heads, head_dim), (kv_batch, kv_len, kv_heads, kv_dim) = q.shape, k.shape
    if batch != kv_batch:
        raise ValueError(f"batch sizes differ: q has {batch}, k/v have {kv_batch}")
    if head_dim != kv_dim:
        raise ValueError(f"head_dim differs: q has {head_dim}, k/v have {kv_dim}")
    if min(q_len, kv_len, q_heads, kv_heads, head_dim, batch) < 1:
        raise ValueError(f"every dimension must be >= 1, got q {q.shape}, k/v {k.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k/v heads ({kv_heads}) for grouped-query "
                         "attention")
    if q_len > kv_len:
        raise ValueError(f"query length {q_len} exceeds key length {kv_len}: queries must be the last T of the S keys")


def check_tau(tau, num_q_heads: int) -> jax.Array:
    """`tau: f32[Hq]`, each >= 0: 0 keeps every visible block (a dense head), inf only the sink and local blocks (a
    streaming head). Values are checked only when concrete."""
    if not hasattr(tau, "shape"):
        tau = np.asarray(tau)
    if tau.shape != (num_q_heads,):
        raise ValueError(f"tau must have shape [num_q_heads] = ({num_q_heads},), got {tuple(tau.shape)}")
    if not jnp.issubdtype(tau.dtype, jnp.floating):
        raise TypeError(f"tau must be a float array, got dtype {tau.dtype}")
    if not isinstance(tau, jax.core.Tracer):
        check_values(np.asarray(tau, np.float64), where="tau")
    return jnp.asarray(tau, jnp.float32)


def check_layout(layout, batch: int, num_q_heads: int, grid: BlockGrid) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if layout.grid != grid:
        raise ValueError(f"layout was made for {layout.grid}, but these inputs and config need {grid}")
    want_indices, want_counts = (batch, num_q_heads, grid.num_slots), (batch, num_q_heads, grid.num_q_blocks)
    if tuple(layout.indices.shape) != want_indices or tuple(layout.counts.shape) != want_counts:
        raise ValueError(f"layout arrays have shapes indices {tuple(layout.indices.shape)}, counts "
                         f"{tuple(layout.counts.shape)}; these inputs need {want_indices} and {want_counts}")
