"""Multi-value: one key holds several values scattered through the context, and all of them are asked for.

    qzkf#QX:4821#wyj ab#DT:7730#xnw ... #QX:0375#oe ... #QX:5562#lmr ?QX:4821,0375,5562\\n

`num_values` records share the asked key, each with its own value; `num_others` records have other keys, one
value each. The answer lists the asked key's values in the order they appear in the context.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib.tasks import common


@dataclasses.dataclass(frozen=True)
class MultiValue:
    num_values: int = 4
    num_others: int = 4
    filler: str = "random"
    name = "multi_value"
    has_depth = True

    def __post_init__(self):
        common.check_filler(self.filler)
        if not 2 <= self.num_values <= 10 ** common.VALUE_LENGTH:
            raise ValueError(f"num_values must be in [2, {10 ** common.VALUE_LENGTH}] (distinct values), got "
                             f"{self.num_values}")
        if not 0 <= self.num_others < common.NUM_KEYS:
            raise ValueError(f"num_others must be in [0, {common.NUM_KEYS - 1}] (distinct keys), got "
                             f"{self.num_others}")

    def _query_length(self) -> int:
        return common.query_length([common.KEY_LENGTH], [common.VALUE_LENGTH] * self.num_values)

    def min_length(self) -> int:
        return common.room_needed(self.num_values + self.num_others, common.RECORD_LENGTH) + self._query_length()

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        num_records = self.num_values + self.num_others
        context = length - self._query_length()
        starts, needle_index = common.place(rng, context, common.RECORD_LENGTH, num_records, self.num_values,
                                            depth)
        needle_index = np.sort(needle_index)  # the answer's order: the values' order in the context
        asked, *others = rng.choice(common.NUM_KEYS, 1 + self.num_others, replace=False)
        codes = np.empty(num_records, np.int64)
        codes[needle_index] = asked
        codes[np.setdiff1d(np.arange(num_records), needle_index)] = others
        keys = common.letters(codes)
        numbers = rng.integers(0, 10 ** common.VALUE_LENGTH, num_records)
        numbers[needle_index] = rng.choice(10 ** common.VALUE_LENGTH, self.num_values, replace=False)
        values = common.digits(numbers, common.VALUE_LENGTH)
        query_tokens, spans = common.queries([([keys[needle_index[0]].tobytes()],
                                               [values[i].tobytes() for i in needle_index])])
        return common.haystack_example(rng, self, length, depth, self.filler, starts, common.records(keys, values),
                                       needle_index, query_tokens, spans)
