r"""Long-context retrieval accuracy of a retrieval-trained byte-level Llama: dense attention against SALE.

    python -m experiments.accuracy.retrieval_eval --checkpoint=experiments/results/retrieval_training/h200/checkpoint \
        --sequences=16 --lengths=16384,65536,131072 --uniform_taus=0.008,0.1,0.4 \
        --output=experiments/results/retrieval_accuracy/h200/retrieval_eval.json

A grid of context lengths x record depths (where in the context the queried records sit). Each cell holds
--sequences sequences of the training task (experiments/lib/retrieval_task.py) that no training step saw, scored
three ways on the same tokens: dense attention; SALE at thresholds calibrated on --calibration_samples sequences of
the same task (the paper's recipe, bound --theta; or a --thresholds file); SALE at each uniform threshold of
--uniform_taus (several trace the accuracy-density curve). Per cell: exact-match query accuracy, first-digit
accuracy and the mean density of kept blocks. Writes the JSON (with the per-layer, per-head thresholds) and, beside
it, a plot (accuracy heatmaps, length x depth) and the calibrated thresholds as thresholds.json.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, retrieval_scoring, retrieval_task
from models import checkpoint, llama
from models.calibration import calibrate_model

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face folder of the trained model.", required=True)
_OUTPUT = common.define_output()
_LENGTHS = common.define_lengths([4096, 16384, 65536, 131072], "Context lengths (tokens).")
_DEPTHS = common.define_numbers("depths", [0, 0.25, 0.5, 0.75, 1], "Depths of the queried records.")
_SEQUENCES = flags.DEFINE_integer("sequences", 8, "Sequences per cell.", lower_bound=1)
_TASK = common.RetrievalTaskFlags.define()  # as trained
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 131_072, "Sequences per call: this // length.",
                                         lower_bound=1)
_THETA = flags.DEFINE_float("theta", 0.4, "Calibration's per-row L1 error bound.")
_CALIBRATION_SAMPLES = flags.DEFINE_integer("calibration_samples", 2, "Calibration sequences.", lower_bound=1)
_CALIBRATION_LENGTH = flags.DEFINE_integer("calibration_length", 16384, "Tokens per calibration sequence.")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Use this thresholds file instead of calibrating.")
_UNIFORM_TAUS = common.define_numbers("uniform_taus", [sale_jax.DEFAULT_TAU],
                                      "Uniform thresholds compared (one SALE run per value).")
_SALE = common.SaleFlags.define(backend="auto")
_DTYPE = common.define_dtype("auto", "The model's dtype.")
_SEED = flags.DEFINE_integer("seed", 1, "Seeds the evaluated and the calibration sequences (training used 0 "
                             "and (seed, 0 or 1, ...) streams: these are (seed, 2 or 3, ...)).")


def score_cell(models: dict, thresholds: dict, length: int, depth_index: int, depth: float) -> dict:
    """Each method's accuracy and density on one cell's sequences (the same tokens for every method)."""
    batch_size = max(1, min(_SEQUENCES.value, _TOKENS_PER_BATCH.value // length))
    hits = {name: [] for name in models}
    densities = {name: [] for name in models}
    for index in range(math.ceil(_SEQUENCES.value / batch_size)):
        data = retrieval_task.batch((_SEED.value, 2, length, depth_index, index), batch_size, length,
                                    _TASK.num_records.value, _TASK.num_queries.value, depth=depth,
                                    filler=_TASK.filler.value)
        for name, model in models.items():
            batch_hits, density = retrieval_scoring.answer_hits(model, data.tokens, data.query_positions,
                                                                thresholds[name])
            hits[name].append(np.asarray(batch_hits))
            densities[name].append(np.asarray(density))
    cell = {}
    for name in models:
        cell[name] = retrieval_scoring.summarize(np.concatenate(hits[name])[:_SEQUENCES.value])
        per_layer = np.mean(densities[name], axis=0)
        cell[name].update(density=float(per_layer.mean()), density_per_layer=per_layer.round(4).tolist())
    return cell


def calibrated_thresholds(sale_model: llama.Llama) -> sale_jax.Thresholds:
    if _THRESHOLDS.value:
        return sale_jax.Thresholds.load(_THRESHOLDS.value, num_layers=sale_model.config.num_layers,
                                        num_q_heads=sale_model.config.num_heads)
    prompts = [retrieval_task.sequence((_SEED.value, 3, index), _CALIBRATION_LENGTH.value, _TASK.num_records.value,
                                       _TASK.num_queries.value, filler=_TASK.filler.value).tokens
               for index in range(_CALIBRATION_SAMPLES.value)]
    return calibrate_model(sale_model, prompts, theta=_THETA.value,
                           model_name=os.path.basename(os.path.normpath(_CHECKPOINT.value)))


def _plot(cells: dict, lengths: list[int], depths: list[float], path: str) -> None:
    plt = results.pyplot()
    methods = list(next(iter(cells.values()))[0].keys())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 0.7 * len(lengths) + 2.2))
    for ax, method in zip(np.atleast_1d(axes), methods):
        accuracy = np.array([[cells[str(n)][i][method]["exact_match"] for i in range(len(depths))]
                             for n in lengths])
        density = np.array([[cells[str(n)][i][method]["density"] for i in range(len(depths))] for n in lengths])
        ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (row, col), value in np.ndenumerate(accuracy):
            ax.text(col, row, f"{value:.2f}\nd={density[row, col]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_xlabel("depth of the queried records")
        ax.set_ylabel("context length")
        ax.set_title(method, fontsize=9)
    fig.suptitle(f"exact-match retrieval accuracy (d = density of kept blocks), {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    lengths, depths, uniform_taus = _LENGTHS.value, _DEPTHS.value, _UNIFORM_TAUS.value
    if any(not 0 <= tau <= 1 for tau in uniform_taus):
        raise ValueError(f"--uniform_taus must lie in [0, 1], got {uniform_taus}")
    for length in lengths + [_CALIBRATION_LENGTH.value]:
        if length < retrieval_task.min_length(_TASK.num_records.value, _TASK.num_queries.value):
            raise ValueError(f"length {length} is too short for {_TASK.num_records.value} records and "
                             f"{_TASK.num_queries.value} queries")
    dtype = common.resolve_dtype(_DTYPE.value).name
    sale = _SALE.config(dense_below=0)  # SALE at every length
    sale_model = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype, attention="sale", sale=sale)
    config = sale_model.config
    calibrated = calibrated_thresholds(sale_model)
    thresholds_path = results.beside(_OUTPUT.value, "thresholds.json")
    os.makedirs(os.path.dirname(thresholds_path), exist_ok=True)
    calibrated.save(thresholds_path)
    calibrated_name = f"sale_calibrated_theta={_THETA.value:g}"
    uniform_names = {f"sale_uniform_tau={tau:g}": tau for tau in uniform_taus}
    models = {"dense": llama.with_attention(sale_model, "dense"), calibrated_name: sale_model,
              **{name: sale_model for name in uniform_names}}
    thresholds = {"dense": None, calibrated_name: calibrated,
                  **{name: sale_jax.Thresholds.uniform(config.num_layers, config.num_heads, tau)
                     for name, tau in uniform_names.items()}}

    cells = {}
    print(f"{'length':>7} {'depth':>5}  " + "  ".join(f"{name:>28}" for name in models))
    for length in lengths:
        cells[str(length)] = []
        for depth_index, depth in enumerate(depths):
            cell = score_cell(models, thresholds, length, depth_index, depth)
            cells[str(length)].append(cell)
            print(f"{length:>7} {depth:>5.2f}  " + "  ".join(
                f"{cell[name]['exact_match']:>19.3f} (d {cell[name]['density']:.2f})" for name in models),
                flush=True)
    plot = results.plot_path(_OUTPUT.value)
    results.write(_OUTPUT.value, {
        "checkpoint": _CHECKPOINT.value, "dtype": dtype, "lengths": lengths, "depths": depths,
        "sequences_per_cell": _SEQUENCES.value, "num_records": _TASK.num_records.value,
        "num_queries": _TASK.num_queries.value, "filler": _TASK.filler.value, "theta": _THETA.value,
        "calibration": {"samples": _CALIBRATION_SAMPLES.value, "length": _CALIBRATION_LENGTH.value,
                        "file": _THRESHOLDS.value},
        "thresholds": {calibrated_name: np.asarray(calibrated.tau).tolist(), **uniform_names},
        "cells": cells}, config.sale, files=[plot, thresholds_path])
    _plot(cells, lengths, depths, plot)


if __name__ == "__main__":
    app.run(main)
