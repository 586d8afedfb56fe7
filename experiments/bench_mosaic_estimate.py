"""Times the Mosaic GPU estimate kernel (pallas_kernels/mosaic_estimate.py) beside dense cuDNN attention.

    python -m experiments.bench_mosaic_estimate --output=experiments/results/bench_mosaic_estimate_h200/results.json

Inputs are random int8 codes in [-7, 7] with f32 factors, a sink of --sink_tokens keys and a local window of
--local_tokens keys per q block (the middle region between them is estimated). Each head's threshold is set from
the block margins of a small calibration problem so that about --hit_fraction of the estimated blocks hit. At the
smallest length the kernel's hits are checked against `estimate_hits_reference`: a flip is tolerated only where the
reference's best excess is within --flip_tolerance of zero (the kernel adds the offsets in another order, as
tf32 halves on the tensor cores). Then medians of --repeats timed calls after warm-up: the estimate kernel and, for
scale, `jax.nn.dot_product_attention(implementation="cudnn")` on bf16 q/k/v [1, L, Hq, D] / [1, L, Hkv, D], causal.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.timing import median_seconds
from pallas_kernels.mosaic_estimate import estimate_hits, estimate_margins_reference

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Sequence lengths (queries = keys).")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_BLOCK_Q = flags.DEFINE_integer("block_q", 128, "Query rows per CTA (64 or 128).")
_BLOCK_K = flags.DEFINE_integer("block_k", 32, "Keys per flag.")
_TILE_K = flags.DEFINE_integer("tile_k", 128, "Keys per wgmma (128 or 256; block_q * tile_k <= 16384).")
_STAGES = flags.DEFINE_integer("max_concurrent_steps", 2, "Key tiles in flight (TMA pipeline depth).")
_SINK = flags.DEFINE_integer("sink_tokens", 128, "Leading keys never estimated.")
_LOCAL = flags.DEFINE_integer("local_tokens", 1024, "Keys before each q block's diagonal never estimated.")
_HIT_FRACTION = flags.DEFINE_float("hit_fraction", 0.1, "Target fraction of estimated blocks that hit.")
_FLIP_TOLERANCE = flags.DEFINE_float("flip_tolerance", 1e-2, "Largest |reference margin| at which a flip is allowed.")
_CODES = flags.DEFINE_enum("codes", "float8_e4m3fn", ["int8", "float8_e4m3fn"],
                           "Code dtype passed in (the kernel multiplies fp8; int8 codes are cast first).")
_COMPUTE_WARPGROUPS = flags.DEFINE_integer(
    "compute_warpgroups", 1, "estimate_hits' compute_warpgroups: 2 splits a 128-row q block across two warpgroups "
    "fed by a TMA warpgroup (tiles up to 256 keys).")
_SKIP_CUDNN = flags.DEFINE_bool("skip_cudnn", False, "Time the estimate kernel alone.")
_OUTPUT = flags.DEFINE_string("output", "experiments/results/bench_mosaic_estimate_h200/results.json",
                              "JSON file for the results.")


def middle_end(length: int) -> np.ndarray:
    """Per q block, where its local window starts (queries = keys, so q block i ends at key (i + 1) * block_q)."""
    block_q, block_k = _BLOCK_Q.value, _BLOCK_K.value
    first_rows = np.arange(length // block_q) * block_q
    local_start = np.maximum(first_rows - _LOCAL.value + 1, 0) // block_k * block_k
    return np.maximum(local_start, _SINK.value).astype(np.int32)


def random_inputs(length: int, seed: int, thresholds: np.ndarray | None = None) -> tuple:
    """Codes and factors of one problem; row thresholds are `thresholds` [Hq] plus a small jitter (None: zero)."""
    rng = np.random.default_rng(seed)
    hq, hkv, d = _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    q_codes = rng.integers(-7, 8, (1, length, hq, d), dtype=np.int8)
    k_codes = rng.integers(-7, 8, (1, length, hkv, d), dtype=np.int8)
    row_factor = rng.uniform(0.5, 2.0, (1, hq, length)).astype(np.float32)
    k_scale = rng.uniform(0.5, 1.5, (1, hkv, length)).astype(np.float32) / np.sqrt(d)
    column_bias = rng.normal(0.0, 1.0, (1, hq, length)).astype(np.float32)
    if thresholds is None:
        row_threshold = np.zeros((1, hq, length), np.float32)
    else:
        row_threshold = (thresholds[None, :, None] + rng.normal(0.0, 0.1, (1, hq, length))).astype(np.float32)
    arrays = (q_codes, k_codes, row_factor, row_threshold, k_scale, column_bias, middle_end(length))
    arrays = tuple(jax.device_put(a) for a in arrays)
    return tuple(a.astype(_CODES.value) if a.dtype == jnp.int8 else a for a in arrays)


def calibrated_thresholds(length: int) -> np.ndarray:
    """Per head, the margin quantile (threshold 0) that leaves about --hit_fraction of the estimated blocks."""
    margins = np.asarray(estimate_margins_reference(*random_inputs(length, seed=1), **reference_knobs()))
    thresholds = []
    for head in range(margins.shape[1]):
        estimated = margins[:, head][np.isfinite(margins[:, head])]
        thresholds.append(np.quantile(estimated, 1.0 - _HIT_FRACTION.value) if estimated.size else 0.0)
    return np.asarray(thresholds, np.float32)


def reference_knobs() -> dict:
    return dict(block_q=_BLOCK_Q.value, block_k=_BLOCK_K.value, middle_start=_SINK.value)


def kernel_knobs() -> dict:
    return dict(reference_knobs(), tile_k=_TILE_K.value, max_concurrent_steps=_STAGES.value,
                compute_warpgroups=_COMPUTE_WARPGROUPS.value)


def check(inputs) -> dict:
    hits = np.asarray(estimate_hits(*inputs, **kernel_knobs()))
    margins = np.asarray(estimate_margins_reference(*inputs, **reference_knobs()))
    want = (margins > 0).astype(np.int32)
    flips = hits != want
    worst = float(np.max(np.abs(margins[flips]))) if flips.any() else 0.0
    result = {"blocks": int(hits.size), "estimated_blocks": int(np.isfinite(margins).sum()),
              "hit_fraction_of_estimated": float(want.sum() / max(np.isfinite(margins).sum(), 1)),
              "flips": int(flips.sum()), "worst_flip_margin": worst,
              "values_ok": bool(np.isin(hits, (0, 1)).all())}
    print(f"  check: {result}", flush=True)
    if not result["values_ok"] or worst > _FLIP_TOLERANCE.value:
        raise AssertionError(f"kernel hits differ from the reference beyond rounding: {result}")
    return result


def estimated_int8_ops(inputs) -> float:
    """Multiply-adds the kernel issues (whole tiles, masked blocks included), counted as 2 ops each."""
    middle_ends = np.asarray(inputs[6])
    block_k, tile_k = _BLOCK_K.value, _TILE_K.value
    first_tile = _SINK.value // block_k * block_k // tile_k
    tiles = np.maximum(-(-(middle_ends // block_k * block_k) // tile_k) - first_tile, 0).sum()
    return 2.0 * _Q_HEADS.value * _BLOCK_Q.value * tile_k * _HEAD_DIM.value * float(tiles)


def cudnn_inputs(length: int):
    keys = jax.random.split(jax.random.key(length), 3)
    hq, hkv, d = _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    q = jax.random.normal(keys[0], (1, length, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, hkv, d), jnp.bfloat16)
    return q, k, v


@jax.jit
def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def main(argv):
    del argv
    if jax.default_backend() != "gpu":
        raise SystemExit(f"bench_mosaic_estimate needs a Hopper GPU (Mosaic GPU kernel); the backend here is "
                         f"{jax.default_backend()!r}. Run it on an H100/H200.")
    lengths = sorted(int(n) for n in _LENGTHS.value)
    thresholds = calibrated_thresholds(min(4096, lengths[0]))
    print(f"device {jax.devices()[0].device_kind}; knobs {kernel_knobs()}, {_CODES.value} codes; thresholds "
          f"per head {np.round(thresholds[:4], 3).tolist()}...", flush=True)
    results = {"device": jax.devices()[0].device_kind, "knobs": kernel_knobs(), "codes": _CODES.value,
               "q_heads": _Q_HEADS.value, "kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value,
               "local_tokens": _LOCAL.value,
               "repeats": _REPEATS.value, "lengths": {}}
    for length in lengths:
        inputs = random_inputs(length, seed=length, thresholds=thresholds)
        entry = {}
        if length == lengths[0]:
            entry["check"] = check(inputs)
        seconds = median_seconds(lambda: estimate_hits(*inputs, **kernel_knobs()), _REPEATS.value)
        entry["estimate_ms"] = seconds * 1e3
        entry["estimate_int8_tops"] = estimated_int8_ops(inputs) / seconds / 1e12
        line = f"  {length:>7} estimate {seconds * 1e3:9.3f} ms ({entry['estimate_int8_tops']:.0f} int8 TOP/s)"
        if not _SKIP_CUDNN.value:
            q, k, v = cudnn_inputs(length)
            cudnn_seconds = median_seconds(lambda: cudnn_attention(q, k, v), _REPEATS.value)
            entry["cudnn_ms"] = cudnn_seconds * 1e3
            entry["estimate_over_cudnn"] = seconds / cudnn_seconds
            line += f"  cudnn {cudnn_seconds * 1e3:9.3f} ms  ratio {seconds / cudnn_seconds:.3f}"
        print(line, flush=True)
        results["lengths"][str(length)] = entry
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(_OUTPUT.value) or ".", exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
