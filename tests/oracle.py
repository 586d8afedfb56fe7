"""An independent float64 numpy statement of the algorithm (docs/algorithm.md), written from it, not from the
implementation, with the interval that rounding in the implementation's arithmetic can explain.

Every function works on one (batch element, q head) at a time with plain loops and float64, so that it shares no
code path (padding, packing, vectorization) with `sale_jax`.

The backends compute the selection in f32 from inputs in their dtype: smoothing, scales and the column bias in f32,
the smoothed keys rounded back to the input dtype for the exact scores, which are f32 dot products. The bounds
below follow each of those operations (Higham's bound for a sum of n f32 terms, `gamma(n)`), so a block decided
outside them is a bug, and one inside them is undecided rather than passed by a tolerance picked by trial.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# f32's relative spacing, twice its unit roundoff: it bounds one f32 operation even where a backend rounds by
# truncation (tensor-core accumulation) or is off by one ulp (approximate division).
F32_ULP = 2.0 ** -23
# Relative error of a backend's exp and log (XLA's and Triton's are within a few f32 ulps).
TRANSCENDENTAL_ERROR = 2.0 ** -20
# Relative precision of the operands of the final comparison: the Mosaic GPU estimate carries its per-row and
# per-key offsets as two tf32 halves, to about 2**-20 (pallas_kernels/mosaic_estimate.py); the others keep f32.
OPERAND_PRECISION = 2.0 ** -20


def as_f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def keeps_every_visible_block(layout) -> bool:
    """Counted in integers: `layout.density()` divides in f32, which need not give exactly 1.0 on a GPU."""
    return bool((np.asarray(layout.counts) == layout.grid.visible_counts).all())


def round_to(x: np.ndarray, dtype_name: str) -> np.ndarray:
    return x.astype(NUMPY_DTYPES[dtype_name]).astype(np.float64)


def gamma(n: int) -> float:
    """Bound on the relative error of an n-term f32 sum or dot product (any order of summation)."""
    return n * F32_ULP / (1 - n * F32_ULP)


def mean(x: np.ndarray):
    """Column means of x [L, D] and a bound on how far an f32 mean (a sum, then a division) lies from them."""
    return x.mean(0), gamma(len(x) + 1) * np.abs(x).mean(0)


def smooth(x: np.ndarray):
    """x [L, D] minus its column means, and a bound on how far f32's smoothed values lie from it."""
    x_mean, mean_error = mean(x)
    smoothed = x - x_mean
    return smoothed, mean_error + F32_ULP * (np.abs(smoothed) + mean_error)


def _group_max(values: np.ndarray, group: int | None) -> np.ndarray:
    """Row maxima of [L, D], each shared by its `group` rows (per-block granularity) or per row (None)."""
    row_max = values.max(axis=1)
    if group is not None:
        for start in range(0, len(row_max), group):
            row_max[start:start + group] = row_max[start:start + group].max()
    return row_max


def quantize(x: np.ndarray, error: np.ndarray, group: int | None):
    """x: [L, D] smoothed f64, within `error` of f32's smoothed values -> codes, per-row scales, the scales'
    relative error bound in f32, and which codes f32 may round the other way (ratio within its error of a tie)."""
    amax = _group_max(np.abs(x), group)
    scale = np.where(amax == 0, 1.0, amax / 7)
    scale_error = np.where(amax == 0, 0.0, _group_max(error, group) / np.where(amax == 0, 1.0, amax)) + 2 * F32_ULP
    ratio = x / scale[:, None]
    ratio_error = (error + np.abs(x) * scale_error[:, None]) / (scale[:, None] * (1 - scale_error[:, None]))
    ratio_error += F32_ULP * np.abs(ratio)
    codes = np.clip(np.round(ratio), -7, 7)
    near_tie = (np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) <= ratio_error) & (np.abs(ratio) < 7.5)
    return codes, scale, scale_error, near_tie


