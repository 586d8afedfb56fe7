"""Times kernel variants (tiles, warps, stages) and the pieces of the quantization pass, for tuning.

    python -m experiments.sweep_kernels --lengths=32768,131072 --output=/tmp/sweep.json

Selection variants run the selection kernel alone on precomputed codes; attention variants run the computation
kernel on an all-kept layout and on a random layout of density 0.1. Medians of --repeats after warm-up.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_kernels
import sale_jax
from experiments.layouts import random_layout
from experiments.attention_targets import quantize_only
from experiments.timing import median_seconds
from pallas_kernels.mosaic_sparse_attention import mosaic_block_sparse_attention
from sale_jax import workloads
from sale_jax.reference.common import pad_axis
from sale_jax.reference.quantize import column_bias, smoothing_means

_LENGTHS = flags.DEFINE_list("lengths", ["32768"], "Sequence lengths.")
_SELECTION = flags.DEFINE_list("selection", ["128:4:2", "128:4:3", "256:4:2", "64:4:2"],
                               "Selection variants estimate_tile:num_warps:num_stages.")
_ATTENTION = flags.DEFINE_list("attention", ["4:2", "4:3"], "Attention variants num_warps:num_stages.")
_MOSAIC_ATTENTION = flags.DEFINE_list(
    "mosaic_attention", [], "Mosaic GPU computation variants keys_per_step:stages (needs --attention_block_q=128), "
    "timed beside the Triton ones on the same layouts.")
_ATTENTION_BLOCK_Q = flags.DEFINE_integer("attention_block_q", 64, "Query rows per block of the timed layouts.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")


def sweep(length: int) -> dict:
    batch, hq, hkv, d = 1, 32, 8, 128
    work = workloads.llm_like_qkv(length, batch, length, hq, hkv, d, dtype=jnp.bfloat16)
    q, k, v = work.q, work.k, work.v
    config = sale_jax.SaleConfig(backend="pallas", dense_below=0)  # the kernels at every length
    grid = sale_jax.BlockGrid(length, length, config.block_q, config.block_k)
    results = {}

    def record(name, fn):
        ms = median_seconds(fn, _REPEATS.value) * 1e3
        results[name] = ms
        print(f"{length:>7} {name:<40} {ms:9.3f} ms", flush=True)

    means = jax.jit(smoothing_means)
    q_mean, k_mean = means(q, k)
    record("quant/means", lambda: means(q, k))
    quantize = jax.jit(pallas_kernels.quantize_rows, static_argnames=("length", "tile", "per_tile_scale",
                                                                      "return_smooth"))
    record("quant/q_kernel", lambda: quantize(q, q_mean[:, 0], length=length, tile=64, per_tile_scale=False,
                                              return_smooth=False))
    record("quant/q_kernel_tile128", lambda: quantize(q, q_mean[:, 0], length=length, tile=128,
                                                      per_tile_scale=False, return_smooth=False))
    record("quant/k_kernel", lambda: quantize(k, k_mean[:, 0], length=length, tile=32, per_tile_scale=False,
                                              return_smooth=True))
    # The whole pass, compiled as one program, as bench_attention's quantization_ms times it.
    for block_q in (64, 128):
        quant_config = sale_jax.SaleConfig(block_q=block_q)
        record(f"quant/pallas_backend_bq{block_q}", lambda: quantize_only(q, k, quant_config))
    bias_fn = jax.jit(lambda q_mean, k, k_mean: column_bias(q_mean, k.astype(jnp.float32) - k_mean))
    record("quant/column_bias", lambda: bias_fn(q_mean, k, k_mean))

    q_codes, q_scale = quantize(q, q_mean[:, 0], length=length, tile=64, per_tile_scale=False, return_smooth=False)
    k_codes, k_scale, k_smooth = quantize(k, k_mean[:, 0], length=length, tile=32, per_tile_scale=False,
                                          return_smooth=True)
    bias = bias_fn(q_mean, k, k_mean)
    tau = jnp.full((hq,), sale_jax.DEFAULT_TAU, jnp.float32)
    offsets = jnp.asarray(grid.row_offsets)
    for variant in _SELECTION.value:
        tile, warps, stages = map(int, variant.split(":"))
        args = (q, q_codes, q_scale, pad_axis(k_smooth, 1, tile), pad_axis(k_codes, 1, tile),
                pad_axis(k_scale, 2, tile), pad_axis(bias, 2, tile), tau, offsets)
        name = f"select/tile{tile}_w{warps}_s{stages}"
        record(name, lambda: pallas_kernels.select_blocks(
            *args, num_slots=grid.num_slots, q_len=length, kv_len=length, block_q=64, block_k=32, sink_tokens=32,
            local_tokens=128, scale=d ** -0.5, estimate_tile=tile, num_warps=warps, num_stages=stages))

    block_q = _ATTENTION_BLOCK_Q.value
    attention_grid = sale_jax.BlockGrid(length, length, block_q, 32)
    attention_offsets = jnp.asarray(attention_grid.row_offsets)
    for density in (1.0, 0.1, 0.02):
        layout = random_layout(7, batch, hq, attention_grid, density)
        arrays = (q, k, v, layout.indices, layout.counts, attention_offsets)
        shape = dict(q_len=length, kv_len=length, block_q=block_q, block_k=32, scale=d ** -0.5)
        for variant in _ATTENTION.value:
            warps, stages = map(int, variant.split(":"))
            record(f"attend/bq{block_q}_density{density}_w{warps}_s{stages}",
                   lambda: pallas_kernels.block_sparse_attention(*arrays, **shape, num_warps=warps,
                                                                 num_stages=stages))
        triton_out = pallas_kernels.block_sparse_attention(*arrays, **shape)[0].astype(jnp.float32)
        for variant in _MOSAIC_ATTENTION.value:
            keys, stages = variant.split(":")
            mosaic = functools.partial(mosaic_block_sparse_attention, *arrays, **shape, keys_per_step=int(keys),
                                       stages=int(stages))
            name = f"attend_mosaic/bq{block_q}_density{density}_keys{keys}_s{stages}"
            # Checked against the Triton kernel on the same layout before it is timed.
            difference = float(jnp.max(jnp.abs(mosaic()[0].astype(jnp.float32) - triton_out)))
            results[f"{name}/max_abs_difference_to_triton"] = difference
            print(f"{length:>7} {name:<40} max |mosaic - triton| = {difference:.2e}", flush=True)
            record(name, mosaic)
    return results


def main(argv):
    del argv
    results = {str(length): sweep(int(length)) for length in _LENGTHS.value}
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "ms": results}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
