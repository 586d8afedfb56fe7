"""SALE end to end against dense attention on the H200, at several thresholds and lengths, with the time split
into quantization, selection and computation.

    python -m experiments.bench_attention --output_dir=experiments/results/bench_attention_h200

Inputs come from the LLM-like workload generator, so each threshold gives a realistic density, reported beside
every time. Per length: cuDNN dense, JAX's Pallas-Triton `mha` (K/V repeated), our computation pass with every
block kept; per threshold: quantization, quantization + selection, computation on the selected layout, and the
whole `sale_attention` call. Medians of --repeats after warm-up. Writes bench_attention.json and
bench_attention.png (speedup over cuDNN against density, and against length). --backend=pallas_mosaic times the
selection with its Mosaic GPU estimate (Hopper).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
from absl import app, flags

import sale_jax
from experiments.attention_targets import cudnn_attention, pallas_triton_mha, quantize_only
from experiments.timing import median_seconds
from sale_jax import pallas_backend, workloads

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768", "65536", "131072"], "Sequence lengths.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16"], "Input dtype.")
_TAUS = flags.DEFINE_list("taus", ["0.1", "0.03", "0.008", "0.002"], "Uniform thresholds (each gives a density).")
_DENSITIES = flags.DEFINE_list("densities", [], "Target densities: each gets the uniform tau that keeps about that "
                                "fraction of the visible blocks (bisection on log tau).")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Optional thresholds file: layer 0's row is used too.")
_BACKEND = flags.DEFINE_enum("backend", "pallas", ["pallas", "pallas_mosaic"],
                             "SaleConfig.backend of the SALE calls (pallas_mosaic: Hopper only).")
_BLOCK_Q = flags.DEFINE_integer("block_q", sale_jax.SaleConfig.block_q, "SaleConfig.block_q (query rows per block).")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also time Pallas-Triton mha and the all-kept computation pass.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the JSON and the PNG.", required=True)


def tau_for_density(q, k, config, target: float, steps: int = 16) -> float:
    """The uniform tau whose layout keeps about `target` of the visible blocks: density falls as tau rises, so
    bisect on log tau over [1e-6, 1]."""
    low, high = math.log(1e-6), 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        tau = jnp.full((q.shape[2],), math.exp(middle), jnp.float32)
        if float(sale_jax.select_blocks(q, k, tau, config).density()) > target:
            low = middle
        else:
            high = middle
    return math.exp((low + high) / 2)


def bench_length(length: int) -> dict:
    hq, hkv, d = _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    work = workloads.llm_like_qkv(length, 1, length, hq, hkv, d, dtype=jnp.dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    # The kernels at every length.
    config = sale_jax.SaleConfig(backend=_BACKEND.value, block_q=_BLOCK_Q.value, dense_below=0)

    def ms(fn):
        return median_seconds(fn, _REPEATS.value) * 1e3

    result = {"cudnn_ms": ms(lambda: cudnn_attention(q, k, v))}
    if _BASELINES.value:
        group = hq // hkv
        k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        result["pallas_triton_mha_ms"] = ms(lambda: pallas_triton_mha(q, k_rep, v_rep, d ** -0.5))
        grid = sale_jax.BlockGrid(length, length, config.block_q, config.block_k)
        all_kept = sale_jax.BlockLayout.all_visible(1, hq, grid)
        result["computation_all_kept_ms"] = ms(lambda: sale_jax.block_sparse_attention(q, k, v, all_kept, config))
    result["quantization_ms"] = ms(lambda: quantize_only(q, k, config))

    thresholds = {f"tau={t}": jnp.full((hq,), float(t), jnp.float32) for t in _TAUS.value}
    for target in _DENSITIES.value:
        tau = tau_for_density(q, k, config, float(target))
        thresholds[f"density~{target} (tau={tau:.3g})"] = jnp.full((hq,), tau, jnp.float32)
    if _THRESHOLDS.value:
        thresholds["calibrated layer 0"] = sale_jax.Thresholds.load(_THRESHOLDS.value).layer(0)
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
        point["speedup_over_cudnn"] = result["cudnn_ms"] / point["end_to_end_ms"]
        result["sale"].append(point)
        print(f"{length:>7} {name:<20} density {point['density']:.3f}  "
              f"select {point['quantization_plus_selection_ms']:8.2f}  compute {point['computation_ms']:8.2f}  "
              f"total {point['end_to_end_ms']:8.2f} ms  "
              f"(cuDNN {result['cudnn_ms']:.2f} ms, x{point['speedup_over_cudnn']:.2f})", flush=True)
    return result


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_density, by_length) = plt.subplots(1, 2, figsize=(11, 4.2))
    for length, r in results.items():
        points = sorted((p["density"], p["speedup_over_cudnn"]) for p in r["sale"])
        by_density.plot(*zip(*points), marker="o", label=f"{int(length) // 1024}K")
    names = [p["thresholds"] for p in next(iter(results.values()))["sale"]]
    lengths = [int(n) for n in results]
    for i, name in enumerate(names):
        by_length.plot(lengths, [results[str(n)]["sale"][i]["speedup_over_cudnn"] for n in lengths], marker="o",
                       label=name)
    for ax, xlabel in ((by_density, "density of kept blocks"), (by_length, "sequence length")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup over cuDNN dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by_length.set_xscale("log", base=2)
    fig.suptitle(f"SALE end to end vs cuDNN ({jax.devices()[0].device_kind})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def computation_kernel() -> str:
    """Which kernel ran the computation pass, with its knobs (the JSON's record of what was timed)."""
    config = sale_jax.SaleConfig(backend=_BACKEND.value, block_q=_BLOCK_Q.value)
    q = jax.ShapeDtypeStruct((1, _BLOCK_Q.value, _Q_HEADS.value, _HEAD_DIM.value), jnp.dtype(_DTYPE.value))
    if config.resolved_backend() == "pallas_mosaic" and pallas_backend.fits_mosaic_attention(q, config):
        return (f"mosaic (keys_per_step {pallas_backend.MOSAIC_KEYS_PER_STEP}, stages "
                f"{pallas_backend.MOSAIC_ATTENTION_STAGES})")
    return "triton" if config.resolved_backend() in ("pallas", "pallas_mosaic") else config.resolved_backend()


def main(argv):
    del argv
    results = {length: bench_length(int(length)) for length in _LENGTHS.value}
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, "bench_attention.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "repeats": _REPEATS.value,
                   "backend": _BACKEND.value, "block_q": _BLOCK_Q.value, "computation_kernel": computation_kernel(),
                   "shape": {"batch": 1, "q_heads": _Q_HEADS.value, "kv_heads": _KV_HEADS.value,
                             "head_dim": _HEAD_DIM.value, "dtype": _DTYPE.value, "causal": True},
                   "lengths": results}, f, indent=1)
    _plot(results, os.path.join(_OUTPUT_DIR.value, "bench_attention.png"))


if __name__ == "__main__":
    app.run(main)
