"""Calibrates per-layer, per-head SALE thresholds and writes them to a thresholds file.

    python -m experiments.tools.calibrate --checkpoint=DIR --output=t.json --seq_len=65536 --num_samples=5
    python -m experiments.tools.calibrate --checkpoint=DIR --recipe=kl_budget --kl_budget=0.01 --output=t.json
    python -m experiments.tools.calibrate --output=/tmp/thresholds.json   # no checkpoint: synthetic LLM-like layers

With a Hugging Face checkpoint of a supported family (models.config.FAMILIES), the samples are the paper's JSON
key-value retrieval prompts as bytes (--prompts=json_kv, meaningful for byte-level models), sequences of the
retrieval task the project's retrieval model was trained on (--prompts=retrieval, drawn from a stream no training or
evaluation uses), or --tokens (prompts.npy, int [N, T], for a model with its own tokenizer). The recipe
(models.calibration) is the paper's (bound --theta; each layer's (q, k, v) captured from the dense forward pass one
layer at a time) or a budget recipe: the sparsest thresholds whose model stays within --kl_budget nats of dense, or
spends --density_budget. Without a checkpoint the paper recipe or the density_budget recipe (heads priced by their
per-row L1 error, `sale_jax.calibration.calibrate_to_density`) runs, each layer of each sample an independent
draw of `experiments.lib.workloads.llm_like_qkv`. The thresholds file records the model's name, the recipe with its
parameters and the `SaleConfig` it was calibrated under (`sale_jax.Thresholds.save`).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, retrieval_task, workloads
from experiments.lib.kv_prompts import json_kv_prompt
from models import calibration as model_calibration, checkpoint
from sale_jax import calibration

_OUTPUT = flags.DEFINE_string("output", None, "Thresholds file to write (JSON).", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face folder (a supported family) to calibrate.")
_TOKENS = flags.DEFINE_string("tokens", None, "With --checkpoint: prompts as an .npy of int [N, T].")
_PROMPTS = flags.DEFINE_enum("prompts", "json_kv", ["json_kv", "retrieval"], "With --checkpoint and no --tokens: "
                             "the paper's JSON key-value prompts, or the retrieval task's sequences.")
_TASK = common.RetrievalTaskFlags.define()  # --prompts=retrieval: as the model was trained
_RECIPE = flags.DEFINE_enum("recipe", "paper", list(model_calibration.RECIPES), "Calibration recipe (kl_budget "
                            "needs --checkpoint).")
_KL_BUDGET = flags.DEFINE_float("kl_budget", calibration.DEFAULT_KL_BUDGET,
                                "kl_budget recipe: mean KL divergence from dense (nats).")
_DENSITY_BUDGET = flags.DEFINE_float("density_budget", calibration.DEFAULT_DENSITY_BUDGET,
                                     "density_budget recipe: mean density.")
_SCORE_TOKENS = flags.DEFINE_integer("score_tokens", model_calibration.DEFAULT_SCORE_TOKENS,
                                     "Budget recipes with --scored=end: positions scored at the end of each prompt.")
_SCORED = flags.DEFINE_enum("scored", "end", ["end", "answers"], "Budget recipes: score the model's predictions at "
                            "each prompt's last --score_tokens positions, or (--prompts=retrieval) where the "
                            "retrieval model answers (its own predictions there, not the true answers).")
_COST = flags.DEFINE_enum("cost", "first_order", list(calibration.COSTS),
                          "Budget recipes: the price of a head's attention error.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Calibration samples.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Layers (synthetic only).")
_SEQ_LEN = common.define_seq_len(4096, "Tokens per sample.")
_HEADS = common.HeadFlags.define(q_heads=8, kv_heads=2, head_dim=128)  # synthetic layers only
_DTYPE = common.define_dtype("auto", "Input (or, with --checkpoint, model) dtype.")
_SALE = common.SaleFlags.define(backend="auto")  # as at inference
_THETA = flags.DEFINE_float("theta", calibration.DEFAULT_THETA, "Per-row L1 error bound.")
_TAU0 = flags.DEFINE_float("tau0", sale_jax.DEFAULT_TAU, "Starting threshold.")
_TAU_MIN = flags.DEFINE_float("tau_min", calibration.DEFAULT_TAU_MIN, "Below this a head becomes dense.")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")


def synthetic_layer_samples(dtype):
    """Per sample, a generator over layers of LLM-like (q, k, v): each layer keeps its heads across samples."""
    def layers(sample):
        for layer in range(_NUM_LAYERS.value):
            work = workloads.llm_like_qkv(_SEED.value * 1_000_003 + sample * 1009 + layer, 1, _SEQ_LEN.value,
                                          *_HEADS.values(), dtype=dtype, head_seed=_SEED.value * 1009 + layer)
            yield work.q, work.k, work.v

    return [layers(sample) for sample in range(_NUM_SAMPLES.value)]


def _prompts(vocab_size: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The calibration prompts and, with --scored=answers, each one's scored positions."""
    if _SCORED.value == "answers" and (_TOKENS.value or _PROMPTS.value != "retrieval"):
        raise ValueError("--scored=answers needs --prompts=retrieval and no --tokens: only the retrieval task's "
                         "prompts mark where the model answers")
    if _TOKENS.value:
        return list(np.load(_TOKENS.value)), None
    if _PROMPTS.value == "retrieval":
        # Stream (seed, 6, i): apart from training's (seed 0) and retrieval_eval's (seed, 2 or 3, ...) streams.
        sequences = [retrieval_task.sequence((_SEED.value, 6, i), _SEQ_LEN.value, _TASK.num_records.value,
                                             _TASK.num_queries.value, filler=_TASK.filler.value)
                     for i in range(_NUM_SAMPLES.value)]
        scored = [np.flatnonzero(s.loss_mask) for s in sequences] if _SCORED.value == "answers" else None
        return [s.tokens for s in sequences], scored
    return [json_kv_prompt(_SEED.value + i, _SEQ_LEN.value).tokens % vocab_size
            for i in range(_NUM_SAMPLES.value)], None


