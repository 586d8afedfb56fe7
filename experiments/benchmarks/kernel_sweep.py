r"""Times kernel variants (tiles, warps, stages) and the pieces of the quantization pass, for tuning.

    python -m experiments.benchmarks.kernel_sweep --lengths=131072 --selection= --block_q=128 --attention=4:2 \
        --mosaic_attention=128:2 --output=experiments/results/computation_kernel/h200/block_q128.json

Selection variants run the Triton selection kernel alone on precomputed codes; attention variants run the Triton
computation kernel, and the Mosaic GPU one (--mosaic_attention, checked against the Triton output first), on
random layouts of density 1.0, 0.1 and 0.02. The block and region sizes are the SALE flags'. Medians of --repeats
after warm-up. --interpret runs every kernel in interpret mode on a CPU (smoke runs only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels
import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import quantize_only
from experiments.lib.layouts import random_layout
from experiments.lib.timing import median_seconds
from pallas_kernels.mosaic_sparse_attention import mosaic_block_sparse_attention
from sale_jax import triton_backend
from sale_jax.ops import column_bias, pad_axis, smoothing_means

_LENGTHS = common.define_lengths([32768])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
# The kernels are called directly (no backend); the block and region flags are SaleConfig's.
_SALE = common.SaleFlags.define(backend=None)
_SELECTION = flags.DEFINE_list("selection", ["128:4:2", "128:4:3", "256:4:2", "64:4:2"],
                               "Selection variants estimate_tile:num_warps:num_stages.")
_ATTENTION = flags.DEFINE_list("attention", ["4:2", "4:3"], "Triton computation variants num_warps:num_stages.")
_MOSAIC_ATTENTION = flags.DEFINE_list(
    "mosaic_attention", [], "Mosaic GPU computation variants keys_per_step:stages (block_q 128), timed beside the "
    "Triton ones on the same layouts.")
_DENSITIES = common.define_numbers("densities", [1.0, 0.1, 0.02], "Densities of the computation pass's layouts.")
_REPEATS = common.define_repeats(5)
_OUTPUT = common.define_output()


def _variants(flag: flags.FlagHolder, parts: int) -> list[tuple[int, ...]]:
    """`--flag=a:b,c:d` as integer tuples of `parts` fields each."""
    variants = []
    for variant in flag.value:
        fields = variant.split(":")
        if len(fields) != parts or not all(field.isdigit() for field in fields):
            raise ValueError(f"--{flag.name}: expected {parts} integers joined by ':', got {variant!r}")
        variants.append(tuple(map(int, fields)))
    return variants


def sweep(length: int, config: sale_jax.SaleConfig) -> dict:
    batch, (hq, hkv, d) = 1, _HEADS.values()
    work = workloads.llm_like_qkv(length, batch, length, hq, hkv, d, dtype=common.resolve_dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    block_q, block_k = config.block_q, config.block_k
    grid = sale_jax.BlockGrid(length, length, block_q, block_k)
    per_tile_scale = config.quant_granularity == "per_block"
    timings = {}

    def record(name, fn):
        ms = median_seconds(fn, _REPEATS.value) * 1e3
        timings[name] = ms
        print(f"{length:>7} {name:<40} {ms:9.3f} ms", flush=True)

    means = jax.jit(smoothing_means)
    q_mean, k_mean = means(q, k)
    record("quant/means", lambda: means(q, k))
    quantize = functools.partial(jax.jit(pallas_kernels.quantize_rows, static_argnames=(
        "length", "tile", "per_tile_scale", "return_smooth", "interpret")), length=length,
        per_tile_scale=per_tile_scale, interpret=config.interpret)
    record("quant/q_kernel", lambda: quantize(pad_axis(q, 1, block_q), q_mean[:, 0], tile=block_q,
                                              return_smooth=False))
    record("quant/k_kernel", lambda: quantize(k, k_mean[:, 0], tile=block_k, return_smooth=True))
    # The whole pass, compiled as one program, as benchmarks.attention's quantization_ms times it.
    record(f"quant/triton_backend_bq{block_q}", lambda: quantize_only(q, k, config))
    bias_fn = jax.jit(lambda q_mean, k, k_mean: column_bias(q_mean, k.astype(jnp.float32) - k_mean))
    record("quant/column_bias", lambda: bias_fn(q_mean, k, k_mean))

    q_rows = pad_axis(q, 1, block_q)
    q_codes, q_scale = quantize(q_rows, q_mean[:, 0], tile=block_q, return_smooth=False)
    k_codes, k_scale, k_smooth = quantize(k, k_mean[:, 0], tile=block_k, return_smooth=True)
    bias = bias_fn(q_mean, k, k_mean)
    tau = jnp.full((hq,), sale_jax.DEFAULT_TAU, jnp.float32)
    regions = triton_backend.kernel_regions(grid, config)
    for tile, warps, stages in _variants(_SELECTION, 3):
        args = (q_rows, q_codes, q_scale, pad_axis(k_smooth, 1, tile), pad_axis(k_codes, 1, tile),
                pad_axis(k_scale, 2, tile), pad_axis(bias, 2, tile), tau, *regions.arrays)
        record(f"select/tile{tile}_w{warps}_s{stages}", lambda: pallas_kernels.select_blocks(
            *args, num_slots=grid.num_slots, q_len=length, kv_len=length, block_q=block_q, block_k=block_k,
            **regions.bounds, scale=d ** -0.5, estimate_tile=tile,
            num_warps=warps, num_stages=stages, index_dtype=grid.index_dtype(), interpret=config.interpret))

    mosaic_interpret = plgpu.InterpretGPUParams() if config.interpret else False
    for density in _DENSITIES.value:
        layout = random_layout(7, batch, hq, grid, density)
        arrays = (q, k, v, layout.indices, layout.counts, jnp.asarray(grid.row_offsets))
        shape = dict(q_len=length, kv_len=length, block_q=block_q, block_k=block_k, scale=d ** -0.5)
        for warps, stages in _variants(_ATTENTION, 2):
            record(f"attend/bq{block_q}_density{density}_w{warps}_s{stages}",
                   lambda: pallas_kernels.block_sparse_attention(*arrays, **shape, num_warps=warps,
                                                                 num_stages=stages, interpret=config.interpret))
        triton_out = pallas_kernels.block_sparse_attention(*arrays, **shape, interpret=config.interpret)[0]
        for keys, stages in _variants(_MOSAIC_ATTENTION, 2):
            mosaic = functools.partial(mosaic_block_sparse_attention, *arrays, **shape, keys_per_step=keys,
                                       stages=stages, interpret=mosaic_interpret)
            name = f"attend_mosaic/bq{block_q}_density{density}_keys{keys}_s{stages}"
            # Checked against the Triton kernel on the same layout before it is timed.
            difference = float(jnp.max(jnp.abs(mosaic()[0].astype(jnp.float32) - triton_out.astype(jnp.float32))))
            timings[f"{name}/max_abs_difference_to_triton"] = difference
            print(f"{length:>7} {name:<40} max |mosaic - triton| = {difference:.2e}", flush=True)
            record(name, mosaic)
    return timings


def main(argv):
    del argv
    config = _SALE.config(backend="triton", dense_below=0)  # quantize_only runs the Pallas quantization
    results.write(_OUTPUT.value, {"ms": {str(length): sweep(length, config) for length in _LENGTHS.value}}, config)


if __name__ == "__main__":
    app.run(main)
