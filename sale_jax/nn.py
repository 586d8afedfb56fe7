"""SALE behind `jax.nn.dot_product_attention`'s signature: a one-line swap in an existing model.

    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = sale_jax.nn.dot_product_attention(q, k, v, is_causal=True, tau=thresholds.layer(i))

Same argument names, same layout (`query [B, T, N, H]`, `key, value [B, S, K, H]`, `N` a multiple of `K`), same
result where every block is kept. What SALE does not compute is refused with a `ValueError` naming the argument:
non-causal attention, `bias`, `mask`, `local_window_size`, `return_residual`, an `implementation` (the backend is
`SaleConfig.backend`), and queries shorter than the keys (`jax.nn` aligns a causal mask top-left, chunked prefill
bottom-right: use `sale_jax.sale_attention` for that). Ragged batches are right-padded self-attention: the rows at
or past `query_seq_lengths` are zeros, as `jax.nn` makes them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sale_jax.api import sale_attention
from sale_jax.config import SaleConfig
from sale_jax.thresholds import DEFAULT_TAU

_DEFAULT_CONFIG = SaleConfig()


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None,
                          mask: jax.Array | None = None, *, scale: float | None = None, is_causal: bool = False,
                          query_seq_lengths: jax.Array | None = None,
                          key_value_seq_lengths: jax.Array | None = None,
                          local_window_size: int | tuple[int, int] | None = None, implementation: str | None = None,
                          return_residual: bool = False, tau: jax.Array | float = DEFAULT_TAU,
                          config: SaleConfig = _DEFAULT_CONFIG, return_layout: bool = False):
    """Causal SALE attention with `jax.nn.dot_product_attention`'s arguments, plus the per-q-head thresholds `tau`
    (`f32[N]`, or one value for every head; 0 keeps every block) and the `config`. Returns the output `[B, T, N, H]`,
    and with `return_layout` also the `BlockLayout` of the blocks kept.

    `key_value_seq_lengths`, if given, must be the same array as `query_seq_lengths`: a right-padded batch of
    self-attention, where each row's visible keys already end before the padding.
    """
    refused = {"bias": bias is not None, "mask": mask is not None, "local_window_size": local_window_size is not None,
               "implementation": implementation is not None, "return_residual": bool(return_residual)}
    for name, given in refused.items():
        if given:
            raise ValueError(f"sale_jax.nn.dot_product_attention does not take {name}: SALE computes causal "
                             "attention with no bias, mask or window, on SaleConfig.backend, returning the output")
    if not is_causal:
        raise ValueError("sale_jax.nn.dot_product_attention computes causal attention only: pass is_causal=True")
    if query.ndim == 4 and key.ndim == 4 and query.shape[1] != key.shape[1]:
        raise ValueError(f"query length {query.shape[1]} differs from key length {key.shape[1]}: jax.nn's causal "
                         "mask is aligned top-left; for queries that are the last T of S keys (chunked prefill) "
                         "call sale_jax.sale_attention")
    if key_value_seq_lengths is not None and key_value_seq_lengths is not query_seq_lengths:
        raise ValueError("key_value_seq_lengths must be the same array as query_seq_lengths (right-padded "
                         "self-attention), or None")
    if scale is not None:
        if config.scale is not None and config.scale != scale:
            raise ValueError(f"scale={scale} disagrees with config.scale={config.scale}")
        config = dataclasses.replace(config, scale=scale)
    tau = jnp.asarray(tau, jnp.float32)
    if tau.ndim == 0 and query.ndim == 4:
        tau = jnp.full((query.shape[2],), tau)
    result = sale_attention(query, key, value, tau, config, return_layout=return_layout)
    out, layout = result if return_layout else (result, None)
    if query_seq_lengths is not None:
        lengths = jnp.asarray(query_seq_lengths)
        if lengths.shape != (query.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"query_seq_lengths must be int [batch] = ({query.shape[0]},), got {lengths.dtype} "
                             f"{lengths.shape}")
        valid = jnp.arange(query.shape[1])[None, :] < lengths[:, None]
        out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    return (out, layout) if return_layout else out
