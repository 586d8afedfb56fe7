r"""Times the mosaic_gpu backend's selection pass by pass, each compiled alone on the previous pass's outputs, beside
the whole `select_blocks` and dense attention.

    python -m experiments.benchmarks.selection_passes --lengths=32768,65536,131072 --density=0.1 --repeats=10 \
        --output=experiments/results/estimate_roofline/h200/selection_passes.json

The passes, as `mosaic_gpu_backend.select_blocks` runs them: quantization (the means, the 4-bit codes and the
column bias), the row thresholds (exact statistics over the sink and local keys), the estimate's hit flags (with
--estimate=sparse_q, the 2:4 compression of the q codes included) and their compaction into the kept-block lists.
Inputs are the LLM-like workload's, at the uniform tau that keeps about --density of the visible blocks. Each pass
also reports the bytes its inputs and outputs take (each read or written once) over its time. Medians of --repeats
after warm-up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import dense_attention, dense_baseline, tau_for_density
from experiments.lib.timing import median_seconds
from sale_jax import mosaic_gpu_backend, triton_backend, tuning

_LENGTHS = common.define_lengths([32768, 65536, 131072])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
_SALE = common.SaleFlags.define(backend=None)
_DENSITY = flags.DEFINE_float("density", 0.1, "Kept-block density the uniform tau is bisected to.")
_REPEATS = common.define_repeats(10)
_OUTPUT = common.define_output()


def passes(q, k, tau, config: sale_jax.SaleConfig) -> dict:
    """The selection's passes (`mosaic_gpu_backend.select_blocks`'s) as jitted functions of the previous passes'
    outputs, with those outputs: name -> (function, its arguments)."""
    grid = sale_jax.BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    launch = mosaic_gpu_backend.estimate_launch(k.shape[1], k.shape[-1], q.shape[2] // k.shape[2], config,
                                                tuning.for_backend("mosaic_gpu"))
    quantize = jax.jit(lambda q, k: triton_backend.quantize(q, k, config, mosaic_gpu_backend.key_padding(
        config, launch)))
    row_thresholds = jax.jit(lambda quant, tau: mosaic_gpu_backend.row_thresholds(quant, tau, grid, config))
    estimate = jax.jit(lambda quant, threshold, tau: mosaic_gpu_backend.estimate_hits(
        quant, threshold, tau, grid, config, launch))
    compact = jax.jit(lambda hits: mosaic_gpu_backend.compact_hits(hits, grid, config))

    quant = quantize(q, k)
    threshold = row_thresholds(quant, tau)
    hits = estimate(quant, threshold, tau)
    return {"quantize": (quantize, (q, k)), "row_thresholds": (row_thresholds, (quant, tau)),
            "estimate": (estimate, (quant, threshold, tau)), "compact_hits": (compact, (hits,))}


def nbytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def bench_length(length: int, config: sale_jax.SaleConfig) -> dict:
    hq, hkv, d = _HEADS.values()
    work = workloads.llm_like_qkv(length, 1, length, hq, hkv, d, dtype=common.resolve_dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    baseline = dense_baseline()
    tau_value = tau_for_density(q, k, config, _DENSITY.value)
    tau = jnp.full((hq,), tau_value, jnp.float32)
    dense_ms = median_seconds(lambda: dense_attention(q, k, v, baseline), _REPEATS.value) * 1e3
    entry = {"tau": tau_value, "density": float(sale_jax.select_blocks(q, k, tau, config).density()),
             f"{baseline}_ms": dense_ms, "passes": {}}
    for name, (function, arguments) in passes(q, k, tau, config).items():
        ms = median_seconds(lambda: function(*arguments), _REPEATS.value) * 1e3
        moved = nbytes(arguments) + nbytes(jax.eval_shape(function, *arguments))
        entry["passes"][name] = {"ms": ms, "bytes": moved, "tb_per_s": moved / ms / 1e9,
                                 f"share_of_{baseline}": ms / dense_ms}
    select_ms = median_seconds(lambda: sale_jax.select_blocks(q, k, tau, config), _REPEATS.value) * 1e3
    entry["select_blocks_ms"] = select_ms
    entry[f"select_blocks_share_of_{baseline}"] = select_ms / dense_ms
    print(f"  {length:>7} density {entry['density']:.3f}: " + ", ".join(
        f"{name} {p['ms']:.2f} ms ({p['tb_per_s']:.2f} TB/s)" for name, p in entry["passes"].items())
        + f"; select_blocks {select_ms:.2f} ms = {select_ms / dense_ms:.1%} of {baseline} {dense_ms:.2f} ms",
        flush=True)
    return entry


def main(argv):
    del argv
    config = _SALE.config(backend="mosaic_gpu", dense_below=0)
    if jax.default_backend() != "gpu" and not config.interpret:
        raise SystemExit(f"selection_passes times the mosaic_gpu backend (Hopper); the backend here is "
                         f"{jax.default_backend()!r}. Pass --interpret for a smoke run on a CPU.")
    hq, hkv, d = _HEADS.values()
    summary = {"q_heads": hq, "kv_heads": hkv, "head_dim": d, "target_density": _DENSITY.value,
               "dense_baseline": dense_baseline(), "repeats": _REPEATS.value, "lengths": {}}
    print(f"device {jax.devices()[0].device_kind}; {config}", flush=True)
    for length in sorted(_LENGTHS.value):
        summary["lengths"][str(length)] = bench_length(length, config)
    results.write(_OUTPUT.value, summary, config)


if __name__ == "__main__":
    app.run(main)
