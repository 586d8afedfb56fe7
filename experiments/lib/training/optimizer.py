"""AdamW for training: a linear warmup from 0 to the peak learning rate, then a cosine decay to `final_fraction` of
the peak at the last step; the gradients clipped to a global norm first (it guards the updates at each jump to a
longer length); weight decay on matrices only (the embedding, the projections, the probe), not on the norms' gains.

It is optax's (optax comes with flax, whose `nnx.Optimizer` applies it). The parameters and the optimizer state are
float32 whatever the compute dtype (`step.as_computed`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # the peak
    warmup_steps: int = 200
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    final_fraction: float = 0.1  # of the peak learning rate, at the last step

    def __post_init__(self):
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {self.warmup_steps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ValueError(f"final_fraction must be in [0, 1], got {self.final_fraction}")

    def check_run(self, total_steps: int) -> None:
        """The schedule needs the warmup to end before the run does."""
        if self.warmup_steps >= total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below the run's {total_steps} steps")


def make_optimizer(trainee: nnx.Module, config: OptimizerConfig, total_steps: int) -> nnx.Optimizer:
    """A fresh optimizer for `trainee`'s parameters over a run of `total_steps` steps."""
    config.check_run(total_steps)
    return nnx.Optimizer(trainee, _transform(config, total_steps), wrt=nnx.Param)


@functools.cache
def _transform(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """One transformation object per (config, steps): an optimizer carries it as static data, so equal optimizers
    then share the train step's compiled program."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, total_steps,
                                                  config.learning_rate * config.final_fraction)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, *config.betas, weight_decay=config.weight_decay, mask=_matrices))


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)
