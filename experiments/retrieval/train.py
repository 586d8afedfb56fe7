r"""Trains a small byte-level Llama on long-context key-value retrieval (experiments/lib/retrieval_task.py).

Lengths grow along a curriculum at a constant number of tokens per step; the loss is cross-entropy on the answer
digits of the queries, plus a look-back loss: a linear probe (not part of the saved model) reads the previous
`--lookback_tokens` tokens off the residual stream after the first layer. Without it the key match never forms
(docs/retrieval_model.md): answering `?KK:` needs, at each record's first
digit, the key letters two and three tokens back, which the first layer has no reason to gather until a later
layer uses them, and no later layer can use them before they are there. Every other target has a shortcut (the
later digits are copied from whichever record the first came from), so the model settles there. The probe makes
the first layer gather its local context everywhere; the match then forms within a few hundred steps.

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

--output_dir holds: config.json and model.safetensors (Hugging Face format: `models.checkpoint.load_llama`, with
dtype="float32" to get the float32 weights back), optimizer_state.npz (the optimizer's state leaves by path),
train_state.json (steps done, curriculum position, the run's flags), train_log.jsonl (one line per step) and, after
--eval_lengths, eval.json (exact-match query accuracy and answer-digit accuracies per length); with the
look-back probe, lookback_probe.npz (its weights, for --resume).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags
from flax import nnx

from experiments.lib import batch_prefetch, flags as common, results, retrieval_scoring, retrieval_task
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
    "compute_dtype", "auto", ["auto", "float32", "bfloat16"],
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
    "local context at every position, which the key match needs (see the module docstring); 0: no probe.",
    lower_bound=0)
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
_EVAL_LENGTHS = flags.DEFINE_list("eval_lengths", [], "Lengths for the exact-match evaluation after training.")
_EVAL_SEQUENCES = flags.DEFINE_integer("eval_sequences", 64, "Sequences evaluated per length.", lower_bound=1)

# The flags that define a run: --resume refuses to continue a run under different values.
_RUN_FLAGS = (_INIT_CHECKPOINT, _HIDDEN_SIZE, _INTERMEDIATE_SIZE, _NUM_LAYERS, _NUM_HEADS, _NUM_KV_HEADS, _HEAD_DIM, _ROPE_THETA,
              _COMPUTE_DTYPE, _CURRICULUM, _REPLAY_FRACTION, _PLACED_FRACTION, _TOKENS_PER_STEP, _TASK.num_records,
              _TASK.num_queries, _TASK.filler, _FILLER_LOSS_WEIGHT, _LOOKBACK_TOKENS, _LOOKBACK_LOSS_WEIGHT,
              _LEARNING_RATE, _WARMUP_STEPS, _WEIGHT_DECAY, _SEED)

ADAM_BETAS = (0.9, 0.95)
GRADIENT_CLIP_NORM = 1.0  # guards the updates at each jump to a longer length
FINAL_LEARNING_RATE_FRACTION = 0.1
PARAM_DTYPE = "float32"
# Random streams under --seed: (seed, 0, step) training batches, (seed, 1, ...) evaluation sequences, (seed, 4,
# step) replay draws, (seed, 5, step) placement draws (experiments/accuracy/retrieval_eval.py uses (seed, 2 or 3,
# ...)).
_REPLAY_STREAM, _PLACEMENT_STREAM = 4, 5
_STATE_FILE, _OPTIMIZER_FILE, _PROBE_FILE, _LOG_FILE, _EVAL_FILE = (
    "train_state.json", "optimizer_state.npz", "lookback_probe.npz", "train_log.jsonl", "eval.json")


def parse_curriculum(stages: list[str], num_records: int, num_queries: int) -> list[tuple[int, int]]:
    """`["256:1500", ...]` -> `[(256, 1500), ...]`, each length long enough for the records and queries."""
    parsed = []
    for stage in stages:
        try:
            length, steps = (int(part) for part in stage.split(":"))
        except ValueError:
            raise ValueError(f"--curriculum: expected LENGTH:STEPS stages, got {stage!r}") from None
        if steps < 1:
            raise ValueError(f"--curriculum: stage {stage!r} has no steps")
        check_length(length, num_records, num_queries, "--curriculum")
        parsed.append((length, steps))
    if not parsed:
        raise ValueError("--curriculum is empty")
    return parsed


def check_length(length: int, num_records: int, num_queries: int, flag: str):
    shortest = retrieval_task.min_length(num_records, num_queries)
    if length < shortest:
        raise ValueError(f"{flag}: length {length} is too short for {num_records} records and {num_queries} "
                         f"queries (need >= {shortest}; lower --num_records or --num_queries)")


def stage_at(curriculum: list[tuple[int, int]], step: int) -> tuple[int, int]:
    """(stage index, length) of the step after `step` steps are done."""
    end = 0
    for index, (length, steps) in enumerate(curriculum):
        end += steps
        if step < end:
            return index, length
    raise ValueError(f"step {step} is past the curriculum's {end} steps")


def length_at(curriculum: list[tuple[int, int]], step: int, replay_fraction: float, seed: int) -> int:
    """The sequence length of the step after `step` steps: its stage's, or with probability `replay_fraction`
    (after the first stage) an earlier stage's, drawn from `seed` and the step alone (a resumed run draws the
    same)."""
    stage, length = stage_at(curriculum, step)
    if stage and replay_fraction:
        rng = np.random.default_rng((seed, _REPLAY_STREAM, step))
        if rng.random() < replay_fraction:
            return curriculum[rng.integers(stage)][0]
    return length


def depth_at(step: int, placed_fraction: float, seed: int) -> float | None:
    """Where the step's queried records sit (`retrieval_task.sequence`'s depth): None (scattered), or with
    probability `placed_fraction` a depth drawn from `seed` and the step alone (a resumed run draws the same)."""
    if placed_fraction:
        rng = np.random.default_rng((seed, _PLACEMENT_STREAM, step))
        if rng.random() < placed_fraction:
            return float(rng.integers(2)) if rng.random() < 0.5 else float(rng.random())
    return None


def batch_size_for(length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // length)


class LookbackProbe(nnx.Module):
    """Reads the previous `num_tokens` tokens off the residual stream after the first layer (one linear map per
    distance, after a norm). Its loss teaches the first layer to gather local context at every position."""

    def __init__(self, hidden_size: int, vocab_size: int, num_tokens: int, rngs: nnx.Rngs):
        self.num_tokens, self.vocab_size = num_tokens, vocab_size
        self.norm = llama.RMSNorm(hidden_size, 1e-5, jnp.float32)
        self.readout = nnx.Linear(hidden_size, num_tokens * vocab_size, use_bias=False, rngs=rngs)

    def loss(self, residual: jax.Array, tokens: jax.Array) -> jax.Array:
        """Mean cross-entropy of predicting `tokens[t - j]` at every `t >= j`, averaged over `j = 1..num_tokens`."""
        logits = self.readout(self.norm(residual.astype(jnp.float32)))
        logits = logits.reshape(*tokens.shape, self.num_tokens, self.vocab_size)
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[:, back:, back - 1], tokens[:, :-back]).mean()
                  for back in range(1, self.num_tokens + 1)]
        return sum(losses) / self.num_tokens


class Trainee(nnx.Module):
    """What training updates: the Llama, and the look-back probe when there is one (`probe` None otherwise)."""

    def __init__(self, model: llama.Llama, probe: LookbackProbe | None):
        self.model, self.probe = model, probe


def make_optimizer(trainee: Trainee, learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float) -> nnx.Optimizer:
    if warmup_steps >= total_steps:
        raise ValueError(f"--warmup_steps ({warmup_steps}) must be below the curriculum's {total_steps} steps")
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                                  learning_rate * FINAL_LEARNING_RATE_FRACTION)
    tx = optax.chain(optax.clip_by_global_norm(GRADIENT_CLIP_NORM),
                     optax.adamw(schedule, *ADAM_BETAS, weight_decay=weight_decay, mask=_matrices))
    return nnx.Optimizer(trainee, tx, wrt=nnx.Param)


def _matrices(params):
    """Weight decay applies to these (the embedding, projections and probe), not to the norms' gains."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _as_computed(model: llama.Llama, compute_dtype: str) -> llama.Llama:
    """The model as it runs. Behind a bfloat16 config the float32 weights are cast to bfloat16 where used (matmuls,
    attention and the residual stream run in bfloat16), and the gradients still come back in float32."""
    return model if compute_dtype == model.config.dtype else llama.with_config(model, dtype=compute_dtype)