def _calibrate_checkpoint(config: sale_jax.SaleConfig, dtype: str) -> sale_jax.Thresholds:
    model = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype, attention="sale", sale=config)
    search = dict(tau0=_TAU0.value, tau_min=_TAU_MIN.value) if _RECIPE.value == "paper" else {}
    prompts, scored = _prompts(model.config.vocab_size)
    return model_calibration.calibrate_model(
        model, prompts, _RECIPE.value, theta=_THETA.value, kl_budget=_KL_BUDGET.value,
        density=_DENSITY_BUDGET.value, score_tokens=_SCORE_TOKENS.value, scored_positions=scored, cost=_COST.value,
        model_name=os.path.basename(os.path.normpath(_CHECKPOINT.value)), **search)


def main(argv):
    del argv
    dtype = common.resolve_dtype(_DTYPE.value)
    config = _SALE.config()
    if _CHECKPOINT.value:
        thresholds = _calibrate_checkpoint(config, dtype.name)
    elif _RECIPE.value == "kl_budget":
        raise ValueError("--recipe=kl_budget measures a model's output distribution: it needs --checkpoint")
    elif _RECIPE.value == "density_budget":
        thresholds = calibration.calibrate_to_density(
            synthetic_layer_samples(dtype), _NUM_LAYERS.value, _HEADS.q_heads.value, config, _DENSITY_BUDGET.value,
            model_name=f"synthetic-llm-like-{_SEQ_LEN.value}")
    else:
        thresholds = sale_jax.calibrate(
            synthetic_layer_samples(dtype), _NUM_LAYERS.value, _HEADS.q_heads.value, config,
            theta=_THETA.value, tau0=_TAU0.value, tau_min=_TAU_MIN.value,
            model_name=f"synthetic-llm-like-{_SEQ_LEN.value}")
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    thresholds.save(_OUTPUT.value)
    print(f"wrote {_OUTPUT.value}: tau [{thresholds.num_layers}, {thresholds.num_q_heads}], "
          f"{int((thresholds.tau == 0).sum())} dense heads")


if __name__ == "__main__":
    app.run(main)
