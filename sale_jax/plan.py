"""A call's plan: how one public call runs, resolved once from its shapes, JAX's default device and its
`SaleConfig`, then handed to everything below it (the jitted passes and the kernel backends), which derive none of
it again."""

from __future__ import annotations

import dataclasses

from sale_jax import tuning
from sale_jax.backends import KERNEL_MODULES
from sale_jax.config import SaleConfig
from sale_jax.tuning import KernelTuning


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """Static (hashable), so the jitted passes take it as a static argument.

    Attributes:
      backend: `"reference"`, `"triton"` or `"mosaic_gpu"`: what runs. An `auto` config resolves to the device's
        (`SaleConfig.resolved_backend`), narrowed from `mosaic_gpu` to `triton` where the Mosaic GPU kernels do not
        take the call's shapes or block sizes; an explicit choice is kept.
      tuning: the launch table the backend runs with on this device (`sale_jax.tuning`).
      dense: whether `sale_attention` runs dense attention: keys shorter than the resolved `dense_below`.
      query_chunks: the `[start, stop)` query rows of each chunk `sale_attention` runs; one for the whole call
        unless it runs SALE on more queries than `SaleConfig.resolved_query_chunk`.
    """

    backend: str
    tuning: KernelTuning
    dense: bool
    query_chunks: tuple[tuple[int, int], ...]


def plan_call(q, k, config: SaleConfig) -> CallPlan:
    """The plan of a call on queries `q [B, T, Hq, D]` and keys `k [B, S, Hkv, D]` (arrays or
    `jax.ShapeDtypeStruct`s: shapes suffice). A kernel backend named explicitly that cannot take the call is refused
    here, with the backend's own message of what it accepts."""
    backend = config.resolved_backend()
    if backend in KERNEL_MODULES:
        reason = KERNEL_MODULES[backend].unsupported(q, k, config)
        if reason is not None and config.backend == "auto" and backend == "mosaic_gpu":
            backend = "triton"
            reason = KERNEL_MODULES[backend].unsupported(q, k, config)
        if reason is not None:
            raise ValueError(reason)
    table = tuning.for_backend(backend)
    batch, q_len, q_heads = q.shape[:3]
    kv_len = k.shape[1]
    dense = kv_len < config.resolved_dense_below(backend, table)
    chunk = q_len if dense else config.resolved_query_chunk(batch, q_heads, kv_len)
    chunks = tuple((start, min(start + chunk, q_len)) for start in range(0, q_len, chunk))
    return CallPlan(backend=backend, tuning=table, dense=dense, query_chunks=chunks)