def training_loss(trainee: Trainee, tokens: jax.Array, loss_mask: jax.Array, filler_mask: jax.Array,
                  compute_dtype: str, filler_loss_weight: float, lookback_loss_weight: float):
    """Mean cross-entropy over the answer-digit targets, plus `filler_loss_weight` times the mean next-token loss
    on the filler and `lookback_loss_weight` times the look-back probe's loss; and metrics: those three losses and
    the fractions of answer digits and of first digits alone predicted right (argmax). The first digit is the
    lookup itself; the others can be copied from whichever record it came from, so the overall accuracy climbs
    well before the model finds the right record."""
    all_logits, residuals = _as_computed(trainee.model, compute_dtype).train_forward(tokens)
    logits, targets = all_logits[:, :-1], tokens[:, 1:]
    mask, filler_mask = loss_mask[:, :-1], filler_mask[:, :-1]
    first_digits = mask * (1 - jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1])  # answer targets after a non-answer one
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    answer = (losses * mask).sum() / mask.sum()
    filler = (losses * filler_mask).sum() / jnp.maximum(filler_mask.sum(), 1)
    lookback = jnp.float32(0.0) if trainee.probe is None else trainee.probe.loss(residuals[0], tokens)
    metrics = {"loss": answer, "filler_loss": filler, "lookback_loss": lookback,
               "accuracy": (correct * mask).sum() / mask.sum(),
               "first_digit_accuracy": (correct * first_digits).sum() / first_digits.sum()}
    return answer + filler_loss_weight * filler + lookback_loss_weight * lookback, metrics


