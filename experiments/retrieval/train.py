r"""Trains a small byte-level Llama on long-context key-value retrieval (the task suite's single needle,
experiments/lib/tasks/single_needle.py) with the training library (experiments/lib/training/): lengths grow along
a curriculum at a constant number of tokens per step, with replay of earlier lengths and placement of the queried
records; the loss is cross-entropy on the answer digits, plus the loss of a training-only look-back probe without
which the key match never forms (docs/retrieval_model.md says why).

The committed checkpoint (experiments/results/retrieval_training/h200/checkpoint, 4.85M parameters, 2,400 steps
in 7 minutes on one H200; bfloat16 compute, dense attention on cuDNN; its log is beside it) is the default flags'
run:

    python -m experiments.retrieval.train --output_dir=build/run --time_limit_s=505 --data_workers=8
    python -m experiments.retrieval.export_checkpoint --checkpoint=build/run \
        --output_dir=experiments/results/retrieval_training/h200/checkpoint

A CPU smoke run (a tiny model, 40 steps, about 15 seconds):

    python -m experiments.retrieval.train --output_dir=/tmp/retrieval_smoke --hidden_size=64 \
        --intermediate_size=128 --num_layers=2 --num_heads=2 --num_kv_heads=1 --head_dim=32 \
        --curriculum=128:30,256:10 --tokens_per_step=4096 --num_records=4 --num_queries=2 --warmup_steps=5 \
        --learning_rate=3e-3 --save_every=20 --eval_lengths=128,512 --eval_sequences=16

The same command with --resume continues from the last save exactly (the run's flags must match; a finished run
only evaluates). --time_limit_s stops training (with a save) once it is exceeded, so that a run fits a machine's
limit per command and continues with --resume.

--output_dir holds the run (experiments/lib/training/run_directory.py: the model as a Hugging Face checkpoint, the
optimizer and probe state, train_state.json, train_log.jsonl with one line per step) and, after --eval_lengths,
eval.json (exact-match query accuracy and answer-digit accuracies per length).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.lib import flags as common, results, retrieval_scoring, retrieval_task
from experiments.lib.tasks.common import check_length
from experiments.lib.tasks.single_needle import SingleNeedle
from experiments.lib.training import curriculum, loop, run_directory, seeds, step as step_lib
from experiments.lib.training.optimizer import OptimizerConfig
from models import checkpoint, llama
from models.config import LlamaConfig

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the checkpoint, logs and evaluation.",
                                  required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the last save in --output_dir.")
_INIT_CHECKPOINT = flags.DEFINE_string(
    "init_checkpoint", None, "Start from this Hugging Face checkpoint's weights, with a fresh optimizer and probe, "
    "to extend a trained model's curriculum; its shape replaces the model-shape flags.")

_HIDDEN_SIZE = flags.DEFINE_integer("hidden_size", 256, "Model width.", lower_bound=1)
_INTERMEDIATE_SIZE = flags.DEFINE_integer("intermediate_size", 1024, "SwiGLU hidden width.", lower_bound=1)
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers.", lower_bound=1)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads.", lower_bound=1)
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key-value heads (GQA).", lower_bound=1)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.", lower_bound=2)
_ROPE_THETA = flags.DEFINE_float("rope_theta", 1e6, "RoPE base (no frequency scaling).")
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", "auto", ["auto", *step_lib.COMPUTE_DTYPES],
    "Activation dtype; auto: bfloat16 on GPU (dense attention then runs on cuDNN flash attention, where XLA's "
    "would hold the [T, T] scores), float32 elsewhere. Parameters and optimizer state are always float32.")

_CURRICULUM = flags.DEFINE_list("curriculum", ["256:400", "1024:300", "4096:300", "16384:300", "65536:1100"],
                                "LENGTH:STEPS stages, trained in order.")
_REPLAY_FRACTION = flags.DEFINE_float(
    "replay_fraction", 0.1, "After the first stage, this fraction of the steps (drawn per step from the seed) "
    "trains at the length of an earlier stage (uniformly drawn), so the long stages do not unlearn the short "
    "contexts; 0: every step at its stage's length.", lower_bound=0.0, upper_bound=1.0)
_PLACED_FRACTION = flags.DEFINE_float(
    "placed_fraction", 0.25, "This fraction of the steps (drawn per step from the seed) puts the queried records "
    "next to each other at one depth, as experiments/accuracy/retrieval_eval.py does: half of them at an end of "
    "the context (depth 0 or 1: the farthest back, or right before the queries), half at a uniformly drawn depth; "
    "scattered records rarely land there. 0: every step scatters them.", lower_bound=0.0, upper_bound=1.0)
_TOKENS_PER_STEP = flags.DEFINE_integer("tokens_per_step", 131_072,
                                        "Tokens per step: the batch is this // length, at least 1.", lower_bound=1)
_TASK = common.RetrievalTaskFlags.define()
_FILLER_LOSS_WEIGHT = flags.DEFINE_float(
    "filler_loss_weight", 0.0, "Weight of an auxiliary next-token loss on the filler (useful with --filler=words: "
    "its repeated words train in-context matching); 0: answer digits only.", lower_bound=0.0)

_LOOKBACK_TOKENS = flags.DEFINE_integer(
    "lookback_tokens", 3, "A training-only linear probe on the residual after the first layer predicts each of the "
    "previous this many tokens (auxiliary loss; not part of the saved model). It makes the first layer gather "
    "local context at every position, which the key match needs (experiments/lib/training/lookback_probe.py); "
    "0: no probe.", lower_bound=0)
_LOOKBACK_LOSS_WEIGHT = flags.DEFINE_float("lookback_loss_weight", 1.0, "Weight of the look-back probe's loss.",
                                           lower_bound=0.0)

_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 200, "Linear warmup from 0; then cosine decay to a tenth "
                                     "of the peak at the end of the curriculum.", lower_bound=1)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay, on matrices only (not norm gains).")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the initialization and every batch.", lower_bound=0)

_SAVE_EVERY = flags.DEFINE_integer("save_every", 500, "Steps between saves (and one at the end).", lower_bound=1)
_TIME_LIMIT_S = flags.DEFINE_float("time_limit_s", 0.0, "Stop (and save) once training has run this long; "
                                   "0: no limit.", lower_bound=0.0)
_DATA_WORKERS = flags.DEFINE_integer(
    "data_workers", min(8, max(0, (os.cpu_count() or 1) - 2)), "Processes building the next steps' batches while "
    "the device trains (experiments/lib/batch_prefetch.py; results do not depend on it); 0: built between steps.",
    lower_bound=0)
_EVAL_LENGTHS = common.define_numbers("eval_lengths", [], "Lengths for the exact-match evaluation after training.",
                                      kind=int)
_EVAL_SEQUENCES = flags.DEFINE_integer("eval_sequences", 64, "Sequences evaluated per length.", lower_bound=1)

# The flags that define a run: --resume refuses to continue a run under different values.
_RUN_FLAGS = (_INIT_CHECKPOINT, _HIDDEN_SIZE, _INTERMEDIATE_SIZE, _NUM_LAYERS, _NUM_HEADS, _NUM_KV_HEADS, _HEAD_DIM,
              _ROPE_THETA, _COMPUTE_DTYPE, _CURRICULUM, _REPLAY_FRACTION, _PLACED_FRACTION, _TOKENS_PER_STEP,
              _TASK.num_records, _TASK.num_queries, _TASK.filler, _FILLER_LOSS_WEIGHT, _LOOKBACK_TOKENS,
              _LOOKBACK_LOSS_WEIGHT, _LEARNING_RATE, _WARMUP_STEPS, _WEIGHT_DECAY, _SEED)
_EVAL_FILE = "eval.json"


def evaluate(model: llama.Llama, task: SingleNeedle, lengths: list[int], num_sequences: int, tokens_per_step: int,
             seed: int, compute_dtype: str) -> dict[int, dict]:
    """Exact-match query accuracy and answer-digit accuracies at each length, on sequences no training step saw."""
    computed = step_lib.as_computed(model, compute_dtype)
    scores = {}
    for length in lengths:
        batch_size = curriculum.batch_size_for(length, tokens_per_step)
        hits = []
        for index in range(math.ceil(num_sequences / batch_size)):
            data = retrieval_task.batch((seed, seeds.EVALUATION, length, index), batch_size, length,
                                        task.num_records, task.num_queries, filler=task.filler)
            batch_hits, _ = retrieval_scoring.answer_hits(computed, data.tokens, data.query_positions)
            hits.append(np.asarray(batch_hits))
        scores[length] = retrieval_scoring.summarize(np.concatenate(hits)[:num_sequences])
    return scores


def recipe_from_flags() -> loop.Recipe:
    """The training recipe of the flags (docs/retrieval_model.md: the defaults made the committed model)."""
    compute_dtype = _COMPUTE_DTYPE.value
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    return loop.Recipe(
        task=SingleNeedle(_TASK.num_records.value, _TASK.num_queries.value, _TASK.filler.value),
        curriculum=curriculum.Curriculum(curriculum.parse_stages(_CURRICULUM.value), _TOKENS_PER_STEP.value,
                                         _REPLAY_FRACTION.value, _PLACED_FRACTION.value),
        optimizer=OptimizerConfig(_LEARNING_RATE.value, _WARMUP_STEPS.value, _WEIGHT_DECAY.value),
        loss=step_lib.LossConfig(_FILLER_LOSS_WEIGHT.value, _LOOKBACK_TOKENS.value, _LOOKBACK_LOSS_WEIGHT.value),
        compute_dtype=compute_dtype, seed=_SEED.value)


def _initial_model() -> llama.Llama:
    if _INIT_CHECKPOINT.value:
        return checkpoint.load_llama(_INIT_CHECKPOINT.value, dtype=run_directory.PARAM_DTYPE)
    config = LlamaConfig(
        vocab_size=256, hidden_size=_HIDDEN_SIZE.value, intermediate_size=_INTERMEDIATE_SIZE.value,
        num_layers=_NUM_LAYERS.value, num_heads=_NUM_HEADS.value, num_kv_heads=_NUM_KV_HEADS.value,
        head_dim=_HEAD_DIM.value, rope_theta=_ROPE_THETA.value, rope_scaling=None, attention="dense",
        dtype=run_directory.PARAM_DTYPE)
    return llama.Llama(config, nnx.Rngs(_SEED.value))


def main(argv):
    del argv
    recipe = recipe_from_flags()
    for length in _EVAL_LENGTHS.value:
        check_length(recipe.task, length, "--eval_lengths")

    output_dir = _OUTPUT_DIR.value
    trained = loop.train(recipe, output_dir, _initial_model, {holder.name: holder.value for holder in _RUN_FLAGS},
                         resume=_RESUME.value, save_every=_SAVE_EVERY.value, time_limit_s=_TIME_LIMIT_S.value,
                         data_workers=_DATA_WORKERS.value)
    if not trained.finished:
        print(f"stopped at step {trained.steps_done} of {recipe.curriculum.total_steps} after "
              f"--time_limit_s={_TIME_LIMIT_S.value}; saved in {output_dir}: continue with --resume")
        return
    if _EVAL_LENGTHS.value:
        scores = evaluate(trained.trainee.model, recipe.task, _EVAL_LENGTHS.value, _EVAL_SEQUENCES.value,
                          _TOKENS_PER_STEP.value, _SEED.value, recipe.compute_dtype)
        results.write(os.path.join(output_dir, _EVAL_FILE), {"step": trained.steps_done, "results": scores}, None)
        print("length   exact match   first digit   all digits   queries")
        for length, result in scores.items():
            print(f"{length:>6}   {result['exact_match']:>11.3f}   {result['first_digit_accuracy']:>11.3f}   "
                  f"{result['digit_accuracy']:>10.3f}   {result['queries']:>7}")


if __name__ == "__main__":
    app.run(main)
