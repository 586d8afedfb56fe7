r"""Long-context retrieval accuracy and prefill time of a retrieval-trained byte-level Llama: dense attention
against SALE under each calibration recipe and uniform thresholds.

    python -m experiments.accuracy.retrieval_eval \
        --checkpoint=experiments/results/retrieval_training_128k/h200/checkpoint --sequences=16 \
        --lengths=4096,16384,65536,131072 --recipes=paper,kl_budget --costs=first_order,l1 \
        --uniform_taus=0.1,1 --prefill_repeats=5 \
        --output=experiments/results/retrieval_accuracy/h200/retrieval_eval.json

A grid of context lengths x record depths (where in the context the queried records sit). Each cell holds
--sequences sequences of the training task (experiments/lib/retrieval_task.py) that no training step saw, scored
on the same tokens by every method: dense attention; SALE at thresholds calibrated by each recipe of --recipes
(models.calibration: the paper's, bound --theta; the budget recipes, --kl_budget or --density_budget, under each
price of --costs, scoring the model's own predictions where it answers or, --scored=end, at the prompts' ends) on
--calibration_samples other sequences of --calibration_length tokens; SALE at the thresholds of each --thresholds
file; SALE at each uniform threshold of --uniform_taus. Per cell: exact-match query accuracy, first-digit accuracy
and the mean density of kept blocks; per length and method, with --prefill_repeats, the median time of a
one-sequence prefill. Writes the JSON, each calibrated thresholds file beside it
(thresholds_<recipe>_<bound>.json), and plots: accuracy heatmaps (length x depth) and accuracy against prefill
speedup over dense.
"""

from __future__ import annotations

import functools

import math
import os

import jax
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, retrieval_scoring, retrieval_task
from experiments.lib import timing
from models import calibration, checkpoint, llama

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face folder of the trained model.", required=True)
_OUTPUT = common.define_output()
_LENGTHS = common.define_lengths([4096, 16384, 65536, 131072], "Context lengths (tokens).")
_DEPTHS = common.define_numbers("depths", [0, 0.25, 0.5, 0.75, 1], "Depths of the queried records.")
_SEQUENCES = flags.DEFINE_integer("sequences", 8, "Sequences per cell.", lower_bound=1)
_TASK = common.RetrievalTaskFlags.define()  # as trained
_TOKENS_PER_BATCH = flags.DEFINE_integer("tokens_per_batch", 131_072, "Sequences per call: this // length.",
                                         lower_bound=1)
_RECIPES = flags.DEFINE_list("recipes", ["paper"], f"Calibration recipes compared, of {calibration.RECIPES}.")
_THETA = flags.DEFINE_float("theta", sale_jax.calibration.DEFAULT_THETA, "The paper recipe's per-row L1 error bound.")
_KL_BUDGET = flags.DEFINE_float("kl_budget", sale_jax.calibration.DEFAULT_KL_BUDGET,
                                "The kl_budget recipe's mean KL divergence from dense (nats).")
_DENSITY_BUDGET = flags.DEFINE_float("density_budget", sale_jax.calibration.DEFAULT_DENSITY_BUDGET,
                                     "The density_budget recipe's mean density.")
_SCORE_TOKENS = flags.DEFINE_integer("score_tokens", calibration.DEFAULT_SCORE_TOKENS,
                                     "With --scored=end: the budget recipes score each calibration prompt's last "
                                     "this many positions.")
_COSTS = flags.DEFINE_list("costs", ["first_order"], "The budget recipes' prices of a head's attention error, "
                          f"of {sale_jax.calibration.COSTS}: each budget recipe is calibrated under each.")
_SCORED = flags.DEFINE_enum("scored", "answers", ["answers", "end"], "The budget recipes score the model's own "
                            "predictions where it answers (the positions it was trained on), or at the end of "
                            "each calibration prompt (--score_tokens).")
_CALIBRATION_SAMPLES = flags.DEFINE_integer("calibration_samples", 2, "Calibration sequences.", lower_bound=1)
_CALIBRATION_LENGTH = flags.DEFINE_integer("calibration_length", 16384, "Tokens per calibration sequence.")
_THRESHOLDS = flags.DEFINE_list("thresholds", [], "Thresholds files compared beside the calibrated recipes (one "
                                "method each, named by the recipe it records).")
