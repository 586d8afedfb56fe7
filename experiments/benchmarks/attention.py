r"""SALE end to end against dense attention, at several thresholds or densities and lengths, with the time split
into quantization, selection and computation.

    python -m experiments.benchmarks.attention --backend=mosaic_gpu --lengths=32768,65536,131072 --taus= \
        --densities=0.1 --baselines=false --repeats=10 \
        --output=experiments/results/attention_speed/h200/block_q128/attention.json

Inputs come from the LLM-like workload generator, so each threshold gives a realistic density, reported beside
every time. Per length: dense attention (cuDNN on a GPU), JAX's Pallas-Triton `mha` (K/V repeated), our
computation pass with every block kept; per threshold: quantization, quantization + selection, computation on the
selected layout, and the whole `sale_attention` call; with --streaming_fractions, each threshold again with a
share of the heads streaming (no estimate). Medians of --repeats after warm-up. Writes the JSON and,
beside it, a plot (speedup over dense against density, and against length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import (dense_attention, dense_baseline, pallas_triton_mha, quantize_only,
                                               tau_for_density)
from experiments.lib.timing import median_seconds
from sale_jax import mosaic_gpu_backend, tuning

_LENGTHS = common.define_lengths([16384, 32768, 65536, 131072])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
_SALE = common.SaleFlags.define(backend="triton")
_TAUS = common.define_numbers("taus", [0.1, 0.03, 0.008, 0.002], "Uniform thresholds (each gives a density).")
_DENSITIES = common.define_numbers("densities", [], "Target densities: each gets the uniform tau that keeps about "
                                   "that fraction of the visible blocks (bisection on log tau).")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Optional thresholds file: layer 0's row is used too.")
_STREAMING = common.define_numbers("streaming_fractions", [], "Each threshold also runs with this fraction of its q "
                                   "heads (the first ones) streaming: tau inf, sink and local blocks only and no "
                                   "estimate.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also time Pallas-Triton mha and the all-kept computation pass.")
_REPEATS = common.define_repeats(5)
_OUTPUT = common.define_output()


def bench_length(length: int, config: sale_jax.SaleConfig) -> dict:
    hq, hkv, d = _HEADS.values()
    work = workloads.llm_like_qkv(length, 1, length, hq, hkv, d, dtype=common.resolve_dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    baseline = dense_baseline()

    def ms(fn):
        return median_seconds(fn, _REPEATS.value) * 1e3

    result = {f"{baseline}_ms": ms(lambda: dense_attention(q, k, v, baseline))}
    if _BASELINES.value:
        group = hq // hkv
        k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        result["pallas_triton_mha_ms"] = ms(lambda: pallas_triton_mha(q, k_rep, v_rep, d ** -0.5, config.interpret))
        grid = sale_jax.BlockGrid(length, length, config.block_q, config.block_k)
        all_kept = sale_jax.BlockLayout.all_visible(1, hq, grid)
        result["computation_all_kept_ms"] = ms(lambda: sale_jax.block_sparse_attention(q, k, v, all_kept, config))
    if config.resolved_backend() != "reference":  # the Pallas quantization pass (the reference has none apart)
        result["quantization_ms"] = ms(lambda: quantize_only(q, k, config))

    thresholds = {f"tau={t}": jnp.full((hq,), t, jnp.float32) for t in _TAUS.value}
    for target in _DENSITIES.value:
        tau = tau_for_density(q, k, config, target)
        thresholds[f"density~{target} (tau={tau:.3g})"] = jnp.full((hq,), tau, jnp.float32)
    if _THRESHOLDS.value:
        calibrated = sale_jax.Thresholds.load(_THRESHOLDS.value)
        calibrated.check_config(config)
        thresholds["calibrated layer 0"] = calibrated.layer(0)
    for name, tau in list(thresholds.items()):
        for fraction in _STREAMING.value:
            streaming = round(fraction * hq)
            thresholds[f"{name}, {streaming}/{hq} streaming"] = tau.at[:streaming].set(sale_jax.STREAMING)
    result["sale"] = []
    for name, tau in thresholds.items():
        layout = sale_jax.select_blocks(q, k, tau, config)
        point = {
            "thresholds": name,
            "density": float(layout.density()),
            "quantization_plus_selection_ms": ms(lambda: sale_jax.select_blocks(q, k, tau, config)),
            "computation_ms": ms(lambda: sale_jax.block_sparse_attention(q, k, v, layout, config)),
            "end_to_end_ms": ms(lambda: sale_jax.sale_attention(q, k, v, tau, config)),
        }
        point[f"speedup_over_{baseline}"] = result[f"{baseline}_ms"] / point["end_to_end_ms"]
        result["sale"].append(point)
        print(f"{length:>7} {name:<20} density {point['density']:.3f}  "
              f"select {point['quantization_plus_selection_ms']:8.2f}  compute {point['computation_ms']:8.2f}  "
              f"total {point['end_to_end_ms']:8.2f} ms  ({baseline} {result[f'{baseline}_ms']:.2f} ms, "
              f"x{point[f'speedup_over_{baseline}']:.2f})", flush=True)
    return result


def _plot(lengths: dict, path: str) -> None:
    plt = results.pyplot()
    speedup = f"speedup_over_{dense_baseline()}"
    fig, (by_density, by_length) = plt.subplots(1, 2, figsize=(11, 4.2))
    for length, r in lengths.items():
        points = sorted((p["density"], p[speedup]) for p in r["sale"])
        by_density.plot(*zip(*points), marker="o", label=f"{int(length) // 1024}K")
    names = [p["thresholds"] for p in next(iter(lengths.values()))["sale"]]
    sizes = [int(n) for n in lengths]
    for i, name in enumerate(names):
        by_length.plot(sizes, [lengths[str(n)]["sale"][i][speedup] for n in sizes], marker="o", label=name)
    for ax, xlabel in ((by_density, "density of kept blocks"), (by_length, "sequence length")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"speedup over {dense_baseline()} dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_length.set_xscale("log", base=2)
    results.save_figure(fig, path, f"SALE end to end vs {dense_baseline()}")


def computation_kernel(config: sale_jax.SaleConfig) -> str:
    """Which kernel ran the computation pass (the JSON's record of what was timed)."""
    hq, _, d = _HEADS.values()
    q = jax.ShapeDtypeStruct((1, config.block_q, hq, d), common.resolve_dtype(_DTYPE.value))
    backend = config.resolved_backend()
    if backend == "mosaic_gpu" and mosaic_gpu_backend.fits_attention(q, config, tuning.for_backend(backend)):
        return "mosaic_gpu"
    return "triton" if backend in ("triton", "mosaic_gpu") else backend


def main(argv):
    del argv
    config = _SALE.config(dense_below=0)  # the kernels at every length
    lengths = {str(length): bench_length(length, config) for length in _LENGTHS.value}
    hq, hkv, d = _HEADS.values()
    plot = results.plot_path(_OUTPUT.value)
    results.write(_OUTPUT.value, {
        "repeats": _REPEATS.value, "dense_baseline": dense_baseline(), "computation_kernel": computation_kernel(config),
        "shape": {"batch": 1, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                  "dtype": common.resolve_dtype(_DTYPE.value).name, "causal": True},
        "lengths": lengths}, config, files=[plot])
    _plot(lengths, plot)


if __name__ == "__main__":
    app.run(main)