@functools.partial(nnx.jit, static_argnames=("compute_dtype", "filler_loss_weight", "lookback_loss_weight"))
def train_step(trainee: Trainee, optimizer: nnx.Optimizer, tokens: jax.Array, loss_mask: jax.Array,
               filler_mask: jax.Array, compute_dtype: str, filler_loss_weight: float = 0.0,
               lookback_loss_weight: float = 0.0) -> dict:
    """One AdamW update in place; returns the metrics before it."""
    (_, metrics), grads = nnx.value_and_grad(training_loss, has_aux=True)(
        trainee, tokens, loss_mask, filler_mask, compute_dtype, filler_loss_weight, lookback_loss_weight)
    optimizer.update(trainee, grads)
    return metrics


def evaluate(model: llama.Llama, lengths: list[int], num_sequences: int, tokens_per_step: int, num_records: int,
             num_queries: int, filler: str, seed: int, compute_dtype: str) -> dict[int, dict]:
    """Exact-match query accuracy and answer-digit accuracy at each length, on sequences no training step saw."""
    scores = {}
    for length in lengths:
        batch_size = batch_size_for(length, tokens_per_step)
        hits = []
        for index in range(math.ceil(num_sequences / batch_size)):
            data = retrieval_task.batch((seed, 1, length, index), batch_size, length, num_records, num_queries,
                                        filler=filler)
            batch_hits, _ = retrieval_scoring.answer_hits(_as_computed(model, compute_dtype), data.tokens,
                                                          data.query_positions)
            hits.append(np.asarray(batch_hits))
        scores[length] = retrieval_scoring.summarize(np.concatenate(hits)[:num_sequences])
    return scores


def save(output_dir: str, trainee: Trainee, optimizer: nnx.Optimizer, train_state: dict):
    """The checkpoint, the probe, the optimizer state, then train_state.json (last: it says what was saved, and
    names the files beside it)."""
    checkpoint.save_llama(trainee.model, output_dir)
    written = [os.path.join(output_dir, "config.json"), *checkpoint.checkpoint_files(output_dir),
               os.path.join(output_dir, _OPTIMIZER_FILE), os.path.join(output_dir, _LOG_FILE)]
    if trainee.probe is not None:
        _save_state(trainee.probe, os.path.join(output_dir, _PROBE_FILE))
        written.append(os.path.join(output_dir, _PROBE_FILE))
    _save_state(optimizer, os.path.join(output_dir, _OPTIMIZER_FILE))
    results.write(os.path.join(output_dir, _STATE_FILE), train_state, None, files=written)


