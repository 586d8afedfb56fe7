"""Multi-key with distractors: each asked key hides among records whose keys differ from it in one letter.

    qzkf#QA:9120#wyj ab#QX:4821#xnw#MX:0375#oe ... #QD:5562#lmr ?QX:4821\\n

Each of `num_queries` needles has `num_distractors` records whose keys share one letter with its key, in the same
place (`QX` among `QA`, `MX`, `QD`, ...). A query is answered from the one record whose key matches in both letters:
a key matched on one letter alone finds a distractor as often as the needle. The needles' keys differ from one
another in both letters, so each distractor is one letter off at least one needle and the keys are all distinct.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib.tasks import common

_NEIGHBOURS = 2 * 25  # keys one letter off a two-letter key


def _neighbours(code: int) -> np.ndarray:
    """The key codes that differ from `code` in exactly one of the two letters, ascending."""
    first, second = divmod(code, 26)
    same_first = first * 26 + np.delete(np.arange(26), second)
    same_second = np.delete(np.arange(26), first) * 26 + second
    return np.sort(np.concatenate([same_first, same_second]))


@dataclasses.dataclass(frozen=True)
class MultiKey:
    num_queries: int = 1
    num_distractors: int = 16  # per needle
    filler: str = "random"
    name = "multi_key"
    has_depth = True

    def __post_init__(self):
        common.check_filler(self.filler)
        if not 1 <= self.num_queries <= 26:
            raise ValueError(f"num_queries must be in [1, 26] (needle keys differ in both letters), got "
                             f"{self.num_queries}")
        # Another needle's distractors take at most 2 of a needle's neighbours (the keys that mix their letters).
        most = _NEIGHBOURS - 2 * (self.num_queries - 1)
        if not 1 <= self.num_distractors <= most:
            raise ValueError(f"num_distractors must be in [1, {most}] with {self.num_queries} queries (a key has "
                             f"{_NEIGHBOURS} one letter off), got {self.num_distractors}")

    @property
    def _num_records(self) -> int:
        return self.num_queries * (1 + self.num_distractors)

    def _query_length(self) -> int:
        return self.num_queries * common.query_length([common.KEY_LENGTH], [common.VALUE_LENGTH])

    def min_length(self) -> int:
        return common.room_needed(self._num_records, common.RECORD_LENGTH) + self._query_length()

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        context = length - self._query_length()
        starts, needle_index = common.place(rng, context, common.RECORD_LENGTH, self._num_records,
                                            self.num_queries, depth)
        needles = rng.permutation(26)[:self.num_queries] * 26 + rng.permutation(26)[:self.num_queries]
        used = set(needles.tolist())
        distractors = []
        for needle in needles:
            free = np.array([code for code in _neighbours(needle) if code not in used])
            chosen = free[rng.choice(len(free), self.num_distractors, replace=False)]
            used.update(chosen.tolist())
            distractors.append(chosen)
        # Each row of `codes` is the key of the record at the same row of `starts`.
        codes = np.empty(self._num_records, np.int64)
        codes[needle_index] = needles
        codes[rng.permutation(np.setdiff1d(np.arange(self._num_records), needle_index))] = np.concatenate(distractors)
        keys = common.letters(codes)
        values = common.DIGITS[rng.integers(0, 10, (self._num_records, common.VALUE_LENGTH))]
        query_tokens, spans = common.queries([([keys[i].tobytes()], [values[i].tobytes()]) for i in needle_index])
        return common.haystack_example(rng, self, length, depth, self.filler, starts, common.records(keys, values),
                                       needle_index, query_tokens, spans)
