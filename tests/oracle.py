"""An independent float64 numpy statement of SALE_SPEC, written from the spec, not from the implementation.

Every function works on one (batch element, q head) at a time with plain loops and float64, so that it shares no
code path (padding, packing, vectorization) with `sale_jax`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# A code whose f64 ratio lies within this of a rounding tie may legitimately differ by one in f32 arithmetic.
TIE_TOLERANCE = 1e-4
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def as_f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def keeps_every_visible_block(layout) -> bool:
    """Counted in integers: `layout.density()` divides in f32, which need not give exactly 1.0 on a GPU."""
    return bool((np.asarray(layout.counts) == layout.grid.visible_counts).all())


def round_to(x: np.ndarray, dtype_name: str) -> np.ndarray:
    return x.astype(NUMPY_DTYPES[dtype_name]).astype(np.float64)


def quantize(x: np.ndarray, group: int | None):
    """x: [L, D] smoothed f64 -> codes, per-row scales, and which codes sit within TIE_TOLERANCE of a tie."""
    amax = np.abs(x).max(axis=1)
    if group is not None:
        for start in range(0, len(amax), group):
            amax[start:start + group] = amax[start:start + group].max()
    scale = np.where(amax == 0, 1.0, amax / 7)
    ratio = x / scale[:, None]
    codes = np.clip(np.round(ratio), -7, 7)
    near_tie = (np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < TIE_TOLERANCE) & (np.abs(ratio) < 7.5)
    return codes, scale, near_tie


def positions(q_len: int, kv_len: int) -> np.ndarray:
    return np.arange(q_len) + (kv_len - q_len)


def region_blocks(q_len, kv_len, bq, bk, sink, local):
    """bool [nQ, nK] visible, and bool [nQ, nK] sink-or-local, straight from SALE_SPEC section 2."""
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    pos = positions(q_len, kv_len)
    visible = np.zeros((nq, nk), bool)
    always = np.zeros((nq, nk), bool)
    for qb in range(nq):
        p_first, p_last = pos[qb * bq], pos[min((qb + 1) * bq, q_len) - 1]
        for kb in range(nk):
            lo, hi = kb * bk, min((kb + 1) * bk, kv_len) - 1
            visible[qb, kb] = lo <= p_last
            is_sink = lo < sink
            is_local = hi >= p_first - local + 1 and lo <= p_last
            always[qb, kb] = visible[qb, kb] and (is_sink or is_local)
    return visible, always


def selection(q, k, tau, *, bq, bk, sink, local, granularity, scale, dtype_name, margin, exact_estimate=False):
    """Returns (surely_kept, maybe_kept), bool [B, Hq, nQ, nK].

    A middle block is surely kept when some visible pair beats the threshold by more than `margin` even if every
    near-tie code were off by one, and maybe kept unless every pair falls short by more than `margin`.
    With `exact_estimate`, the estimate is the exact score itself (SALE without QK quantization).
    """
    q, k = as_f64(q), as_f64(k)
    batch, q_len, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    visible_blocks, always = region_blocks(q_len, kv_len, bq, bk, sink, local)
    nq, nk = visible_blocks.shape
    pos = positions(q_len, kv_len)
    visible = np.arange(kv_len)[None, :] <= pos[:, None]
    key_block = np.arange(kv_len) // bk
    q_block = np.arange(q_len) // bq
    reference_pairs = visible & always[q_block][:, key_block]
    surely = np.zeros((batch, q_heads, nq, nk), bool)
    maybe = np.zeros_like(surely)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            q_mean, k_mean = q[b, :, h].mean(0), k[b, :, kv].mean(0)
            qs, ks = q[b, :, h] - q_mean, k[b, :, kv] - k_mean
            qc, sq, q_tie = quantize(qs, bq if granularity == "per_block" else None)
            kc, sk, k_tie = quantize(ks, bk if granularity == "per_block" else None)
            column = ks @ q_mean
            exact = scale * (q[b, :, h] @ round_to(ks, dtype_name).T)
            masked = np.where(reference_pairs, exact, -np.inf)
            m = masked.max(1)
            l = np.exp(masked - m[:, None]).sum(1)
            if exact_estimate:
                estimate, uncertainty = exact, 0.0
            else:
                estimate = scale * (sq[:, None] * sk[None, :] * (qc @ kc.T) + column[None, :])
                flips = q_tie @ (np.abs(kc) + k_tie).T + np.abs(qc) @ k_tie.T
                uncertainty = scale * sq[:, None] * sk[None, :] * flips
            if tau[h] > 0:
                threshold = (m + np.log(tau[h] * l))[:, None]
                sure_pairs = visible & (estimate - uncertainty > threshold + margin)
                maybe_pairs = visible & (estimate + uncertainty > threshold - margin)
            else:
                sure_pairs = maybe_pairs = visible
            for name, pairs in (("sure", sure_pairs), ("maybe", maybe_pairs)):
                hit = np.zeros((nq, nk), bool)
                np.logical_or.at(hit, (q_block[:, None].repeat(kv_len, 1), key_block[None, :].repeat(q_len, 0)), pairs)
                kept = visible_blocks & (always | hit)
                (surely if name == "sure" else maybe)[b, h] = kept
    return surely, maybe


def attention(q, k, v, block_mask, *, bq, bk, scale):
    """Causal softmax over the keys of kept blocks, f64. Returns out [B, T, Hq, D] and lse [B, Hq, T]."""
    q, k, v = as_f64(q), as_f64(k), as_f64(v)
    batch, q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    pos = positions(q_len, kv_len)
    visible = np.arange(kv_len)[None, :] <= pos[:, None]
    out = np.zeros((batch, q_len, q_heads, head_dim))
    lse = np.full((batch, q_heads, q_len), -np.inf)
    for b in range(batch):
        for h in range(q_heads):
            kept = block_mask[b, h][np.arange(q_len) // bq][:, np.arange(kv_len) // bk]
            allowed = visible & kept
            scores = np.where(allowed, scale * (q[b, :, h] @ k[b, :, h // group].T), -np.inf)
            m = scores.max(1)
            has_key = np.isfinite(m)
            weights = np.where(allowed, np.exp(scores - np.where(has_key, m, 0)[:, None]), 0)
            l = weights.sum(1)
            safe_l = np.where(has_key, l, 1)
            out[b, :, h] = np.where(has_key[:, None], (weights @ v[b, :, h // group]) / safe_l[:, None], 0)
            lse[b, h] = np.where(has_key, m + np.log(safe_l), -np.inf)
    return out, lse