def _save_state(node: nnx.Module | nnx.Optimizer, path: str):
    np.savez(path, **{_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(node))})


def restore_state(node: nnx.Module | nnx.Optimizer, path: str):
    """Sets every state leaf of `node` (an optimizer, the probe) from a file written by `save`."""
    flat = nnx.to_flat_state(nnx.state(node))
    with np.load(path) as saved:
        expected, found = {_key(p) for p, _ in flat}, set(saved.files)
        if expected != found:
            raise ValueError(f"{path} does not match this {type(node).__name__}: missing "
                             f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
        for p, variable in flat:
            variable.set_value(jnp.asarray(saved[_key(p)]))
    nnx.update(node, nnx.from_flat_state(flat))


def _key(path: tuple) -> str:
    return "/".join(map(str, path))


def _run_flags() -> dict:
    return {holder.name: holder.value for holder in _RUN_FLAGS}


def _initial_model() -> llama.Llama:
    if _INIT_CHECKPOINT.value:
        return checkpoint.load_llama(_INIT_CHECKPOINT.value, dtype=PARAM_DTYPE)
    config = LlamaConfig(
        vocab_size=256, hidden_size=_HIDDEN_SIZE.value, intermediate_size=_INTERMEDIATE_SIZE.value,
        num_layers=_NUM_LAYERS.value, num_heads=_NUM_HEADS.value, num_kv_heads=_NUM_KV_HEADS.value,
        head_dim=_HEAD_DIM.value, rope_theta=_ROPE_THETA.value, rope_scaling=None, attention="dense",
        dtype=PARAM_DTYPE)
    return llama.Llama(config, nnx.Rngs(_SEED.value))


def _resume(output_dir: str, run_flags: dict) -> tuple[llama.Llama, int]:
    """The saved model and the steps done, after checking that the saved run is this one."""
    with open(os.path.join(output_dir, _STATE_FILE)) as f:
        saved = json.load(f)
    changed = {name: (saved["flags"].get(name), value) for name, value in run_flags.items()
               if saved["flags"].get(name) != value}
    if changed:
        raise ValueError(f"--resume: {output_dir} holds a run with other flags (saved, given): {changed}")
    model = checkpoint.load_llama(output_dir, dtype=PARAM_DTYPE)
    return model, saved["step"]


def _truncate_log(path: str, step: int):
    """Drops log lines past the save that a run resumes from (steps it trained after saving, then lost)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)


def main(argv):
    del argv
    output_dir = _OUTPUT_DIR.value
    num_records, num_queries = _TASK.num_records.value, _TASK.num_queries.value
    curriculum = parse_curriculum(_CURRICULUM.value, num_records, num_queries)
    total_steps = sum(steps for _, steps in curriculum)
    try:
        eval_lengths = [int(length) for length in _EVAL_LENGTHS.value]
    except ValueError:
        raise ValueError(f"--eval_lengths: expected integers, got {_EVAL_LENGTHS.value}") from None
    for length in eval_lengths:
        check_length(length, num_records, num_queries, "--eval_lengths")
    compute_dtype = _COMPUTE_DTYPE.value
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    run_flags = _run_flags()

    log_path = os.path.join(output_dir, _LOG_FILE)
    if _RESUME.value:
        model, step = _resume(output_dir, run_flags)
        _truncate_log(log_path, step)
    else:
        if os.path.exists(os.path.join(output_dir, _STATE_FILE)):
            raise ValueError(f"{output_dir} already holds a run: pass --resume, or another --output_dir")
        os.makedirs(output_dir, exist_ok=True)
        model, step = _initial_model(), 0
        open(log_path, "w").close()
    probe = None
    if _LOOKBACK_TOKENS.value:
        probe = LookbackProbe(model.config.hidden_size, model.config.vocab_size, _LOOKBACK_TOKENS.value,
                              nnx.Rngs(_SEED.value + 1))
    trainee = Trainee(model, probe)
    optimizer = make_optimizer(trainee, _LEARNING_RATE.value, _WARMUP_STEPS.value, total_steps,
                               _WEIGHT_DECAY.value)
    if _RESUME.value:
        if probe is not None:
            restore_state(probe, os.path.join(output_dir, _PROBE_FILE))
        restore_state(optimizer, os.path.join(output_dir, _OPTIMIZER_FILE))

    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{num_params / 1e6:.2f}M parameters, {compute_dtype} compute on {jax.devices()[0].device_kind}; "
          f"curriculum {curriculum}, {_TOKENS_PER_STEP.value} tokens per step; from step {step} of {total_steps}")

    def batch_arguments(step):
        length = length_at(curriculum, step, _REPLAY_FRACTION.value, _SEED.value)
        return ((_SEED.value, 0, step), batch_size_for(length, _TOKENS_PER_STEP.value), length, num_records,
                num_queries, depth_at(step, _PLACED_FRACTION.value, _SEED.value), _TASK.filler.value)

    def save_now(step):
        stage, length = stage_at(curriculum, step - 1)
        save(output_dir, trainee, optimizer, {"step": step, "stage": stage, "length": length,
                                            "stage_step": step - sum(s for _, s in curriculum[:stage]),
                                            "flags": run_flags})

    started = last = time.perf_counter()
    progress = tqdm.tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    batches = batch_prefetch.BatchPrefetcher(retrieval_task.batch, batch_arguments, total_steps,
                                             _DATA_WORKERS.value)
    upcoming = batches.get(step) if step < total_steps else None
    with open(log_path, "a") as log, batches:
        while step < total_steps:
            data = upcoming
            metrics = train_step(trainee, optimizer, data.tokens, data.loss_mask, data.filler_mask,
                                 compute_dtype=compute_dtype, filler_loss_weight=_FILLER_LOSS_WEIGHT.value,
                                 lookback_loss_weight=_LOOKBACK_LOSS_WEIGHT.value)
            step += 1
            # Dispatch is asynchronous: the next batch is fetched (or built) while the device works on this one.
            upcoming = batches.get(step) if step < total_steps else None
            metrics = {name: float(value) for name, value in metrics.items()}
            loss = metrics["loss"]
            now = time.perf_counter()
            length = data.tokens.shape[1]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss {loss} at step {step} (length {length}); the last save is in "
                                         f"{output_dir}")
            log.write(json.dumps({"step": step, "length": length, "batch_size": data.tokens.shape[0],
                                  **metrics, "seconds": round(now - last, 4)}) + "\n")
            last = now
            progress.update()
            progress.set_postfix(length=length, loss=f"{loss:.4f}", acc=f"{metrics['accuracy']:.3f}",
                                 first=f"{metrics['first_digit_accuracy']:.3f}")
            out_of_time = _TIME_LIMIT_S.value and now - started > _TIME_LIMIT_S.value
            if step % _SAVE_EVERY.value == 0 or step == total_steps or out_of_time:
                log.flush()
                save_now(step)
            if out_of_time:
                break
    progress.close()

    if step < total_steps:
        print(f"stopped at step {step} of {total_steps} after --time_limit_s={_TIME_LIMIT_S.value}; "
              f"saved in {output_dir}: continue with --resume")
        return
    if eval_lengths:
        scores = evaluate(model, eval_lengths, _EVAL_SEQUENCES.value, _TOKENS_PER_STEP.value, num_records,
                          num_queries, _TASK.filler.value, _SEED.value, compute_dtype)
        results.write(os.path.join(output_dir, _EVAL_FILE), {"step": step, "results": scores}, None)
        print("length   exact match   first digit   all digits   queries")
        for length, result in scores.items():
            print(f"{length:>6}   {result['exact_match']:>11.3f}   {result['first_digit_accuracy']:>11.3f}   "
                  f"{result['digit_accuracy']:>10.3f}   {result['queries']:>7}")


if __name__ == "__main__":
    app.run(main)
