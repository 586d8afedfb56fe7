r"""Times the Mosaic GPU estimate kernel (pallas_kernels/mosaic_estimate.py) beside dense attention.

    python -m experiments.benchmarks.estimate_kernel --lengths=32768,131072 --skip_dense \
        --compute_warpgroups=2 --tile_k=256 --max_concurrent_steps=3 \
        --output=experiments/results/estimate_kernel/h200/wg2_t256_s3.json

The roofline record: --launch=table takes each length's launch from the backend's tuning table (as
`sale_attention` runs it), and --variants times the kernel with its parts left out (experiments/lib/
estimate_variants.py) beside the fp8 dot's operations, its share of --fp8_peak_tops and an fp8 matrix product's
measured rate:

    python -m experiments.benchmarks.estimate_kernel --lengths=32768,65536,131072 --launch=table \
        --variants=kernel,no_epilogue,no_dots,no_offsets,pipeline_only --repeats=10 \
        --output=experiments/results/estimate_roofline/h200/full.json

Inputs are random int8 codes in [-7, 7] with f32 factors, a sink of --sink_tokens keys and a local window of
--local_tokens keys per q block (the middle region between them is estimated). Each head's threshold is set from
the block margins of a small calibration problem so that about --hit_fraction of the estimated blocks hit. At the
smallest length the kernel's hits are checked against `estimate_margins_reference`: a flip is tolerated only where
the reference's margin is within --flip_tolerance of zero (the kernel adds the offsets in another order, as tf32
halves on the tensor cores). Then medians of --repeats timed calls after warm-up: the estimate kernel and, for
scale, dense attention (cuDNN on a GPU) on bf16 q/k/v [1, L, Hq, D] / [1, L, Hkv, D], causal. The kernel needs a
Hopper GPU; --interpret runs it in Mosaic GPU interpret mode on a CPU (smoke runs only). With --estimate=sparse_q
the q codes are pruned to 2:4 and passed compressed, so the dots run as sparse wgmmas, and the check's reference
sees the pruned codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental.pallas import mosaic_gpu as plgpu

import sale_jax
from experiments.lib import flags as common, results
from experiments.lib.attention_targets import dense_attention, dense_baseline
from experiments.lib.timing import interleaved_median_seconds, median_seconds
from experiments.lib import estimate_variants
from pallas_kernels import mosaic_estimate, sparse_wgmma
from pallas_kernels.mosaic_estimate_operands import OFFSET_TERMS
from pallas_kernels.mosaic_estimate_reference import estimate_margins_reference
from sale_jax import mosaic_gpu_backend, tuning

_LENGTHS = common.define_lengths([32768, 131072])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
# The kernel is called directly (no backend); the region and block flags are SaleConfig's.
_SALE = common.SaleFlags.define(backend=None, sink_tokens=128, local_tokens=1024)
_TILE_K = flags.DEFINE_integer("tile_k", 128, "Keys per wgmma (128 or 256; block_q * tile_k <= 16384).")
_STAGES = flags.DEFINE_integer("max_concurrent_steps", 2, "Key tiles in flight (TMA pipeline depth).")
_COMPUTE_WARPGROUPS = flags.DEFINE_integer(
    "compute_warpgroups", 1, "estimate_hits' compute_warpgroups: 2 splits a 128-row q block across two warpgroups "
    "fed by a TMA warpgroup (tiles up to 256 keys).")
_CLUSTER_HEADS = flags.DEFINE_integer("cluster_heads", 1, "estimate_hits' cluster_heads (with --compute_warpgroups=2): "
                                      "CTAs of that many q heads of one kv head share each key tile by multicast.")
_HEADS_PER_CTA = flags.DEFINE_integer("heads_per_cta", 1, "estimate_hits' heads_per_cta (with --compute_warpgroups=1): "
                                      "q heads of one kv head per CTA, sharing each key tile's codes.")
_LAUNCH = flags.DEFINE_enum("launch", "flags", ["flags", "table"], "flags: --tile_k, --max_concurrent_steps, "
                            "--compute_warpgroups, --cluster_heads and --heads_per_cta; table: each length's launch "
                            "from the mosaic_gpu backend's tuning table (mosaic_gpu_backend.estimate_launch), as "
                            "sale_attention runs it.")
_VARIANTS = flags.DEFINE_list("variants", ["kernel"], f"Kernel variants to time, of {estimate_variants.VARIANTS} "
                              "(all but kernel leave a part out and are timed only).")
_FP8_PEAK = flags.DEFINE_float("fp8_peak_tops", 1979.0, "Dense fp8 tensor-core peak (TOP/s) the fractions use: the "
                               "H100/H200 datasheet's.")
_HIT_FRACTION = flags.DEFINE_float("hit_fraction", 0.1, "Target fraction of estimated blocks that hit.")
_FLIP_TOLERANCE = flags.DEFINE_float("flip_tolerance", 1e-2, "Largest |reference margin| at which a flip is allowed.")
_CODES = flags.DEFINE_enum("codes", "float8_e4m3fn", ["int8", "float8_e4m3fn"],
                           "Code dtype passed in (the kernel multiplies fp8; int8 codes are cast first).")
_SKIP_DENSE = flags.DEFINE_bool("skip_dense", False, "Time the estimate kernel alone.")
_REPEATS = common.define_repeats(5)
_OUTPUT = common.define_output()


def sparse_q() -> bool:
    """--estimate=sparse_q: the q codes pruned to 2:4, their dots run as sparse wgmmas (checked against the
    reference on the pruned codes)."""
    return _SALE.estimate.value == "sparse_q"


def regions(length: int) -> sale_jax.BlockRegions:
    """The sink, middle and local regions of each q block (queries = keys)."""
    grid = sale_jax.BlockGrid(length, length, _SALE.block_q.value, _SALE.block_k.value)
    return grid.regions(_SALE.sink_tokens.value, _SALE.local_tokens.value)


def middle_end(length: int) -> np.ndarray:
    """Per q head and q block, the first key of its local region, where the estimated middle keys end."""
    ends = (regions(length).local_first_block * _SALE.block_k.value).astype(np.int32)
    return np.tile(ends, (_HEADS.values()[0], 1))


def middle_start(length: int) -> int:
    """The first key after the sink blocks, where the estimated middle keys start."""
    return regions(length).sink_blocks * _SALE.block_k.value


def random_inputs(length: int, seed: int, thresholds: np.ndarray | None = None) -> tuple:
    """Codes and factors of one problem; row thresholds are `thresholds` [Hq] plus a small jitter (None: zero)."""
    rng = np.random.default_rng(seed)
    hq, hkv, d = _HEADS.values()
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
    arrays = tuple(a.astype(_CODES.value) if a.dtype == jnp.int8 else a for a in arrays)
    if sparse_q():  # the reference sees the pruned codes the kernel multiplies
        arrays = (sparse_wgmma.prune(arrays[0]), *arrays[1:])
    return arrays


def calibrated_thresholds(length: int) -> np.ndarray:
    """Per head, the margin quantile (threshold 0) that leaves about --hit_fraction of the estimated blocks."""
    margins = np.asarray(estimate_margins_reference(*random_inputs(length, seed=1), **reference_knobs(length)))
    thresholds = []
    for head in range(margins.shape[1]):
        estimated = margins[:, head][np.isfinite(margins[:, head])]
        thresholds.append(np.quantile(estimated, 1.0 - _HIT_FRACTION.value) if estimated.size else 0.0)
    return np.asarray(thresholds, np.float32)


def reference_knobs(length: int) -> dict:
    return dict(block_q=_SALE.block_q.value, block_k=_SALE.block_k.value, middle_start=middle_start(length))


def launch_knobs(length: int) -> dict:
    """The launch at `length`: the flags', or with --launch=table the one the mosaic_gpu backend takes."""
    if _LAUNCH.value == "table":
        q_heads, kv_heads, head_dim = _HEADS.values()
        launch = mosaic_gpu_backend.estimate_launch(length, head_dim, q_heads // kv_heads,
                                                    _SALE.config(backend="mosaic_gpu"),
                                                    tuning.for_backend("mosaic_gpu"))._asdict()
    else:
        launch = dict(tile_k=_TILE_K.value, max_concurrent_steps=_STAGES.value,
                      compute_warpgroups=_COMPUTE_WARPGROUPS.value, cluster_heads=_CLUSTER_HEADS.value,
                      heads_per_cta=_HEADS_PER_CTA.value)
    return dict(block_q=_SALE.block_q.value, block_k=_SALE.block_k.value, **launch)