_PREFILL_REPEATS = flags.DEFINE_integer("prefill_repeats", 0, "Timed one-sequence prefills per length and method "
                                        "(median reported); 0: no timing.", lower_bound=0)
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


_RECIPE_BOUNDS = {"paper": "theta", "kl_budget": "kl_budget", "density_budget": "density"}


def recipe_label(thresholds: sale_jax.Thresholds) -> str:
    """The recipe and the bound it was calibrated to, e.g. `kl_budget=0.01`; `_l1` when priced by L1 error, `_end`
    when scored at the prompts' ends in a study that scores answers."""
    params = thresholds.recipe_params
    name = params.get("name", "uncalibrated")
    if name not in _RECIPE_BOUNDS:
        return name
    label = f"{name}={params[_RECIPE_BOUNDS[name]]:g}"
    if params.get("cost") == "l1":
        label += "_l1"
    if params.get("scored") == "end" and _SCORED.value != "end":
        label += "_end"
    return label


def calibrated_thresholds(sale_model: llama.Llama) -> dict[str, sale_jax.Thresholds]:
    """Per method name, the thresholds each recipe of --recipes calibrates (under each of --costs) and each
    --thresholds file holds."""
    config = sale_model.config
    sequences = [retrieval_task.sequence((_SEED.value, 3, index), _CALIBRATION_LENGTH.value,
                                         _TASK.num_records.value, _TASK.num_queries.value, filler=_TASK.filler.value)
                 for index in range(_CALIBRATION_SAMPLES.value)]
    scored = [np.flatnonzero(s.loss_mask) for s in sequences] if _SCORED.value == "answers" else None
    name = os.path.basename(os.path.normpath(_CHECKPOINT.value))
    calibrated = [calibration.calibrate_model(
        sale_model, [s.tokens for s in sequences], recipe, theta=_THETA.value, kl_budget=_KL_BUDGET.value,
        density=_DENSITY_BUDGET.value, score_tokens=_SCORE_TOKENS.value, scored_positions=scored, cost=cost,
        model_name=name)
        for recipe in _RECIPES.value for cost in (["first_order"] if recipe == "paper" else _COSTS.value)]
    calibrated += [sale_jax.Thresholds.load(path, num_layers=config.num_layers, num_q_heads=config.num_heads)
                   for path in _THRESHOLDS.value]
    methods = {f"sale_{recipe_label(thresholds)}": thresholds for thresholds in calibrated}
    if len(methods) < len(calibrated):
        raise ValueError(f"two methods of --recipes and --thresholds record the same recipe and bound: "
                         f"{[recipe_label(thresholds) for thresholds in calibrated]}")
    return methods


def prefill_ms(models: dict, thresholds: dict, length: int) -> dict:
    """Per method, the median time (ms) of prefilling one sequence of `length` tokens (last logits only), the
    methods timed in turn within each round."""
    data = retrieval_task.batch((_SEED.value, 4, length), 1, length, _TASK.num_records.value,
                                _TASK.num_queries.value, filler=_TASK.filler.value)
    tokens, lengths = jax.numpy.asarray(data.tokens), jax.numpy.asarray([length])
    prefills = {name: functools.partial(llama.prefill, model, tokens, lengths, thresholds[name], all_logits=False)
                for name, model in models.items()}
    return {name: 1e3 * seconds
            for name, seconds in timing.interleaved_median_seconds(prefills, _PREFILL_REPEATS.value).items()}


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
    results.save_figure(fig, path, "exact-match retrieval accuracy (d = density of kept blocks)")


def _plot_payoff(cells: dict, prefill: dict, lengths: list[int], path: str) -> None:
    plt = results.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = [name for name in prefill[str(lengths[0])] if name != "dense"]
    for length, marker in zip(lengths, "osD^v<>"):
        times = prefill[str(length)]
        for index, method in enumerate(methods):
            accuracy = np.mean([cell[method]["exact_match"] for cell in cells[str(length)]])
            ax.scatter(times["dense"] / times[method], accuracy, marker=marker, color=f"C{index}",
                       label=method if length == lengths[0] else None)
        dense_accuracy = np.mean([cell["dense"]["exact_match"] for cell in cells[str(length)]])
        ax.scatter(1.0, dense_accuracy, marker=marker, color="k", label=f"dense, {length // 1024}K")
    ax.set_xlabel("prefill speedup over dense attention")
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=7)
    results.save_figure(fig, path, "accuracy against prefill speed")