def rounding_shift(x: np.ndarray, error: np.ndarray, dtype_name: str) -> np.ndarray:
    """Bound on how far `dtype_name`'s rounding of a value within `error` of x lies from its rounding of x:
    0 where no rounding boundary lies that close, else `error` plus one spacing of the dtype."""
    lo, hi = round_to(x - error, dtype_name), round_to(x + error, dtype_name)
    info = ml_dtypes.finfo(NUMPY_DTYPES[dtype_name])
    spacing = 2.0 ** -info.nmant * np.maximum(np.abs(lo), np.abs(hi)) + float(info.smallest_subnormal)
    return np.where(lo == hi, 0.0, error + spacing)


def positions(q_len: int, kv_len: int) -> np.ndarray:
    return np.arange(q_len) + (kv_len - q_len)


def region_blocks(q_len, kv_len, bq, bk, sink, local):
    """bool [nQ, nK] visible, and bool [nQ, nK] sink-or-local, straight from the algorithm's region rule."""
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


def selection(q, k, tau, *, bq, bk, sink, local, granularity, scale, dtype_name, exact_estimate=False):
    """Returns (surely_kept, maybe_kept), bool [B, Hq, nQ, nK].

    A middle block is surely kept when some visible pair beats the threshold by more than the pair's rounding
    bound (with every near-tie code off by one), and maybe kept unless every pair falls short by more than it.
    With `exact_estimate`, the estimate is the exact score itself (SALE without QK quantization).
    """
    q, k = as_f64(q), as_f64(k)
    batch, q_len, q_heads, head_dim = q.shape
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
            rows = q[b, :, h]
            q_mean, q_mean_error = mean(rows)
            qs, q_error = smooth(rows)
            ks, k_error = smooth(k[b, :, kv])
            # Exact scores: f32 dots of the queries with the smoothed keys rounded to the input dtype.
            rounded_keys = round_to(ks, dtype_name)
            key_shift = rounding_shift(ks, k_error, dtype_name)
            exact = scale * (rows @ rounded_keys.T)
            exact_error = scale * (np.abs(rows) @ key_shift.T
                                   + gamma(head_dim) * (np.abs(rows) @ (np.abs(rounded_keys) + key_shift).T))
            exact_error += F32_ULP * np.abs(exact)
            # Threshold: the log-sum-exp moves by at most its scores' largest error; then exp, sum, log and adds.
            masked = np.where(reference_pairs, exact, -np.inf)
            m = masked.max(1)
            l = np.exp(masked - m[:, None]).sum(1)
            log_tau = np.log(tau[h]) if tau[h] > 0 else 0.0
            threshold = m + log_tau + np.log(l)
            threshold_error = np.where(reference_pairs, exact_error, 0.0).max(1)
            threshold_error += (reference_pairs.sum(1) + 2) * (F32_ULP + TRANSCENDENTAL_ERROR)
            threshold_error += (F32_ULP + TRANSCENDENTAL_ERROR) * (np.abs(m) + abs(log_tau) + np.abs(np.log(l)))
            if exact_estimate:
                estimate, estimate_error = exact, exact_error
                operands = np.abs(exact)
            else:
                qc, sq, sq_error, q_tie = quantize(qs, q_error, bq if granularity == "per_block" else None)
                kc, sk, sk_error, k_tie = quantize(ks, k_error, bk if granularity == "per_block" else None)
                codes = scale * sq[:, None] * sk[None, :] * (qc @ kc.T)
                column = scale * (ks @ q_mean)
                column_error = scale * (np.abs(ks) @ q_mean_error + k_error @ np.abs(q_mean)
                                        + gamma(head_dim) * (np.abs(ks) + k_error) @ (np.abs(q_mean) + q_mean_error))
                estimate = codes + column[None, :]
                flips = q_tie @ (np.abs(kc) + k_tie).T + np.abs(qc) @ k_tie.T
                estimate_error = (scale * sq[:, None] * sk[None, :] * flips
                                  + np.abs(codes) * (sq_error[:, None] + sk_error[None, :] + 2 * F32_ULP)
                                  + column_error[None, :])
                operands = np.abs(codes) + np.abs(column)[None, :]
            comparison_error = 2 * OPERAND_PRECISION * (np.abs(threshold)[:, None] + operands)
            bound = estimate_error + threshold_error[:, None] + comparison_error
            if tau[h] > 0:
                sure_pairs = visible & (estimate - bound > threshold[:, None])
                maybe_pairs = visible & (estimate + bound > threshold[:, None])
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
