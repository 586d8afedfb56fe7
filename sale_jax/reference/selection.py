"""Pass 2: exact sink-local statistics, low-bit score estimates and the per-block relative-score test
(docs/algorithm.md, sections 4 and 5). One query block's scores at a time, so it runs at 32K tokens on a CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid, BlockLayout
from sale_jax.ops import estimated_q_codes, grouped_scores, pad_axis
from sale_jax.reference.common import q_block_visibility
from sale_jax.reference.quantize import QuantizedQK, quantize_reference


def select_blocks_reference(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig,
                            means: tuple[jax.Array, jax.Array] | None = None) -> BlockLayout:
    """Kept key blocks per (batch, q head, q block): sink + local + middle blocks where some visible
    `exp(shat - m) / l > tau`; every visible block for heads with `tau <= 0`. `means`: the smoothing means, when
    this call is a query chunk of a longer one (`quantize_reference`)."""
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    always_kept, margins = selection_margins_reference(q, k, tau, config, means=means)
    return BlockLayout.from_mask(always_kept | (margins > 0), grid)


def selection_margins_reference(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig,
                                estimator: str = "int4", means: tuple[jax.Array, jax.Array] | None = None
                                ) -> tuple[jax.Array, jax.Array]:
    """The selection up to its decision: bool `[B, Hq, nQ, nK]` of visible sink and local blocks, and f32
    `[B, Hq, nQ, nK]` of each block's best `shat_ij - (m_i + log(tau * l_i))` over its visible pairs (-inf where
    nothing is visible, +inf for dense heads). A middle block is kept iff its margin is > 0; kernels that round
    differently may only disagree where the margin is near 0.

    `estimator="exact"` replaces the 4-bit estimate by the exact scores (the paper's "without QK quant" ablation).
    """
    if estimator not in ("int4", "exact"):
        raise ValueError(f"estimator must be 'int4' or 'exact', got {estimator!r}")
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    quant = quantize_reference(q, k, granularity=config.quant_granularity, block_q=config.block_q,
                               block_k=config.block_k, means=means)
    quant = quant._replace(q_codes=estimated_q_codes(quant.q_codes, config.estimate))
    return block_margins(q, quant, tau, grid, config, config.softmax_scale(q.shape[-1]), estimator == "exact")


def block_margins(q, quant: QuantizedQK, tau, grid: BlockGrid, config: SaleConfig, scale: float,
                  exact_estimate: bool):
    """`selection_margins_reference` from already quantized q and k: the exact statistics read `q` and
    `quant.k_smooth`, the estimate reads `quant`'s codes, scales and column bias (so a study can swap in another
    estimate's codes and keep the statistics exact)."""
    bq, bk, nk = grid.block_q, grid.block_k, grid.num_k_blocks
    group = q.shape[2] // quant.k_codes.shape[2]
    q_rows = pad_axis(q, 1, bq)
    q_codes = pad_axis(quant.q_codes, 1, bq).astype(jnp.float32)
    q_scale = pad_axis(quant.q_scale, 1, bq)
    k_smooth = pad_axis(quant.k_smooth, 1, bk)
    k_codes = pad_axis(quant.k_codes, 1, bk).astype(jnp.float32)
    k_scale = jnp.repeat(pad_axis(quant.k_scale, 1, bk), group, axis=2).transpose(0, 2, 1)  # [B, Hq, S_pad]
    column_bias = pad_axis(quant.column_bias, 2, bk)

    always_kept_blocks = jnp.asarray(grid.regions(config.sink_tokens, config.local_tokens).always_kept)
    log_tau = jnp.where(tau > 0, jnp.log(jnp.where(tau > 0, tau, 1.0)), -jnp.inf)[:, None]  # -inf: dense head

    def margins_for_q_block(q_block):
        visible, row_is_real = q_block_visibility(grid, q_block)
        always_kept = always_kept_blocks[q_block]  # [nK]: the sink and local blocks
        reference_pairs = visible & jnp.repeat(always_kept, bk)  # the statistics' (row, key) pairs

        def rows(x):
            return jax.lax.dynamic_slice_in_dim(x, q_block * bq, bq, axis=1)

        exact = scale * grouped_scores(rows(q_rows), k_smooth)  # [B, Hq, bq, S_pad]
        row_max = jnp.max(jnp.where(reference_pairs, exact, -jnp.inf), axis=-1)
        row_max = jnp.where(row_is_real, row_max, 0.0)  # padding rows see no key
        row_sum = jnp.sum(jnp.where(reference_pairs, jnp.exp(exact - row_max[..., None]), 0.0), axis=-1)
        threshold = row_max + log_tau + jnp.log(row_sum)

        if exact_estimate:
            estimate = exact
        else:
            code_dot = grouped_scores(rows(q_codes), k_codes)  # integers, exact in f32
            row_scale = rows(q_scale).transpose(0, 2, 1)[..., None]  # [B, Hq, bq, 1]
            estimate = scale * (row_scale * k_scale[:, :, None, :] * code_dot + column_bias[:, :, None, :])

        # estimate > threshold  <=>  estimate - threshold > 0 for finite IEEE floats.
        margin = jnp.where(visible, estimate - threshold[..., None], -jnp.inf)
        block_margin = margin.reshape(*margin.shape[:3], nk, bk).max(axis=(2, 4))  # [B, Hq, nK]
        return block_margin

    margins = jax.lax.map(margins_for_q_block, jnp.arange(grid.num_q_blocks)).transpose(1, 2, 0, 3)
    return jnp.broadcast_to(always_kept_blocks, margins.shape), margins
