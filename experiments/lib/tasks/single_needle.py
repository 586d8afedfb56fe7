"""Single needle: the key-value retrieval sequences of experiments/lib/retrieval_task.py, through the suite's
interface.

    qzkf wyj#QX:4821#ab xnw oe ... lmr ?QX:4821\n

`num_records` records with distinct random keys hide in filler; `num_queries` of them are asked, one query each.
The retrieval model trains on `SingleNeedle(num_records=8, num_queries=4)` (experiments/retrieval/train.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib import retrieval_task
from experiments.lib.tasks import common


@dataclasses.dataclass(frozen=True)
class SingleNeedle:
    num_records: int = 1
    num_queries: int = 1
    filler: str = "random"
    name = "single_needle"
    has_depth = True

    def __post_init__(self):
        common.check_filler(self.filler)
        if not 1 <= self.num_queries <= self.num_records <= retrieval_task.MAX_RECORDS:
            raise ValueError(f"need 1 <= num_queries ({self.num_queries}) <= num_records ({self.num_records}) "
                             f"<= {retrieval_task.MAX_RECORDS}")

    def min_length(self) -> int:
        return retrieval_task.min_length(self.num_records, self.num_queries)

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        # `np.random.default_rng` hands a Generator back unchanged: the sequence is drawn from `rng` itself.
        sequence = retrieval_task.sequence(rng, length, self.num_records, self.num_queries, depth, self.filler)
        spans = sequence.query_positions[:, None] + np.array([0, retrieval_task.ANSWER_LENGTH])
        return common.Example(tokens=sequence.tokens, answer_spans=spans.astype(np.int32),
                              filler_mask=sequence.filler_mask, task=self.name, depth=depth,
                              metadata={"needle_positions": sequence.record_positions,
                                        "needle_depths": sequence.record_depths})