def kernel_knobs(length: int) -> dict:
    return dict(launch_knobs(length), middle_start=middle_start(length))


def kernel_call(inputs, variant: str = "kernel"):
    """The estimate kernel (or one of its roofline variants) on `inputs` as a function of nothing (with
    --estimate=sparse_q, on the compressed q codes)."""
    interpret = plgpu.InterpretGPUParams() if _SALE.interpret.value else False
    knobs = dict(kernel_knobs(inputs[0].shape[1]), interpret=interpret)
    estimate_hits = estimate_variants.estimate_hits(variant)
    if not sparse_q():
        return lambda: estimate_hits(*inputs, **knobs)
    values, positions = sparse_wgmma.compress(inputs[0])
    return lambda: estimate_hits(values, *inputs[1:], q_positions=positions, **knobs)


def check(inputs) -> dict:
    hits = np.asarray(kernel_call(inputs)())
    margins = np.asarray(estimate_margins_reference(*inputs, **reference_knobs(inputs[0].shape[1])))
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


def work(inputs) -> dict:
    """What the kernel must do at these inputs, summed over heads and q blocks: the fp8 operations of the middle
    keys' dots (2 per multiply-add; with --estimate=sparse_q the dense ones the sparse wgmmas stand for), the
    operations the whole tiles issue (masked blocks included), and the key-tile bytes read from L2 (fp8 codes, once
    per group of q heads that shares them, and the offsets' f32 key terms, per q head)."""
    length = inputs[0].shape[1]
    knobs = launch_knobs(length)
    block_q, block_k, tile_k = knobs["block_q"], knobs["block_k"], knobs["tile_k"]
    ends = np.asarray(inputs[6]) // block_k * block_k
    start = middle_start(length)
    first_tile = start // tile_k
    tiles = float(np.maximum(-(-ends // tile_k) - first_tile, 0).sum())
    middle_keys = float(np.maximum(ends - start, 0).sum())
    _, _, d = _HEADS.values()
    sharing = knobs.get("heads_per_cta", 1) * knobs.get("cluster_heads", 1)
    return {"middle_fp8_ops": 2.0 * block_q * d * middle_keys, "issued_fp8_ops": 2.0 * block_q * d * tile_k * tiles,
            "key_tile_bytes": tiles * tile_k * (d / sharing + 4 * OFFSET_TERMS)}


def dense_inputs(length: int):
    keys = jax.random.split(jax.random.key(length), 3)
    hq, hkv, d = _HEADS.values()
    q = jax.random.normal(keys[0], (1, length, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, hkv, d), jnp.bfloat16)
    return q, k, v


def fp8_matmul_tops(size: int = 8192) -> float | None:
    """The measured rate of an fp8 matrix product (XLA's, f32 out, both operands K-major) of `size`^3, the
    ceiling the tensor cores reach on this device; None where XLA cannot run one."""
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.randint(key, (size, size), -7, 8).astype(jnp.float8_e4m3fn) for key in keys)
    product = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                       preferred_element_type=jnp.float32))
    try:
        seconds = median_seconds(lambda: product(a, b), _REPEATS.value)
    except Exception as error:  # an XLA build without fp8 dots: the record says so instead of a rate
        print(f"  fp8 matmul not run: {type(error).__name__}: {error}", flush=True)
        return None
    return 2.0 * size ** 3 / seconds / 1e12


