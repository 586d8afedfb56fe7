r"""Checks every Pallas pass against the pure-jnp reference at long lengths on the GPU, on random and structured
inputs, and prints a table.

    python -m experiments.accuracy.validate_gpu --block_q=64 \
        --output=experiments/results/gpu_validation/h200/validate_gpu.json

Per (length, workload): quantization codes and scales (must be identical), the selection's kept blocks (may differ
only where the reference's block margin is within --margin_tolerance of the threshold), and the computation
pass's output and log-sum-exp on the kernel's own layout (against the reference), plus every block kept against
`sale_jax.dense_attention` (cuDNN on a GPU). --interpret runs the kernels in interpret mode on a CPU (smoke runs).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_kernels
import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.attention_targets import dense_baseline
from sale_jax.ops import pad_axis, smoothing_means
from sale_jax.reference import block_sparse_attention_reference, quantize_reference
from sale_jax.reference.selection import selection_margins_reference

_LENGTHS = common.define_lengths([8192, 32768, 65536])
_WORKLOADS = flags.DEFINE_list("workloads", ["random", "structured"], "Input kinds: random, structured.")
_HEADS = common.HeadFlags.define(q_heads=32, kv_heads=8, head_dim=128)
_DTYPE = common.define_dtype("bfloat16")
_SALE = common.SaleFlags.define(backend="triton")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for every head.")
_MARGIN_TOLERANCE = flags.DEFINE_float("margin_tolerance", 0.05,
                                       "Largest |block margin| at which kernel and reference may disagree.")
_OUTPUT = common.define_output()


def _inputs(kind: str, length: int, seed: int):
    hq, hkv, d = _HEADS.values()
    dtype = common.resolve_dtype(_DTYPE.value)
    if kind == "structured":
        w = workloads.llm_like_qkv(seed, 1, length, hq, hkv, d, dtype=dtype)
        return w.q, w.k, w.v
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (1, length, hq, d), dtype)
    k = jax.random.normal(keys[1], (1, length, hkv, d), dtype)
    v = jax.random.normal(keys[2], (1, length, hkv, d), dtype)
    return q, k, v


def _check_quantization(q, k, config) -> dict:
    want = quantize_reference(q, k, granularity=config.quant_granularity, block_q=config.block_q,
                              block_k=config.block_k)
    q_mean, k_mean = smoothing_means(q, k)
    result = {}
    for name, x, mean, tile, codes, scale in (("q", q, q_mean, config.block_q, want.q_codes, want.q_scale),
                                              ("k", k, k_mean, config.block_k, want.k_codes, want.k_scale)):
        got_codes, got_scale = pallas_kernels.quantize_rows(
            pad_axis(x, 1, tile), mean[:, 0], length=x.shape[1], tile=tile,
            per_tile_scale=config.quant_granularity == "per_block", return_smooth=False, interpret=config.interpret)
        length = x.shape[1]
        result[f"{name}_code_mismatches"] = int(jnp.sum(got_codes[:, :length] != codes))
        result[f"{name}_scale_max_abs_diff"] = float(jnp.max(jnp.abs(got_scale[..., :length] -
                                                                      scale.transpose(0, 2, 1))))
    return result


def _check_selection(q, k, tau, config) -> tuple[dict, sale_jax.BlockLayout]:
    layout = sale_jax.select_blocks(q, k, tau, config)
    reference_config = sale_jax.SaleConfig(**{**config.to_dict(), "backend": "reference"})
    always, margins = selection_margins_reference(q, k, tau, reference_config)
    want = always | (margins > 0)
    got = layout.to_mask()
    differ = got != want
    worst = jnp.max(jnp.where(differ, jnp.abs(margins), 0.0))
    return {
        "density_kernel": float(layout.density()),
        "density_reference": float(jnp.sum(want) / jnp.sum(jnp.asarray(layout.grid.visible_mask)) / q.shape[2]),
        "blocks_differing": int(jnp.sum(differ)),
        "blocks_total_visible": int(layout.grid.visible_mask.sum()) * q.shape[2],
        "largest_margin_of_a_differing_block": float(worst),
        "selection_ok": bool(worst <= _MARGIN_TOLERANCE.value),
    }, layout


def _check_attention(q, k, v, layout, config) -> dict:
    out, lse = sale_jax.block_sparse_attention(q, k, v, layout, config, return_lse=True)
    want_out, want_lse = block_sparse_attention_reference(q, k, v, layout, config.softmax_scale(q.shape[-1]))
    dense_layout = sale_jax.BlockLayout.all_visible(q.shape[0], q.shape[2], layout.grid)
    dense_out = sale_jax.block_sparse_attention(q, k, v, dense_layout, config)
    dense = sale_jax.dense_attention(q, k, v)
    f32 = jnp.float32
    return {
        "out_max_abs_diff": float(jnp.max(jnp.abs(out.astype(f32) - want_out.astype(f32)))),
        "lse_max_abs_diff": float(jnp.max(jnp.abs(lse - want_lse))),
        f"all_kept_vs_{dense_baseline()}_max_abs_diff": float(jnp.max(jnp.abs(dense_out.astype(f32) -
                                                                             dense.astype(f32)))),
    }


def main(argv):
    del argv
    config = _SALE.config(dense_below=0)
    if config.resolved_backend() == "reference":
        raise ValueError("validate_gpu checks the Pallas passes against the reference: --backend must be triton or "
                         "mosaic_gpu (on a CPU with --interpret)")
    hq, hkv, d = _HEADS.values()
    tau = jnp.full((hq,), _TAU.value, jnp.float32)
    rows = []
    for length in _LENGTHS.value:
        for kind in _WORKLOADS.value:
            start = time.perf_counter()
            q, k, v = _inputs(kind, length, seed=length)
            row = {"length": length, "workload": kind}
            row.update(_check_quantization(q, k, config))
            selection, layout = _check_selection(q, k, tau, config)
            row.update(selection)
            row.update(_check_attention(q, k, v, layout, config))
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("length", "workload", "codes q/k differ", "density", "blocks differ", "worst margin", "out diff",
              "lse diff", f"all-kept vs {dense_baseline()}")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["length"], r["workload"], f"{r['q_code_mismatches']}/{r['k_code_mismatches']}",
            f"{r['density_kernel']:.3f}", f"{r['blocks_differing']}/{r['blocks_total_visible']}",
            f"{r['largest_margin_of_a_differing_block']:.2e}", f"{r['out_max_abs_diff']:.2e}",
            f"{r['lse_max_abs_diff']:.2e}", f"{r[f'all_kept_vs_{dense_baseline()}_max_abs_diff']:.2e}")))
    results.write(_OUTPUT.value, {
        "tau": _TAU.value, "margin_tolerance": _MARGIN_TOLERANCE.value,
        "shape": {"batch": 1, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                  "dtype": common.resolve_dtype(_DTYPE.value).name}, "rows": rows}, config)


if __name__ == "__main__":
    app.run(main)
