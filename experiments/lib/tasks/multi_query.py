"""Multi-query: several keys asked at once, their values answered in the order asked.

    qzkf#QX:4821#wyj ab#DT:0375#xnw ... #MB:7730#oe ... lmr ?DT,QX:0375,4821\\n

`num_records` records with distinct keys; one query line asks `num_queries` of them. Every key is asked before
any value is answered, so the place of each answer in the line says which of the asked keys it belongs to.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib.tasks import common


@dataclasses.dataclass(frozen=True)
class MultiQuery:
    num_records: int = 8
    num_queries: int = 4
    filler: str = "random"
    name = "multi_query"
    has_depth = True

    def __post_init__(self):
        common.check_filler(self.filler)
        if not 2 <= self.num_queries <= self.num_records <= common.NUM_KEYS:
            raise ValueError(f"need 2 <= num_queries ({self.num_queries}) <= num_records ({self.num_records}) "
                             f"<= {common.NUM_KEYS}")

    def _query_length(self) -> int:
        return common.query_length([common.KEY_LENGTH] * self.num_queries,
                                   [common.VALUE_LENGTH] * self.num_queries)

    def min_length(self) -> int:
        return common.room_needed(self.num_records, common.RECORD_LENGTH) + self._query_length()

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        context = length - self._query_length()
        starts, needle_index = common.place(rng, context, common.RECORD_LENGTH, self.num_records,
                                            self.num_queries, depth)  # the needles in a random order: as asked
        keys = common.letters(rng.choice(common.NUM_KEYS, self.num_records, replace=False))
        values = common.DIGITS[rng.integers(0, 10, (self.num_records, common.VALUE_LENGTH))]
        query_tokens, spans = common.queries([([keys[i].tobytes() for i in needle_index],
                                               [values[i].tobytes() for i in needle_index])])
        return common.haystack_example(rng, self, length, depth, self.filler, starts, common.records(keys, values),
                                       needle_index, query_tokens, spans)