def time_variants(inputs) -> dict:
    """Per variant, the median ms and the middle dots' share of --fp8_peak_tops; interleaved, so a drift of the
    machine reaches every variant alike."""
    calls = {variant: kernel_call(inputs, variant) for variant in _VARIANTS.value}
    seconds = interleaved_median_seconds(calls, _REPEATS.value)
    middle_ops = work(inputs)["middle_fp8_ops"]
    return {variant: {"ms": s * 1e3, "middle_fp8_tops": middle_ops / s / 1e12,
                      "fraction_of_fp8_peak": middle_ops / s / 1e12 / _FP8_PEAK.value}
            for variant, s in seconds.items()}


def main(argv):
    del argv
    if jax.default_backend() != "gpu" and not _SALE.interpret.value:
        raise SystemExit(f"estimate_kernel needs a Hopper GPU (Mosaic GPU kernel); the backend here is "
                         f"{jax.default_backend()!r}. Run it on an H100/H200, or pass --interpret for a smoke run.")
    unknown = set(_VARIANTS.value) - set(estimate_variants.VARIANTS)
    if unknown or "kernel" not in _VARIANTS.value:
        raise SystemExit(f"--variants must include kernel and name only {estimate_variants.VARIANTS}, got "
                         f"{_VARIANTS.value}")
    lengths = sorted(_LENGTHS.value)
    thresholds = calibrated_thresholds(min(4096, lengths[0]))
    print(f"device {jax.devices()[0].device_kind}; launch {_LAUNCH.value}, {_CODES.value} codes, estimate "
          f"{_SALE.estimate.value}; thresholds per head {np.round(thresholds[:4], 3).tolist()}...", flush=True)
    baseline = dense_baseline()
    hq, hkv, d = _HEADS.values()
    summary = {"launch": _LAUNCH.value, "codes": _CODES.value, "estimate": _SALE.estimate.value, "q_heads": hq,
               "kv_heads": hkv, "head_dim": d, "sink_tokens": _SALE.sink_tokens.value,
               "local_tokens": _SALE.local_tokens.value, "dense_baseline": baseline, "repeats": _REPEATS.value,
               "fp8_peak_tops": _FP8_PEAK.value, "lengths": {}}
    if len(_VARIANTS.value) > 1 and not _SALE.interpret.value:
        summary["fp8_matmul_tops"] = fp8_matmul_tops()
        print(f"  fp8 matmul 8192^3: {summary['fp8_matmul_tops']} TOP/s", flush=True)
    for length in lengths:
        inputs = random_inputs(length, seed=length, thresholds=thresholds)
        entry = {"knobs": launch_knobs(length), **work(inputs)}
        if length == lengths[0]:
            entry["check"] = check(inputs)
        entry["variants"] = time_variants(inputs)
        kernel = entry["variants"]["kernel"]
        entry["estimate_ms"] = kernel["ms"]
        entry["key_tile_tb_per_s"] = entry["key_tile_bytes"] / kernel["ms"] / 1e9
        line = (f"  {length:>7} {entry['knobs']}: " + ", ".join(
            f"{variant} {v['ms']:.2f} ms" for variant, v in entry["variants"].items())
            + f"; dots at {kernel['fraction_of_fp8_peak']:.0%} of peak, key tiles {entry['key_tile_tb_per_s']:.2f} "
            "TB/s")
        if not _SKIP_DENSE.value:
            q, k, v = dense_inputs(length)
            dense_seconds = median_seconds(lambda: dense_attention(q, k, v, baseline), _REPEATS.value)
            entry[f"{baseline}_ms"] = dense_seconds * 1e3
            entry[f"estimate_over_{baseline}"] = kernel["ms"] / 1e3 / dense_seconds
            line += f"; {baseline} {dense_seconds * 1e3:.2f} ms, ratio {entry[f'estimate_over_{baseline}']:.3f}"
        print(line, flush=True)
        summary["lengths"][str(length)] = entry
    results.write(_OUTPUT.value, summary, None)


if __name__ == "__main__":
    app.run(main)
