r"""The accuracy-density frontier: SALE against other block selections, at equal density, on LLM-like inputs.

    python -m experiments.accuracy.frontier --seq_len=8192 --head_dim=128 --output=build/frontier/cpu.json  # a CPU
    python -m experiments.accuracy.frontier --seq_len=32768 --q_heads=32 --kv_heads=8 --head_dim=128 \
        --output=build/frontier/h200.json                                                            # the H200

(experiments/results/README.md gives the committed studies' commands.)

Methods (all keep the same sink and local blocks; they differ in how they pick middle blocks):
  sale           SALE's 4-bit estimate and relative score, one point per uniform tau;
  sale_calibrated SALE with per-head thresholds calibrated (sale_jax.calibrate) on another sample of the same
                 heads (same head_seed, different seed), per theta;
  sale_density_budget SALE with per-head thresholds from the density_budget recipe, heads priced by their per-row
                 L1 error (sale_jax.calibration.costs) on the calibration sample: at the density each theta's
                 calibrated thresholds keep there, and at each of --budget_densities;
  sale_exact     SALE's rule with exact bf16/f32 scores instead of the 4-bit estimate ("without QK quant");
  sink_local     nothing else;
  pooled_topk    top middle blocks by mean-pooled block scores, per fraction of each row's middle blocks;
  xattention_s8 / xattention_s16   XAttention's antidiagonal estimate (stride 8 / 16), per cumulative threshold.
Error is measured against attention over every visible block computed the same way, so it is the selection's
error alone. Writes the JSON (per head and overall: density, per-row L1, relative L2, needle recall, and the
estimate's cost in multiply-adds) and, beside it, a plot of per-row L1 error against density.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, selection_baselines, workloads
from experiments.lib.selection_metrics import layout_metrics, scored_pairs
from sale_jax import calibration
from sale_jax.reference.selection import selection_margins_reference

_SEQ_LEN = common.define_seq_len(4096)
_HEADS = common.HeadFlags.define(q_heads=8, kv_heads=2, head_dim=64)
_DTYPE = common.define_dtype("auto")
_SALE = common.SaleFlags.define(backend="auto")
_TAUS = common.define_numbers("taus", [0.1, 0.03, 0.008, 0.002, 0.0005, 0.0001], "Uniform SALE thresholds.")
_THETAS = common.define_numbers("thetas", [1.6, 0.8, 0.4, 0.2, 0.1], "Calibration bounds.")
_BUDGET_DENSITIES = common.define_numbers("budget_densities", [0.05, 0.1, 0.2, 0.4],
                                          "Densities the density_budget recipe spends.")
_TOPK = common.define_numbers("topk_fractions", [0.02, 0.05, 0.1, 0.2, 0.4, 0.7],
                              "Fractions of each row's middle blocks kept by pooled top-k.")
_XATTN = common.define_numbers("xattention_thresholds", [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
                               "XAttention cumulative-mass thresholds.")
_STRIDES = common.define_numbers("strides", [8, 16], "XAttention strides.", kind=int)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluated sample (calibration uses seed + 1).")
_OUTPUT = common.define_output()


def _estimate_cost(method: str, grid: sale_jax.BlockGrid, head_dim: int, middle_pairs: int, reference_pairs: int,
                   stride: int | None = None) -> dict:
    """Multiply-adds per head of each method's estimate, and the operand type they run in."""
    if method in ("sale", "sale_calibrated", "sale_density_budget"):
        return {"estimate_macs": middle_pairs * head_dim, "estimate_type": "int8 (4-bit codes)",
                "statistics_macs": reference_pairs * head_dim}
    if method == "sale_exact":
        return {"estimate_macs": middle_pairs * head_dim, "estimate_type": "bf16",
                "statistics_macs": reference_pairs * head_dim}
    if method == "pooled_topk":
        return {"estimate_macs": grid.num_q_blocks * grid.num_k_blocks * head_dim // 2, "estimate_type": "bf16"}
    if method.startswith("xattention"):
        return {"estimate_macs": grid.q_len * grid.kv_len * head_dim // (2 * stride), "estimate_type": "bf16"}
    return {"estimate_macs": 0, "estimate_type": "none"}


def main(argv):
    del argv
    dtype = common.resolve_dtype(_DTYPE.value)
    head_dim = _HEADS.head_dim.value
    shape = (1, _SEQ_LEN.value, *_HEADS.values())
    # One "model" (head_seed) and two prompts: calibrate on one, evaluate on the other.
    work = workloads.llm_like_qkv(_SEED.value, *shape, dtype=dtype, head_seed=_SEED.value)
    calibration_work = workloads.llm_like_qkv(_SEED.value + 1, *shape, dtype=dtype, head_seed=_SEED.value)
    q, k, v = work.q, work.k, work.v
    config = _SALE.config(dense_below=0)
    reference_config = _SALE.config(backend="reference", dense_below=0)
    grid = sale_jax.BlockGrid(_SEQ_LEN.value, _SEQ_LEN.value, config.block_q, config.block_k)
    batch, heads = 1, _HEADS.q_heads.value
    dense = sale_jax.block_sparse_attention(q, k, v, sale_jax.BlockLayout.all_visible(batch, heads, grid), config)

    middle_pairs, reference_pairs = scored_pairs(grid, config)

    points = []

    def evaluate(method, knob, mask, stride=None):
        layout = sale_jax.BlockLayout.from_mask(mask, grid)
        out = sale_jax.block_sparse_attention(q, k, v, layout, config)
        point = {"method": method, "knob": knob}
        point.update(layout_metrics(out, dense, layout, work.needle_rows, work.needle_keys, config))
        point.update(_estimate_cost(method, grid, head_dim, middle_pairs, reference_pairs, stride))
        points.append(point)
        print(f"{method:<16} {knob:<22} density {point['density']:.3f}  L1/row {point['l1_per_row']:.4f}  "
              f"rel L2 {point['relative_l2']:.4f}  needles {point['needle_recall']:.2f}", flush=True)

    def sale_mask(tau, estimator="int4"):
        always_kept, margins = selection_margins_reference(q, k, tau, reference_config, estimator)
        return always_kept | (margins > 0)

    for tau in _TAUS.value:
        uniform = jnp.full((heads,), tau, jnp.float32)
        evaluate("sale", f"tau={tau}", sale_jax.select_blocks(q, k, uniform, config).to_mask())
        evaluate("sale_exact", f"tau={tau}", sale_mask(uniform, "exact"))
    cal_q, cal_k, cal_v = calibration_work.q, calibration_work.k, calibration_work.v
    costs = calibration.CostTable(*(table[None] for table in calibration.head_costs(cal_q, cal_k, cal_v, config)),
                                  calibration.TAU_GRID)

    def evaluate_budget(density, knob):
        taus = costs.spend(density)[0]
        evaluate("sale_density_budget", knob, sale_jax.select_blocks(q, k, jnp.asarray(taus), config).to_mask())
        points[-1]["tau_per_head"] = taus.tolist()

    for theta in _THETAS.value:
        calibrated = sale_jax.calibrate([[(cal_q, cal_k, cal_v)]], 1, heads, config, theta=theta, progress=False)
        evaluate("sale_calibrated", f"theta={theta}",
                 sale_jax.select_blocks(q, k, calibrated.layer(0), config).to_mask())
        points[-1]["tau_per_head"] = np.asarray(calibrated.layer(0)).tolist()
        calibration_density = float(np.mean(
            sale_jax.select_blocks(cal_q, cal_k, calibrated.layer(0), config).density_per_head()))
        evaluate_budget(calibration_density, f"density={calibration_density:.3f} (theta={theta})")
    for density in _BUDGET_DENSITIES.value:
        evaluate_budget(density, f"density={density}")
    evaluate("sink_local", "-", selection_baselines.sink_local_mask(batch, heads, grid, config))
    for fraction in _TOPK.value:
        evaluate("pooled_topk", f"fraction={fraction}",
                 selection_baselines.pooled_topk_mask(q, k, grid, config, fraction))
    for stride in _STRIDES.value:
        for threshold in _XATTN.value:
            evaluate(f"xattention_s{stride}", f"threshold={threshold}",
                     selection_baselines.xattention_mask(q, k, grid, config, stride, threshold), stride)

    plot = results.plot_path(_OUTPUT.value)
    results.write(_OUTPUT.value, {
        "backend": config.resolved_backend(),
        "shape": {"batch": batch, "seq_len": _SEQ_LEN.value, "q_heads": heads, "kv_heads": _HEADS.kv_heads.value,
                  "head_dim": head_dim, "dtype": dtype.name},
        "seed": _SEED.value, "dense_macs_per_head": grid.q_len * grid.kv_len * head_dim, "points": points},
        config, files=[plot])
    _plot(points, plot)


def _plot(points, path):
    plt = results.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(p["method"] for p in points):
        pts = sorted((p["density"], max(p["l1_per_row"], 1e-6)) for p in points if p["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("density of kept blocks")
    ax.set_ylabel("per-row L1 error vs dense")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    results.save_figure(fig, path, "accuracy-density frontier")


if __name__ == "__main__":
    app.run(main)