def main(argv):
    del argv
    lengths, depths, uniform_taus = _LENGTHS.value, _DEPTHS.value, _UNIFORM_TAUS.value
    if any(tau < 0 for tau in uniform_taus):
        raise ValueError(f"--uniform_taus must be >= 0, got {uniform_taus}")
    unknown = sorted(set(_RECIPES.value) - set(calibration.RECIPES))
    if unknown:
        raise ValueError(f"--recipes: unknown {unknown}; accepted: {calibration.RECIPES}")
    unknown = sorted(set(_COSTS.value) - set(sale_jax.calibration.COSTS))
    if unknown:
        raise ValueError(f"--costs: unknown {unknown}; accepted: {sale_jax.calibration.COSTS}")
    for length in lengths + [_CALIBRATION_LENGTH.value]:
        if length < retrieval_task.min_length(_TASK.num_records.value, _TASK.num_queries.value):
            raise ValueError(f"length {length} is too short for {_TASK.num_records.value} records and "
                             f"{_TASK.num_queries.value} queries")
    dtype = common.resolve_dtype(_DTYPE.value).name
    sale = _SALE.config(dense_below=0)  # SALE at every length
    sale_model = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype, attention="sale", sale=sale)
    config = sale_model.config
    calibrated = calibrated_thresholds(sale_model)
    files = []
    for name, thresholds in calibrated.items():
        label = name.removeprefix("sale_").replace("=", "_")
        files.append(results.beside(_OUTPUT.value, f"thresholds_{label}.json"))
        os.makedirs(os.path.dirname(files[-1]), exist_ok=True)
        thresholds.save(files[-1])
    uniform = {f"sale_uniform_tau={tau:g}": sale_jax.Thresholds.uniform(config.num_layers, config.num_heads, tau)
               for tau in uniform_taus}
    thresholds = {"dense": None, **calibrated, **uniform}
    models = {name: sale_model for name in thresholds}
    models["dense"] = llama.with_attention(sale_model, "dense")

    cells, prefill = {}, {}
    print(f"{'length':>7} {'depth':>5}  " + "  ".join(f"{name:>24}" for name in models))
    for length in lengths:
        cells[str(length)] = []
        for depth_index, depth in enumerate(depths):
            cell = score_cell(models, thresholds, length, depth_index, depth)
            cells[str(length)].append(cell)
            print(f"{length:>7} {depth:>5.2f}  " + "  ".join(
                f"{cell[name]['exact_match']:>15.3f} (d {cell[name]['density']:.2f})" for name in models),
                flush=True)
        if _PREFILL_REPEATS.value:
            prefill[str(length)] = prefill_ms(models, thresholds, length)
            print(f"{length:>7} prefill ms  " + "  ".join(
                f"{prefill[str(length)][name]:>24.1f}" for name in models), flush=True)
    plot = results.plot_path(_OUTPUT.value)
    _plot(cells, lengths, depths, plot)
    files.append(plot)
    if prefill:
        files.append(results.beside(_OUTPUT.value, "payoff.png"))
        _plot_payoff(cells, prefill, lengths, files[-1])
    results.write(_OUTPUT.value, {
        "checkpoint": _CHECKPOINT.value, "dtype": dtype, "lengths": lengths, "depths": depths,
        "sequences_per_cell": _SEQUENCES.value, "num_records": _TASK.num_records.value,
        "num_queries": _TASK.num_queries.value, "filler": _TASK.filler.value,
        "calibration": {"samples": _CALIBRATION_SAMPLES.value, "length": _CALIBRATION_LENGTH.value,
                        "files": _THRESHOLDS.value,
                        "recipes": {name: t.recipe_params for name, t in calibrated.items()}},
        "thresholds": {name: np.asarray(t.tau).tolist() for name, t in {**calibrated, **uniform}.items()},
        "prefill_ms": prefill, "cells": cells}, config.sale, files=files)


if __name__ == "__main__":
    app.run(main)
