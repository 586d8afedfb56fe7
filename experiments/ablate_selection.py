"""Where the selection kernel's time goes: times variants of it that leave parts of the middle-key loop out.

    python -m experiments.ablate_selection --lengths=32768 --output=/tmp/ablate.json

Variants are made from `pallas_kernels/selection.py`'s own source by replacing anchored lines (the script stops
if an anchor is missing, so it cannot silently time something else):
  full           the kernel as it is;
  rows_first     reduce the estimate tile over rows first, then per key block;
  no_compaction  decide blocks but write no indices;
  dot_only       the int8 dot loop alone (a lower bound for this tile shape).
Only `full` computes a layout; the others exist to be timed. Medians of --repeats after warm-up.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_kernels
import sale_jax
from experiments.timing import median_seconds
from pallas_kernels import selection
from sale_jax import workloads
from sale_jax.reference.quantize import column_bias, smoothing_means

_LENGTHS = flags.DEFINE_list("lengths", ["32768"], "Sequence lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")

_REDUCTION = ("        block_best = jnp.max(jnp.max(excess.reshape(block_q, blocks_per_tile, block_k), axis=2), "
              "axis=0)\n")
_COMPACTION = ("        position = count + jnp.cumsum(block_hit) - block_hit\n"
               "        write_slots(position, start // block_k + tile_block_ids, block_hit > 0)\n")
_EPILOGUE_START = "        k_scale = k_scale_ref[pl.ds(start, estimate_tile)]\n"
_EPILOGUE_END = "        return count + jnp.sum(block_hit)\n"


def _variant_sources() -> dict[str, str]:
    source = open(selection.__file__).read()
    for anchor in (_REDUCTION, _COMPACTION, _EPILOGUE_START, _EPILOGUE_END):
        if anchor not in source:
            raise RuntimeError(f"anchor not found in {selection.__file__}: {anchor!r}")
    start, end = source.index(_EPILOGUE_START), source.index(_EPILOGUE_END) + len(_EPILOGUE_END)
    return {
        "full": source,
        "rows_first": source.replace(_REDUCTION, "        block_best = jnp.max(jnp.max(excess, axis=0).reshape("
                                                 "blocks_per_tile, block_k), axis=1)\n"),
        "no_compaction": source.replace(_COMPACTION, ""),
        "dot_only": source[:start] + "        return count + (jnp.max(dots) > 0).astype(jnp.int32)\n" + source[end:],
    }


def _load(name: str, source: str):
    module = types.ModuleType(f"selection_{name}")
    exec(compile(source, f"<selection variant {name}>", "exec"), module.__dict__)
    return module


def main(argv):
    del argv
    modules = {name: _load(name, source) for name, source in _variant_sources().items()}
    results = {}
    for length in map(int, _LENGTHS.value):
        hq, hkv, d = 32, 8, 128
        work = workloads.llm_like_qkv(length, 1, length, hq, hkv, d, dtype=jnp.bfloat16)
        q, k = work.q, work.k
        grid = sale_jax.BlockGrid(length, length, 64, 32)
        q_mean, k_mean = smoothing_means(q, k)
        q_codes, q_scale = pallas_kernels.quantize_rows(q, q_mean[:, 0], length=length, tile=64,
                                                        per_tile_scale=False, return_smooth=False)
        k_codes, k_scale, k_smooth = pallas_kernels.quantize_rows(k, k_mean[:, 0], length=length, tile=32,
                                                                  per_tile_scale=False, return_smooth=True)
        bias = column_bias(q_mean, k.astype(jnp.float32) - k_mean)
        tau = jnp.full((hq,), sale_jax.DEFAULT_TAU, jnp.float32)
        results[str(length)] = {}
        for name, module in modules.items():
            def run(module=module):
                return module.select_blocks(
                    q, q_codes, q_scale, k_smooth, k_codes, k_scale, bias, tau, jnp.asarray(grid.row_offsets),
                    num_slots=grid.num_slots, q_len=length, kv_len=length, block_q=64, block_k=32, sink_tokens=32,
                    local_tokens=128, scale=d ** -0.5, estimate_tile=128, num_warps=4, num_stages=2)
            ms = median_seconds(run, _REPEATS.value) * 1e3
            results[str(length)][name] = ms
            print(f"{length:>7} {name:<14} {ms:8.2f} ms", flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "repeats": _REPEATS.value, "ms": results}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
