r"""Times the Pallas SALE passes one by one beside dense attention and JAX's Pallas-Triton flash attention, on the
same inputs.

    python -m experiments.benchmarks.triton_passes --block_q=64 --repeats=7 \
        --output=experiments/results/triton_passes/h200/triton_passes.json

Per length: dense attention (cuDNN on a GPU), JAX's Pallas-Triton `mha` (K/V repeated for GQA; 128x64 blocks, 8
warps, 3 stages), our computation pass with every visible block kept and with random layouts at the given densities
(the diagonal block always kept), and quantization + selection on the LLM-like workload. Medians of --repeats timed
calls after warm-up; causal FLOPs counted as 4 * T^2 * D * Hq / 2.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import dense_attention, dense_baseline, pallas_triton_mha, quantize_only
from experiments.lib.layouts import random_layout
from experiments.lib.timing import median_seconds

_LENGTHS = common.define_lengths([32768, 131072])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
_SALE = common.SaleFlags.define(backend="triton")
_DENSITIES = common.define_numbers("densities", [0.1, 0.25, 0.5], "Kept-block densities for the computation pass.")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for the selection timing.")
_REPEATS = common.define_repeats(10)
_OUTPUT = common.define_output()


def bench_length(length: int, config: sale_jax.SaleConfig) -> dict:
    batch, (hq, hkv, d) = 1, _HEADS.values()
    work = workloads.llm_like_qkv(length, batch, length, hq, hkv, d, dtype=common.resolve_dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    flops = 4 * length * length * d * hq / 2
    grid = sale_jax.BlockGrid(length, length, config.block_q, config.block_k)
    timings = {}

    def record(name, fn):
        seconds = median_seconds(fn, _REPEATS.value)
        timings[name] = {"ms": seconds * 1e3, "tflops_dense_equivalent": flops / seconds / 1e12}
        print(f"  {length:>7} {name:<34} {seconds * 1e3:9.2f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s(dense-eq)",
              flush=True)

    baseline = dense_baseline()
    record(f"{baseline}_dense", lambda: dense_attention(q, k, v, baseline))
    group = hq // hkv
    k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    record("pallas_triton_mha_dense", lambda: pallas_triton_mha(q, k_rep, v_rep, d ** -0.5, config.interpret))

    all_kept = sale_jax.BlockLayout.all_visible(batch, hq, grid)
    record("computation_all_kept", lambda: sale_jax.block_sparse_attention(q, k, v, all_kept, config))
    for density in _DENSITIES.value:
        layout = random_layout(int(density * 1000), batch, hq, grid, density)
        name = f"computation_density_{density}"
        record(name, lambda: sale_jax.block_sparse_attention(q, k, v, layout, config))
        timings[name]["density"] = float(layout.density())

    tau = jnp.full((hq,), _TAU.value, jnp.float32)
    record("quantization", lambda: quantize_only(q, k, config))
    record("quantization_plus_selection", lambda: sale_jax.select_blocks(q, k, tau, config))
    selected = sale_jax.select_blocks(q, k, tau, config)
    timings["quantization_plus_selection"]["density"] = float(selected.density())
    record("sale_end_to_end", lambda: sale_jax.sale_attention(q, k, v, tau, config))
    timings["sale_end_to_end"]["density"] = float(selected.density())

    all_kept_ms, dense_ms = timings["computation_all_kept"]["ms"], timings[f"{baseline}_dense"]["ms"]
    summary = {
        "all_kept_throughput_vs_pallas_mha": timings["pallas_triton_mha_dense"]["ms"] / all_kept_ms,
        f"quant_plus_selection_fraction_of_{baseline}": timings["quantization_plus_selection"]["ms"] / dense_ms,
        f"end_to_end_speedup_vs_{baseline}": dense_ms / timings["sale_end_to_end"]["ms"],
    }
    for name, entry in timings.items():
        if name.startswith("computation_density_"):
            summary[f"{name}_time_over_density_times_all_kept"] = entry["ms"] / (entry["density"] * all_kept_ms)
    print(json.dumps({str(length): summary}, indent=1), flush=True)
    return timings | {"summary": summary}


def main(argv):
    del argv
    config = _SALE.config(dense_below=0)  # the kernels at every length
    if config.resolved_backend() == "reference":
        raise ValueError("triton_passes times the Pallas passes: --backend must be triton or mosaic_gpu (on a CPU "
                         "with --interpret), not the reference")
    hq, hkv, d = _HEADS.values()
    lengths = {str(length): bench_length(length, config) for length in _LENGTHS.value}
    results.write(_OUTPUT.value, {
        "repeats": _REPEATS.value, "dense_baseline": dense_baseline(),
        "shape": {"batch": 1, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                  "dtype": common.resolve_dtype(_DTYPE.value).name, "causal": True},
        "tau": _TAU.value, "lengths": lengths}, config)


if __name__ == "__main__":
    app.run(main)
