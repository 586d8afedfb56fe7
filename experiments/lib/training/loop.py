"""`train`: a recipe's steps on a model, saved every so often into a run folder (`run_directory`), and resumable
from its last save to the same result, bit for bit where the device computes deterministically (a CPU; not cuDNN's
attention backward).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import tqdm
from flax import nnx

from experiments.lib import batch_prefetch
from experiments.lib.tasks import common
from experiments.lib.training import run_directory, seeds
from experiments.lib.training.curriculum import Curriculum
from experiments.lib.training.optimizer import OptimizerConfig, make_optimizer
from experiments.lib.training.step import COMPUTE_DTYPES, LossConfig, Trainee, train_step
from models import llama


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a run trains on and how: the same recipe on the same initial model trains the same steps. `task` is
    any task of the suite's interface (experiments/lib/tasks/common.py), or a weighted mixture of several
    (`experiments.lib.tasks.registry.Mixture`)."""
    task: common.Task
    curriculum: Curriculum
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    compute_dtype: str = "float32"  # of the activations; parameters and optimizer state are float32
    seed: int = 0  # of every batch and draw (`seeds`), and of the probe's initialization

    def __post_init__(self):
        common.check_task(self.task)
        for length in self.curriculum.lengths:
            common.check_length(self.task, length, "curriculum")
        if self.curriculum.placed_fraction and not self.task.has_depth:
            raise ValueError(f"curriculum: placed_fraction {self.curriculum.placed_fraction} puts answers at a "
                             f"depth, but {self.task.name} has none: use placed_fraction=0")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        self.optimizer.check_run(self.curriculum.total_steps)

    def batch_arguments(self, step: int) -> tuple:
        """`common.batch`'s arguments for training step `step`: its rows are the children of the run's seed and
        the step (`seeds.BATCHES`), at the curriculum's length, batch size and depth for the step."""
        plan = self.curriculum.plan(step, self.seed)
        return self.task, (self.seed, seeds.BATCHES, step), plan.batch_size, plan.length, plan.depth


class Trained(NamedTuple):
    trainee: Trainee
    steps_done: int
    finished: bool  # False when the time limit stopped the run before the curriculum's end


def train(recipe: Recipe, output_dir: str, initial_model: Callable[[], llama.Llama], run_flags: dict, *,
          resume: bool = False, save_every: int = 500, time_limit_s: float = 0.0, data_workers: int = 0) -> Trained:
    """Trains `initial_model()` (float32) along `recipe`, or with `resume` continues the run saved in `output_dir`.

    `run_flags` (JSON values) are what defines the run besides the recipe, e.g. its command-line flags: they are
    saved with it, and resuming under other values is refused. A save comes every `save_every` steps, at the end,
    and when `time_limit_s` (0: none) of training has passed, which stops the run. `data_workers` processes build
    the next steps' batches while the device trains (the batches do not depend on it).
    """
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    curriculum, seed = recipe.curriculum, recipe.seed
    total_steps = curriculum.total_steps
    if resume:
        model, step = run_directory.saved_model(output_dir, run_flags)
    else:
        run_directory.start(output_dir)
        model, step = initial_model(), 0
        if model.config.dtype != run_directory.PARAM_DTYPE:
            raise ValueError(f"training keeps {run_directory.PARAM_DTYPE} parameters (the compute dtype is the "
                             f"recipe's): initial_model() gave {model.config.dtype} ones")
    trainee = Trainee.create(model, recipe.loss, seed)
    optimizer = make_optimizer(trainee, recipe.optimizer, total_steps)
    if resume:
        run_directory.restore(output_dir, trainee, optimizer)

    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{num_params / 1e6:.2f}M parameters, {recipe.compute_dtype} compute on {jax.devices()[0].device_kind}; "
          f"curriculum {list(curriculum.stages)}, {curriculum.tokens_per_step} tokens per step; from step {step} of "
          f"{total_steps}")

    started = last = time.perf_counter()
    progress = tqdm.tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    batches = batch_prefetch.BatchPrefetcher(common.batch, recipe.batch_arguments, total_steps, data_workers)
    upcoming = batches.get(step) if step < total_steps else None
    with open(os.path.join(output_dir, run_directory.LOG_FILE), "a") as log, batches:
        while step < total_steps:
            data = upcoming
            metrics = train_step(trainee, optimizer, data.tokens, data.loss_mask, data.filler_mask,
                                 compute_dtype=recipe.compute_dtype, loss=recipe.loss)
            step += 1
            # Dispatch is asynchronous: the next batch is fetched (or built) while the device works on this one.
            upcoming = batches.get(step) if step < total_steps else None
            metrics = {name: float(value) for name, value in metrics.items()}
            now = time.perf_counter()
            length = data.tokens.shape[1]
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss {metrics['loss']} at step {step} (length {length}); the last save "
                                         f"is in {output_dir}")
            log.write(json.dumps({"step": step, "length": length, "batch_size": data.tokens.shape[0], **metrics,
                                  "seconds": round(now - last, 4)}) + "\n")
            last = now
            progress.update()
            progress.set_postfix(length=length, loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                                 first=f"{metrics['first_token_accuracy']:.3f}")
            out_of_time = time_limit_s and now - started > time_limit_s
            if step % save_every == 0 or step == total_steps or out_of_time:
                log.flush()
                run_directory.save(output_dir, trainee, optimizer,
                                   {"step": step, **curriculum.position(step), "flags": run_flags})
            if out_of_time:
                break
    progress.close()
    return Trained(trainee, step, step == total_steps)
