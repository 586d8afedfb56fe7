"""Checks every Pallas pass against the pure-jnp reference at long lengths on the GPU, on random and structured
inputs, and prints a table.

    python -m experiments.validate_gpu --output=experiments/results/validate_gpu_h200.json

Per (length, workload): quantization codes and scales (must be identical), the selection's kept blocks (may differ
only where the reference's block margin is within --margin_tolerance of the threshold), and the computation
pass's output and log-sum-exp on the kernel's own layout (against the reference), plus tau = 0 against cuDNN.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_kernels
import sale_jax
from sale_jax import workloads
from sale_jax.reference import block_sparse_attention_reference, quantize_reference
from sale_jax.reference.common import pad_axis
from sale_jax.reference.quantize import smoothing_means
from sale_jax.reference.selection import selection_margins_reference

_LENGTHS = flags.DEFINE_list("lengths", ["8192", "32768", "65536"], "Sequence lengths.")
_WORKLOADS = flags.DEFINE_list("workloads", ["random", "structured"], "Input kinds.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for every head.")
_GRANULARITY = flags.DEFINE_enum("granularity", "per_token", ["per_token", "per_block"], "Quantization scales.")
_MARGIN_TOLERANCE = flags.DEFINE_float("margin_tolerance", 0.05,
                                       "Largest |block margin| at which kernel and reference may disagree.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")


def _inputs(kind: str, length: int, seed: int):
    shape = (1, length, _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value)
    if kind == "structured":
        w = workloads.llm_like_qkv(seed, shape[0], length, shape[2], shape[3], shape[4], dtype=jnp.bfloat16)
        return w.q, w.k, w.v
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (1, length, shape[2], shape[4]), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, length, shape[3], shape[4]), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, length, shape[3], shape[4]), jnp.bfloat16)
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
            per_tile_scale=config.quant_granularity == "per_block", return_smooth=False)
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
    cudnn = sale_jax.dense_attention(q, k, v)
    f32 = jnp.float32
    return {
        "out_max_abs_diff": float(jnp.max(jnp.abs(out.astype(f32) - want_out.astype(f32)))),
        "lse_max_abs_diff": float(jnp.max(jnp.abs(lse - want_lse))),
        "all_kept_vs_cudnn_max_abs_diff": float(jnp.max(jnp.abs(dense_out.astype(f32) - cudnn.astype(f32)))),
    }


def main(argv):
    del argv
    config = sale_jax.SaleConfig(backend="pallas", quant_granularity=_GRANULARITY.value, dense_below=0)
    tau = jnp.full((_Q_HEADS.value,), _TAU.value, jnp.float32)
    rows = []
    for length in map(int, _LENGTHS.value):
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
              "lse diff", "all-kept vs cuDNN")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["length"], r["workload"], f"{r['q_code_mismatches']}/{r['k_code_mismatches']}",
            f"{r['density_kernel']:.3f}", f"{r['blocks_differing']}/{r['blocks_total_visible']}",
            f"{r['largest_margin_of_a_differing_block']:.2e}", f"{r['out_max_abs_diff']:.2e}",
            f"{r['lse_max_abs_diff']:.2e}", f"{r['all_kept_vs_cudnn_max_abs_diff']:.2e}")))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tau": _TAU.value,
                       "granularity": _GRANULARITY.value, "margin_tolerance": _MARGIN_TOLERANCE.value,
                       "shape": {"batch": 1, "q_heads": _Q_HEADS.value, "kv_heads": _KV_HEADS.value,
                                 "head_dim": _HEAD_DIM.value, "dtype": "bfloat16"}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
