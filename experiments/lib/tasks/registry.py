"""The suite's tasks by name, at their default settings, and a seeded weighted mixture of tasks."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from experiments.lib.tasks import common
from experiments.lib.tasks.aggregation import Aggregation
from experiments.lib.tasks.multi_key import MultiKey
from experiments.lib.tasks.multi_query import MultiQuery
from experiments.lib.tasks.multi_value import MultiValue
from experiments.lib.tasks.single_needle import SingleNeedle
from experiments.lib.tasks.variable_tracking import VariableTracking

TASKS: dict[str, common.Task] = {task.name: task for task in (
    SingleNeedle(), MultiKey(), MultiValue(), MultiQuery(), VariableTracking(), Aggregation())}


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Each draw picks one of `tasks` with probability proportional to its weight, then draws from it with the same
    generator: a task like the others, for training on several at once (a batch's rows pick their tasks
    independently, each from its own seed). A depth applies to the tasks that place needles; the others
    (aggregation) draw without one. Every task of positive weight draws at any length from the longest of their
    minimums."""
    tasks: tuple[common.Task, ...]
    weights: tuple[float, ...]
    name = "mixture"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "weights", tuple(float(weight) for weight in self.weights))
        if not self.tasks or len(self.tasks) != len(self.weights):
            raise ValueError(f"need one weight per task and at least one task, got {len(self.tasks)} tasks and "
                             f"{len(self.weights)} weights")
        if not all(math.isfinite(weight) and weight >= 0 for weight in self.weights) or not sum(self.weights) > 0:
            raise ValueError(f"weights must be finite and >= 0 with a positive sum, got {self.weights}")
        for task in self.tasks:
            common.check_task(task)

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> "Mixture":
        """The registry's default tasks, weighted by name: `Mixture.of({"multi_key": 2, "aggregation": 1})`."""
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
        return cls(tuple(TASKS[name] for name in weights), tuple(float(w) for w in weights.values()))

    @property
    def _drawn(self) -> tuple[common.Task, ...]:
        return tuple(task for task, weight in zip(self.tasks, self.weights) if weight > 0)

    @property
    def has_depth(self) -> bool:
        return any(task.has_depth for task in self._drawn)

    def min_length(self) -> int:
        return max(task.min_length() for task in self._drawn)

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        weights = np.asarray(self.weights)
        task = self.tasks[rng.choice(len(self.tasks), p=weights / weights.sum())]
        return task.draw(rng, length, depth if task.has_depth else None)
