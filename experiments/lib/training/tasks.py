"""What a training run trains on: a task, or a weighted mixture of tasks.

A task draws one example at a time from a numpy generator: `draw(rng, length, depth)` returns an `Example` of
exactly `length` tokens whose `loss_mask` marks the answer (the tokens the loss scores) and whose `filler_mask` marks
the filler (the tokens an optional auxiliary next-token loss scores; all zeros for a task without filler). `depth`
is where the task puts what the answer depends on, as a fraction of its context (0: the farthest back, 1: right
before the question), or None for the task's own random placement; a task with nothing to place ignores it.
`min_length()` is the shortest length the task can draw.

A mixture draws each row of a batch from one of its tasks, chosen with probability proportional to the task's
weight; the rows' draws depend on the seed and the step alone (`seeds`), so a batch is the same whoever builds it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import numpy as np

from experiments.lib.training import seeds


class Example(NamedTuple):
    tokens: np.ndarray  # int [length]
    loss_mask: np.ndarray  # float [length]: 1 at t iff token t + 1 is an answer token
    filler_mask: np.ndarray  # float [length]: 1 at t iff token t + 1 is filler


class Task(Protocol):
    def min_length(self) -> int: ...

    def draw(self, rng: np.random.Generator, length: int, depth: float | None) -> Example: ...


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, length]
    loss_mask: np.ndarray  # float32 [B, length]
    filler_mask: np.ndarray  # float32 [B, length]
    task_index: np.ndarray  # int32 [B]: the mixture's task that drew each row


@dataclasses.dataclass(frozen=True)
class TaskMixture:
    """`tasks[i]` draws a row with probability `weights[i] / sum(weights)`."""
    tasks: tuple[Task, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "weights", tuple(float(weight) for weight in self.weights))
        if not self.tasks:
            raise ValueError("a task mixture needs at least one task")
        if len(self.weights) != len(self.tasks):
            raise ValueError(f"a task mixture needs one weight per task: {len(self.tasks)} tasks, "
                             f"{len(self.weights)} weights")
        if not all(np.isfinite(weight) and weight > 0 for weight in self.weights):
            raise ValueError(f"task weights must be finite and > 0 (leave a task out instead of weighting it 0), "
                             f"got {self.weights}")
        for task in self.tasks:
            if not (callable(getattr(task, "draw", None)) and callable(getattr(task, "min_length", None))):
                raise TypeError(f"{task!r} is not a task: a task has draw(rng, length, depth) and min_length()")

    @classmethod
    def of(cls, tasks: Task | TaskMixture) -> TaskMixture:
        """The mixture itself, or a single task's mixture of one."""
        return tasks if isinstance(tasks, TaskMixture) else cls((tasks,), (1.0,))

    def check_length(self, length: int, where: str) -> None:
        longest = max(self.tasks, key=lambda task: task.min_length())
        if length < longest.min_length():
            raise ValueError(f"{where}: length {length} is too short for {longest!r} (it needs >= "
                             f"{longest.min_length()})")

    def batch(self, seed: int, step: int, batch_size: int, length: int, depth: float | None) -> Batch:
        """The rows of training step `step` of a run seeded `seed`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.check_length(length, "batch")
        if len(self.tasks) == 1:
            choices = np.zeros(batch_size, np.int32)
        else:
            probabilities = np.asarray(self.weights) / sum(self.weights)
            choices = np.random.default_rng((seed, seeds.TASKS, step)).choice(len(self.tasks), batch_size,
                                                                               p=probabilities).astype(np.int32)
        rows = np.random.SeedSequence((seed, seeds.BATCHES, step)).spawn(batch_size)
        examples = [_checked(self.tasks[choice], self.tasks[choice].draw(np.random.default_rng(row), length, depth),
                             length) for choice, row in zip(choices, rows)]
        return Batch(tokens=np.stack([example.tokens for example in examples]).astype(np.int32),
                     loss_mask=np.stack([example.loss_mask for example in examples]).astype(np.float32),
                     filler_mask=np.stack([example.filler_mask for example in examples]).astype(np.float32),
                     task_index=choices)


def draw_batch(mixture: TaskMixture, seed: int, step: int, batch_size: int, length: int,
               depth: float | None) -> Batch:
    """`mixture.batch(...)` as a module-level function, which worker processes receive by reference."""
    return mixture.batch(seed, step, batch_size, length, depth)


def _checked(task: Task, example: Example, length: int) -> Example:
    """The example, after checking that it is one: a task's mistakes would otherwise train silently."""
    for name in Example._fields:
        shape = np.shape(getattr(example, name))
        if shape != (length,):
            raise ValueError(f"{task!r} drew {name} of shape {shape} for length {length}: each of {Example._fields} "
                             f"must have shape ({length},)")
    if not np.issubdtype(np.asarray(example.tokens).dtype, np.integer):
        raise ValueError(f"{task!r} drew tokens of dtype {np.asarray(example.tokens).dtype}: tokens are integers")
    if not np.any(example.loss_mask[:-1]):
        raise ValueError(f"{task!r} drew an example whose loss_mask marks no answer token (1 at t marks token t + 1 "
                         f"as one): the loss would have nothing to score")
    return example
