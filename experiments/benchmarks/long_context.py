r"""SALE against dense attention past 128K tokens on one device: per length, cuDNN's flash attention and SALE end
to end at the uniform tau that keeps about --density of the blocks, with the memory SALE's pieces take.

    python -m experiments.benchmarks.long_context --lengths=262144,524288,1048576 \
        --output=experiments/results/long_context/h200/long_context.json

Inputs come from the LLM-like workload generator (B=1). Queries past `SaleConfig.query_chunk` (by default sized
to `sale_jax.config.MAX_SELECTION_PAIRS`) run in chunks, each over the keys up to its end. The tau is bisected on
the last query chunk (the rows that see every key), and the density reported is that chunk's (by a
`select_blocks` call of its own, smoothed by the chunk's means where the timed call smooths every chunk by the
whole call's, which can move blocks near the threshold; selecting every chunk apart would compile each chunk's
selection twice). Memory: the inputs and output, and for the last query chunk the layout (kept-block indices and
counts) and the Mosaic GPU estimate's hit flags; and the device's peak, which includes making the inputs. Medians
of --repeats rounds, dense and SALE timed in turn within each round. The JSON is rewritten after each length, so a
run cut short keeps the lengths it finished.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import dense_attention, dense_baseline, tau_for_density
from experiments.lib.timing import interleaved_median_seconds
from sale_jax import api

_LENGTHS = common.define_lengths([262144, 524288, 1048576])
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
_SALE = common.SaleFlags.define(backend="auto")
_DENSITY = flags.DEFINE_float("density", 0.1, "Target density of kept blocks: the uniform tau that keeps about it.")
_BISECTION_STEPS = flags.DEFINE_integer("bisection_steps", 10, "Steps of the tau bisection (on log tau).",
                                        lower_bound=1)
_QUERY_CHUNK = flags.DEFINE_integer("query_chunk", 0, "SaleConfig.query_chunk (a multiple of block_q); 0: sized "
                                    "by the selection's memory bound.", lower_bound=0)
_REPEATS = common.define_repeats(3)
_OUTPUT = common.define_output()


def _nbytes(*arrays) -> int:
    return sum(x.size * x.dtype.itemsize for x in arrays)


def bench_length(length: int, config: sale_jax.SaleConfig) -> dict:
    hq, hkv, d = _HEADS.values()
    work = workloads.llm_like_qkv(length, 1, length, hq, hkv, d, dtype=common.resolve_dtype(_DTYPE.value))
    q, k, v = work.q, work.k, work.v
    chunks = api.layout_grids(q, k, config)  # one grid per query chunk
    chunk, last_start = chunks[0].q_len, length - chunks[-1].q_len
    tau_value = tau_for_density(q[:, last_start:], k, config, _DENSITY.value, _BISECTION_STEPS.value)
    tau = jnp.full((hq,), tau_value, jnp.float32)

    layout = sale_jax.select_blocks(q[:, last_start:], k, tau, config)
    density, layout_bytes = float(layout.density()), _nbytes(layout.indices, layout.counts)
    hit_flags_bytes = 4 * hq * layout.grid.num_q_blocks * layout.grid.num_k_blocks  # int32 per pair
    del layout

    baseline = dense_baseline()
    times = interleaved_median_seconds({
        baseline: lambda: dense_attention(q, k, v, baseline),
        "sale": lambda: sale_jax.sale_attention(q, k, v, tau, config),
    }, _REPEATS.value, warmup=1)
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        f"{baseline}_ms": times[baseline] * 1e3, "sale_ms": times["sale"] * 1e3,
        f"speedup_over_{baseline}": times[baseline] / times["sale"],
        "tau": tau_value, "density_last_chunk": density, "query_chunk": chunk, "query_chunks": len(chunks),
        "memory_bytes": {"inputs_and_output": _nbytes(q, k, v, q), "layout_last_chunk": layout_bytes,
                         "estimate_hit_flags_last_chunk": hit_flags_bytes,
                         "device_peak": stats.get("peak_bytes_in_use")},
    }
    print(f"{length:>8} tau {tau_value:.3g} density {density:.3f} chunks {len(chunks)}  "
          f"{baseline} {result[f'{baseline}_ms']:9.1f} ms  SALE {result['sale_ms']:9.1f} ms  "
          f"x{result[f'speedup_over_{baseline}']:.2f}  layout {layout_bytes / 2**30:.2f} GiB, flags "
          f"{hit_flags_bytes / 2**30:.2f} GiB (last chunk)", flush=True)
    return result


def main(argv):
    del argv
    config = _SALE.config(dense_below=0, query_chunk=_QUERY_CHUNK.value or None)
    hq, hkv, d = _HEADS.values()
    lengths = {}
    for length in _LENGTHS.value:
        lengths[str(length)] = bench_length(length, config)
        results.write(_OUTPUT.value, {
            "repeats": _REPEATS.value, "dense_baseline": dense_baseline(), "target_density": _DENSITY.value,
            "shape": {"batch": 1, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                      "dtype": common.resolve_dtype(_DTYPE.value).name, "causal": True},
            "lengths": lengths}, config)


if __name__ == "__main__":
    app.run(main)
