"""Aggregation: the most frequent words of a list that fills the whole context (RULER's frequent-words
extraction).

       KWD QAF KWD BZU KWD QAF MOE KWD ... QAF KWD ?3:KWD,QAF,BZU\\n

The context is `num_words` distinct three-letter words drawn for the example, each followed by a space, in a
random order (a few spaces first pad it to the length). The word of rank r appears in proportion to
r ** -exponent (Zipf's law), counted down from the context's room, so that the counts fall strictly over the
`num_answers` most frequent words and the next one. The query asks for those words, most frequent first. No single
part of the context decides the answer: every word's count does.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from experiments.lib.tasks import common

WORD_LENGTH = 3
_SLOT = WORD_LENGTH + 1  # a word and its space
_VOCABULARY = 26 ** WORD_LENGTH


@dataclasses.dataclass(frozen=True)
class Aggregation:
    num_answers: int = 3
    num_words: int = 16
    exponent: float = 1.0
    name = "aggregation"
    has_depth = False

    def __post_init__(self):
        if not 1 <= self.num_answers <= 9:
            raise ValueError(f"num_answers must be in [1, 9] (one digit in the query), got {self.num_answers}")
        if not self.num_answers < self.num_words <= _VOCABULARY:
            raise ValueError(f"num_words must be in ({self.num_answers}, {_VOCABULARY}] (more words than answers), "
                             f"got {self.num_words}")
        if not self.exponent > 0:
            raise ValueError(f"exponent must be > 0 (frequencies falling with rank), got {self.exponent}")

    def _weights(self) -> np.ndarray:
        return np.arange(1, self.num_words + 1, dtype=np.float64) ** -self.exponent

    def counts(self, slots: int) -> np.ndarray:
        """int `[num_words]`: how often the word of each rank appears when `slots` words fit the context."""
        weights = self._weights()
        return np.floor(slots * weights / weights.sum()).astype(np.int64)

    def _query_length(self) -> int:
        return common.query_length([1], [WORD_LENGTH] * self.num_answers)

    def min_length(self) -> int:
        # Counts a full slot apart before flooring stay apart after it: `slots` * (w_r - w_{r+1}) / sum(w) >= 1
        # for the ranks up to num_answers (the gaps shrink with rank), and every word appears (the last >= 1).
        weights = self._weights()
        smallest = min(weights[self.num_answers - 1] - weights[self.num_answers], weights[-1])
        slots = math.ceil(weights.sum() / smallest * (1 + 1e-9))
        return slots * _SLOT + self._query_length()

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        context = length - self._query_length()
        counts = self.counts(context // _SLOT)
        codes = rng.choice(_VOCABULARY, self.num_words, replace=False)  # by rank
        words = common.letters(codes, WORD_LENGTH)
        listed = rng.permutation(np.repeat(np.arange(self.num_words), counts))
        slots = np.concatenate([words[listed], np.full((len(listed), 1), ord(" "), np.uint8)], axis=1)
        padding = context - slots.size
        query_tokens, spans = common.queries([(
            [str(self.num_answers).encode()], [words[rank].tobytes() for rank in range(self.num_answers)])])
        tokens = np.concatenate([np.full(padding, ord(" "), np.uint8), slots.reshape(-1), query_tokens])
        return common.Example(tokens=tokens.astype(np.int32), answer_spans=spans + context,
                              filler_mask=np.zeros(length, np.float32), task=self.name, depth=None,
                              metadata={"counts": counts[:self.num_answers + 1]})
