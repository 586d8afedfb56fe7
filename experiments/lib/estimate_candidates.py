"""Cheaper stand-ins for SALE's 4-bit score estimate, measured by experiments/accuracy/estimate_candidates.py.

The rank-r candidates are a per-kv-head basis `[Hkv, D, r]` chosen offline on a calibration sample; q and k are
projected onto it, and the projections go through the project's own smoothing and 4-bit quantizer
(`quantize_reference`) and its own selection rule (`block_margins` of `sale_jax.reference.selection`). The
statistics (row max m and sum l over the sink and local blocks) stay exact over all D channels; only the
middle-block estimate is reduced.

  channel subset (Double Sparsity, arXiv 2408.07092): the r channels with the largest mean |q_c * ks_c|, taken in
      rotary pairs (c, c + D/2) so the reduced score, like the full one, depends on relative position only;
  joint Q-K basis (Loki, arXiv 2406.02542): the top r eigenvectors of the stacked second moments of q and of the
      smoothed k, each normalized to unit trace so neither dominates by scale.
  2:4 structured-sparse codes: no basis; each q (or k) code vector keeps the 2 largest of every 4 channels, the
      sparsity Hopper's sparse fp8 `wgmma` runs at twice the dense rate.

A certified bound uses either basis differently: not as a cheaper estimate but as a filter before the full one. With
P the projection onto an orthonormal basis, each code dot splits as `Pcq . Pck + P'cq . P'ck` (P' = 1 - P) and
Cauchy-Schwarz bounds the second term by `|P'cq| |P'ck|`, so a rank-(r + 1) dot bounds the full 4-bit estimate from
above. Tiles whose bound stays under the threshold cannot hold a kept block; only the others need the full estimate,
and the selection is the full estimate's exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sparse_wgmma
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockGrid
from sale_jax.reference.quantize import quantize_reference
from sale_jax.reference.selection import block_margins

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_rank(rank: int, head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary pairs, got {head_dim}")
    if not 0 < rank <= head_dim or rank % 2:
        raise ValueError(f"rank must be even and in (0, head_dim={head_dim}], got {rank}")


def rotary_partner(head_dim: int) -> jax.Array:
    """The channel each channel rotates with under `experiments.lib.workloads.rotate` (half-split: c and c + D/2)."""
    return (jnp.arange(head_dim) + head_dim // 2) % head_dim


def _group_mean(x: jax.Array, kv_heads: int) -> jax.Array:
    """`[Hq, ...]` -> `[Hkv, ...]`: the mean over each kv head's group of q heads."""
    return x.reshape(kv_heads, x.shape[0] // kv_heads, *x.shape[1:]).mean(axis=1)


def channel_subset_basis(q: jax.Array, k: jax.Array, rank: int) -> jax.Array:
    """f32 `[Hkv, D, rank]` 0/1 columns picking, per kv head, the `rank / 2` rotary pairs with the largest
    mean |q_c| * mean |ks_c| (= mean over all (query, key) pairs of |q_c ks_c|; ks: k minus its mean, which the
    score does not depend on) summed over the pair. Channels come out in increasing order."""
    head_dim, kv_heads = q.shape[-1], k.shape[2]
    _check_rank(rank, head_dim)
    q_abs = _group_mean(jnp.mean(jnp.abs(q.astype(jnp.float32)), axis=(0, 1)), kv_heads)  # [Hkv, D]
    k32 = k.astype(jnp.float32)
    k_abs = jnp.mean(jnp.abs(k32 - k32.mean(axis=1, keepdims=True)), axis=(0, 1))  # [Hkv, D]
    importance = q_abs * k_abs
    half = head_dim // 2
    pairs = jnp.argsort(-(importance[:, :half] + importance[:, half:]), axis=-1)[:, :rank // 2]
    channels = jnp.sort(jnp.concatenate([pairs, pairs + half], axis=-1), axis=-1)  # [Hkv, rank]
    return jax.nn.one_hot(channels, head_dim, dtype=jnp.float32).transpose(0, 2, 1)


def joint_pca_basis(q: jax.Array, k: jax.Array, rank: int) -> jax.Array:
    """f32 `[Hkv, D, rank]` orthonormal columns per kv head: the top `rank` eigenvectors (largest first) of
    `Mq / tr Mq + Mk / tr Mk`, Mq the second moment of the group's queries, Mk that of the smoothed keys."""
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    _check_rank(rank, head_dim)
    grouped = q.astype(jnp.float32).reshape(batch, length, kv_heads, q_heads // kv_heads, head_dim)
    m_q = jnp.einsum("btkgd,btkge->kde", grouped, grouped, precision=_HIGHEST)
    k32 = k.astype(jnp.float32)
    k_smooth = k32 - k32.mean(axis=1, keepdims=True)
    m_k = jnp.einsum("bskd,bske->kde", k_smooth, k_smooth, precision=_HIGHEST)

    def unit_trace(m):
        return m / jnp.trace(m, axis1=1, axis2=2)[:, None, None]

    _, vectors = jnp.linalg.eigh(unit_trace(m_q) + unit_trace(m_k))  # eigenvalues ascending
    return vectors[..., ::-1][..., :rank]


def project(x: jax.Array, basis: jax.Array) -> jax.Array:
    """`x: [B, L, H, D]` onto `basis: [Hkv, D, r]` -> f32 `[B, L, H, r]`; head h uses kv head h // (H / Hkv)."""
    per_head = jnp.repeat(basis, x.shape[2] // basis.shape[0], axis=0)
    return jnp.einsum("blhd,hdr->blhr", x.astype(jnp.float32), per_head, precision=_HIGHEST)


def _quantize(q: jax.Array, k: jax.Array, config: SaleConfig):
    """The full estimate's smoothing and 4-bit codes of `q` and `k` under `config`."""
    return quantize_reference(q, k, granularity=config.quant_granularity, block_q=config.block_q,
                              block_k=config.block_k)


def _margins_at_tau_one(q: jax.Array, k: jax.Array, quant, config: SaleConfig) -> jax.Array:
    """`block_margins` at tau = 1 of the estimate `quant` stands for, with the exact statistics of `q` and
    `quant.k_smooth`."""
    grid = BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    ones = jnp.ones((q.shape[2],), jnp.float32)
    return block_margins(q, quant, ones, grid, config, config.softmax_scale(q.shape[-1]), False)[1]


def reduced_margins(q: jax.Array, k: jax.Array, basis: jax.Array, config: SaleConfig) -> jax.Array:
    """f32 `[B, Hq, nQ, nK]` block margins at tau = 1 (see `selection_margins_reference`) with the 4-bit estimate
    of the projected q and k in place of the full one: a middle block is kept at tau iff its margin > log tau."""
    reduced = _quantize(project(q, basis), project(k, basis), config)
    # The exact statistics read the full smoothed keys; codes, scales and column bias are the reduced ones.
    return _margins_at_tau_one(q, k, reduced._replace(k_smooth=_quantize(q, k, config).k_smooth), config)


def outside_basis(basis: jax.Array):
    """For `adversarial_needle_keys`: the part of each needle row's own query orthogonal to `basis`."""
    def dropped(own):
        per_head = jnp.repeat(basis, own.shape[1] // basis.shape[0], axis=0)  # [Hq, D, r]
        return own - jnp.einsum("bhnd,hdr,her->bhne", own, per_head, per_head, precision=_HIGHEST)
    return dropped


def structured_sparse_margins(q: jax.Array, k: jax.Array, config: SaleConfig, operand: str) -> jax.Array:
    """Block margins at tau = 1 (as `reduced_margins`) with the 4-bit codes of `operand` ("q" or "k") pruned to
    2:4 (`sparse_wgmma.prune`, the sparse tensor cores' operand); statistics, scales and column bias as the full
    estimate's."""
    if operand not in ("q", "k"):
        raise ValueError(f"operand must be 'q' or 'k', got {operand!r}")
    quant = _quantize(q, k, config)
    field = f"{operand}_codes"
    return _margins_at_tau_one(q, k, quant._replace(**{field: sparse_wgmma.prune(getattr(quant, field))}),
                               config)


def outside_structured_sparse(q: jax.Array, k: jax.Array, needle_rows: jax.Array, config: SaleConfig):
    """For `adversarial_needle_keys`: each needle row's own query in the channels that 2:4 pruning of its q codes
    zeroes."""
    pruned = sparse_wgmma.prune(_quantize(q, k, config).q_codes) == 0  # [B, L, Hq, D]
    b_idx = jnp.arange(q.shape[0])[:, None, None]
    h_idx = jnp.broadcast_to(jnp.arange(q.shape[2])[None, :, None], needle_rows.shape)
    at_needles = pruned[b_idx, needle_rows, h_idx]  # [B, Hq, N, D]
    return lambda own: jnp.where(at_needles, own, 0.0)


def adversarial_needle_keys(q: jax.Array, k: jax.Array, needle_rows: jax.Array, needle_keys: jax.Array,
                            dropped_of, strength: float, scale: float) -> jax.Array:
    """`k` with a needle planted at each (row, key) of `needle_rows`/`needle_keys` (`[B, Hq, N]`) entirely in what
    a reduced estimate drops: the key moves along `dropped_of(own)` (`outside_basis`, `outside_structured_sparse`;
    own: the row's query minus the head's mean query, `[B, Hq, N, D]`) by enough to raise its score by `strength`
    times the row's log-sum-exp gap (`strength=1` gives the needle about half of the row's attention, as
    `llm_like_qkv`'s needles)."""
    batch, _, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    b_idx = jnp.arange(batch)[:, None, None]
    h_idx = jnp.broadcast_to(jnp.arange(q_heads)[None, :, None], needle_rows.shape)
    needle_q = q32[b_idx, needle_rows, h_idx]  # [B, Hq, N, D]
    dropped = dropped_of(needle_q - jnp.mean(q32, axis=1)[:, :, None, :])
    grouped_q = needle_q.reshape(batch, kv_heads, group, *needle_rows.shape[-1:], head_dim)
    row_scores = scale * jnp.einsum("bkgnd,bskd->bkgns", grouped_q, k32, precision=_HIGHEST).reshape(
        batch, q_heads, needle_rows.shape[-1], k.shape[1])
    q_pos = needle_rows + (k.shape[1] - q.shape[1])
    visible = jnp.arange(k.shape[1]) <= q_pos[..., None]
    row_lse = jax.nn.logsumexp(jnp.where(visible, row_scores, -jnp.inf), axis=-1)
    current = jnp.take_along_axis(row_scores, needle_keys[..., None], axis=-1)[..., 0]
    raise_by = strength * jnp.maximum(row_lse - current, 0.0)[..., None]
    delta = raise_by / scale * dropped / jnp.sum(needle_q * dropped, axis=-1, keepdims=True)
    return k32.at[b_idx, needle_keys, h_idx // group].add(delta).astype(k.dtype)


def certified_bound_margins(q: jax.Array, k: jax.Array, basis: jax.Array, config: SaleConfig) -> jax.Array:
    """f32 `[B, Hq, nQ, nK]` upper bounds on the full 4-bit estimate's block margins at tau = 1
    (`selection_margins_reference`): each code dot replaced by `Pcq . Pck + |P'cq| |P'ck|`, with P the projection
    onto `basis` (orthonormal columns) and P' its complement. A middle block whose bound is <= log tau is one the
    full estimate drops at tau."""
    full = _quantize(q, k, config)

    def bound_codes(codes):
        """`[Pc, |P'c|]`: the projected codes and the norm of what the projection drops."""
        codes = codes.astype(jnp.float32)
        projected = project(codes, basis)
        dropped = jnp.sum(codes * codes, axis=-1) - jnp.sum(projected * projected, axis=-1)
        return jnp.concatenate([projected, jnp.sqrt(jnp.maximum(dropped, 0.0))[..., None]], axis=-1)

    return _margins_at_tau_one(q, k, full._replace(q_codes=bound_codes(full.q_codes),
                                                   k_codes=bound_codes(full.k_codes)), config)


def tiles_needing_estimate(bound_margins: np.ndarray, middle: np.ndarray, log_tau: float,
                           blocks_per_tile: int) -> float:
    """Of the key tiles (`blocks_per_tile` key blocks of one query block and head) that hold a middle block, the
    fraction whose bound exceeds `log_tau` somewhere among their middle blocks: the tiles a filtered estimate still
    scores in full."""
    def tiled(mask):
        padding = [(0, 0)] * (mask.ndim - 1) + [(0, -mask.shape[-1] % blocks_per_tile)]
        padded = np.pad(mask, padding)
        return padded.reshape(*padded.shape[:-1], -1, blocks_per_tile).any(axis=-1)

    middle = np.broadcast_to(middle, bound_margins.shape)
    return float(tiled((bound_margins > log_tau) & middle).sum() / max(tiled(middle).sum(), 1))
