"""The lengths a run trains at: stages of one length each, trained in order at a constant number of tokens per
step, and two draws per step seeded by the run's seed and the step alone (`seeds`):

- replay: after the first stage, a `replay_fraction` of the steps train at the length of an earlier stage (drawn
  uniformly), so that the long stages do not unlearn the short contexts;
- placement: a `placed_fraction` of the steps put what the answers depend on at one depth (a task's `depth`,
  experiments/lib/tasks/common.py): half of them at an end of the context (depth 0 or 1), half at a uniformly drawn
  depth; the other steps leave it to the task.

docs/retrieval_model.md says why each is there.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from experiments.lib.training import seeds


class StepPlan(NamedTuple):
    length: int
    batch_size: int
    depth: float | None


def batch_size_for(length: int, tokens_per_step: int) -> int:
    """Rows of a batch of `length` tokens each: `tokens_per_step // length`, at least 1."""
    return max(1, tokens_per_step // length)


def parse_stages(stages: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """`["256:400", "1024:300"]` -> `((256, 400), (1024, 300))`."""
    parsed = []
    for stage in stages:
        try:
            length, steps = (int(part) for part in stage.split(":"))
        except ValueError:
            raise ValueError(f"curriculum: expected LENGTH:STEPS stages, got {stage!r}") from None
        parsed.append((length, steps))
    return tuple(parsed)


@dataclasses.dataclass(frozen=True)
class Curriculum:
    stages: tuple[tuple[int, int], ...]  # (length, steps), trained in order
    tokens_per_step: int
    replay_fraction: float = 0.0
    placed_fraction: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple((int(length), int(steps)) for length, steps in self.stages))
        if not self.stages:
            raise ValueError("curriculum: no stages (give at least one (length, steps))")
        for length, steps in self.stages:
            if length < 1 or steps < 1:
                raise ValueError(f"curriculum: stage (length {length}, steps {steps}) needs length >= 1 and "
                                 f"steps >= 1")
        if self.tokens_per_step < 1:
            raise ValueError(f"curriculum: tokens_per_step must be >= 1, got {self.tokens_per_step}")
        for name in ("replay_fraction", "placed_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"curriculum: {name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.stages)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(length for length, _ in self.stages)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, length) of the step after `step` steps are done."""
        end = 0
        for index, (length, steps) in enumerate(self.stages):
            end += steps
            if 0 <= step < end:
                return index, length
        raise ValueError(f"step {step} is outside the curriculum's {end} steps")

    def length_at(self, step: int, seed: int) -> int:
        """The step's length: its stage's, or with probability `replay_fraction` (after the first stage) an earlier
        stage's."""
        stage, length = self.stage_at(step)
        if stage and self.replay_fraction:
            rng = np.random.default_rng((seed, seeds.REPLAY, step))
            if rng.random() < self.replay_fraction:
                return self.stages[rng.integers(stage)][0]
        return length

    def depth_at(self, step: int, seed: int) -> float | None:
        """Where the step's answers sit: None (the task's choice), or with probability `placed_fraction` a depth."""
        if self.placed_fraction:
            rng = np.random.default_rng((seed, seeds.PLACEMENT, step))
            if rng.random() < self.placed_fraction:
                return float(rng.integers(2)) if rng.random() < 0.5 else float(rng.random())
        return None

    def plan(self, step: int, seed: int) -> StepPlan:
        length = self.length_at(step, seed)
        return StepPlan(length, batch_size_for(length, self.tokens_per_step), self.depth_at(step, seed))

    def position(self, steps_done: int) -> dict:
        """Where a run stands after `steps_done` (>= 1) steps: the last step's stage, its length and the steps done
        in that stage."""
        stage, length = self.stage_at(steps_done - 1)
        return {"stage": stage, "length": length,
                "stage_step": steps_done - sum(steps for _, steps in self.stages[:stage])}
