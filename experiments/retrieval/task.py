"""The key-value retrieval task (experiments/lib/retrieval_task.py) as a training task
(experiments/lib/training/tasks.py). Like the sequences it draws, it needs numpy alone: the processes that build
batches import it."""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib import retrieval_task
from experiments.lib.training import tasks


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """Sequences of `num_records` records in filler, then `num_queries` queries; the answers are the queried
    records' digits, and a `depth` puts the queried records side by side there."""
    num_records: int = 8
    num_queries: int = 4
    filler: str = "random"

    def __post_init__(self):
        if self.filler not in retrieval_task.FILLERS:
            raise ValueError(f"filler must be one of {retrieval_task.FILLERS}, got {self.filler!r}")
        if not 1 <= self.num_queries <= self.num_records <= retrieval_task.MAX_RECORDS:
            raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_records ({self.num_records}) <= "
                             f"{retrieval_task.MAX_RECORDS}")

    def min_length(self) -> int:
        return retrieval_task.min_length(self.num_records, self.num_queries)

    def draw(self, rng: np.random.Generator, length: int, depth: float | None) -> tasks.Example:
        sequence = retrieval_task.sequence(rng, length, self.num_records, self.num_queries, depth, self.filler)
        return tasks.Example(sequence.tokens, sequence.loss_mask, sequence.filler_mask)
