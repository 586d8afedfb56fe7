"""Times the Pallas SALE passes beside cuDNN and JAX's Pallas-Triton flash attention on the same inputs.

    python -m experiments.bench_kernels --output=experiments/results/bench_kernels_h200.json

Per length: dense cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`), JAX's Pallas-Triton `mha`
(K/V repeated for GQA; 128x64 blocks, 8 warps, 3 stages), our computation pass with every visible block kept and
with random layouts at the given densities (the diagonal block always kept), and quantization + selection on the
LLM-like workload. Medians of --repeats timed calls after warm-up; causal FLOPs counted as 4 * T^2 * D * Hq / 2.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

import sale_jax
from experiments.attention_targets import cudnn_attention, pallas_triton_mha, quantize_only
from experiments.layouts import random_layout
from experiments.timing import median_seconds
from sale_jax import workloads

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Sequence lengths (queries = keys).")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DENSITIES = flags.DEFINE_list("densities", ["0.1", "0.25", "0.5"], "Kept-block densities for the computation pass.")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for the selection timing.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median reported).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")


def bench_length(length: int) -> dict:
    batch, hq, hkv, d = 1, _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
    work = workloads.llm_like_qkv(length, batch, length, hq, hkv, d, dtype=jnp.bfloat16)
    q, k, v = work.q, work.k, work.v
    config = sale_jax.SaleConfig(backend="pallas", dense_below=0)  # the kernels at every length
    scale = d ** -0.5
    flops = 4 * length * length * d * hq / 2
    grid = sale_jax.BlockGrid(length, length, config.block_q, config.block_k)
    timings = {}

    def record(name, fn):
        seconds = median_seconds(fn, _REPEATS.value)
        timings[name] = {"ms": seconds * 1e3, "tflops_dense_equivalent": flops / seconds / 1e12}
        print(f"  {length:>7} {name:<34} {seconds * 1e3:9.2f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s(dense-eq)",
              flush=True)

    record("cudnn_dense", lambda: cudnn_attention(q, k, v))
    group = hq // hkv
    k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    record("pallas_triton_mha_dense", lambda: pallas_triton_mha(q, k_rep, v_rep, scale))

    all_kept = sale_jax.BlockLayout.all_visible(batch, hq, grid)
    record("computation_all_kept", lambda: sale_jax.block_sparse_attention(q, k, v, all_kept, config))
    for density in map(float, _DENSITIES.value):
        layout = random_layout(int(density * 1000), batch, hq, grid, density)
        timings_name = f"computation_density_{density}"
        record(timings_name, lambda: sale_jax.block_sparse_attention(q, k, v, layout, config))
        timings[timings_name]["density"] = float(layout.density())

    tau = jnp.full((hq,), _TAU.value, jnp.float32)
    record("quantization", lambda: quantize_only(q, k, config))
    record("quantization_plus_selection", lambda: sale_jax.select_blocks(q, k, tau, config))
    selected = sale_jax.select_blocks(q, k, tau, config)
    timings["quantization_plus_selection"]["density"] = float(selected.density())
    record("sale_end_to_end", lambda: sale_jax.sale_attention(q, k, v, tau, config))
    timings["sale_end_to_end"]["density"] = float(selected.density())
    return timings


def main(argv):
    del argv
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "repeats": _REPEATS.value,
               "shape": {"batch": 1, "q_heads": _Q_HEADS.value, "kv_heads": _KV_HEADS.value,
                         "head_dim": _HEAD_DIM.value, "dtype": "bfloat16", "causal": True},
               "tau": _TAU.value, "lengths": {}}
    for length in map(int, _LENGTHS.value):
        t = bench_length(length)
        results["lengths"][str(length)] = t
        all_kept = t["computation_all_kept"]["ms"]
        summary = {
            "all_kept_throughput_vs_pallas_mha": t["pallas_triton_mha_dense"]["ms"] / all_kept,
            "quant_plus_selection_fraction_of_cudnn": t["quantization_plus_selection"]["ms"] / t["cudnn_dense"]["ms"],
            "end_to_end_speedup_vs_cudnn": t["cudnn_dense"]["ms"] / t["sale_end_to_end"]["ms"],
        }
        for name, entry in t.items():
            if name.startswith("computation_density_"):
                summary[f"{name}_time_over_density_times_all_kept"] = entry["ms"] / (entry["density"] * all_kept)
        results["lengths"][str(length)]["summary"] = summary
        print(json.dumps({str(length): summary}, indent=1), flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
