"""Variable tracking: chains of assignments spread across the context; the query asks which names hold a value.

    qzkf#48>QX#wyj ab#17>MB#xnw ... #QX>DT#oe ... #MB>KA#lmr ... #DT>AB#ep ... ?48:QX,DT,AB\\n

RULER's `VAR QX = 48 ... VAR DT = QX ... VAR AB = DT`, each statement written source first: `#48>QX#` puts the
value 48 in QX, `#QX>DT#` copies QX into DT. There are `num_chains` chains of `num_hops + 1` names, each started by
its own two-digit value, every name assigned once; a chain's statements appear in its order. The query gives a
chain's value and the answer lists the chain's names in order: each name is found by matching the item before it
(the value, or the name answered last) against the statements' sources, so the whole answer takes `num_hops + 1`
lookups, each keyed on the result of the one before. The other chains make listing names in order of appearance
fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.lib.tasks import common

VALUE_LENGTH = 2  # a chain's value: two digits, as long as a name, so every statement is 7 tokens
STATEMENT_LENGTH = 1 + VALUE_LENGTH + 1 + common.KEY_LENGTH + 1  # "#48>QX#"


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    num_chains: int = 2
    num_hops: int = 4
    filler: str = "random"
    name = "variable_tracking"
    has_depth = True

    def __post_init__(self):
        common.check_filler(self.filler)
        if not 2 <= self.num_chains <= 10 ** VALUE_LENGTH:
            raise ValueError(f"num_chains must be in [2, {10 ** VALUE_LENGTH}] (one chain alone is answered by "
                             f"listing every name; chains have distinct values), got {self.num_chains}")
        if self.num_hops < 1 or self.num_chains * (self.num_hops + 1) > common.NUM_KEYS:
            raise ValueError(f"num_hops must be >= 1 and num_chains * (num_hops + 1) names <= {common.NUM_KEYS}, "
                             f"got num_hops={self.num_hops} with num_chains={self.num_chains}")

    @property
    def _num_statements(self) -> int:
        return self.num_chains * (self.num_hops + 1)

    def _query_length(self) -> int:
        return common.query_length([VALUE_LENGTH], [common.KEY_LENGTH] * (self.num_hops + 1))

    def min_length(self) -> int:
        return common.room_needed(self._num_statements, STATEMENT_LENGTH) + self._query_length()

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> common.Example:
        common.check_draw(self, rng, length, depth)
        context = length - self._query_length()
        chain_length = self.num_hops + 1
        starts, needle_index = common.place(rng, context, STATEMENT_LENGTH, self._num_statements, chain_length,
                                            depth)
        # Row c: the statements of chain c by place in the context (chain 0 is asked), so each chain is in order.
        others = rng.permutation(np.setdiff1d(np.arange(self._num_statements), needle_index))
        order = np.sort(np.concatenate([needle_index, others]).reshape(self.num_chains, chain_length), axis=1)
        names = common.letters(rng.choice(common.NUM_KEYS, self._num_statements, replace=False))
        names = names.reshape(self.num_chains, chain_length, common.KEY_LENGTH)
        values = common.digits(rng.choice(10 ** VALUE_LENGTH, self.num_chains, replace=False), VALUE_LENGTH)
        sources = np.concatenate([values[:, None], names[:, :-1]], axis=1)  # [chains, chain_length, 2]
        statements = np.empty((self._num_statements, STATEMENT_LENGTH), np.uint8)
        statements[order.reshape(-1)] = common.records(sources.reshape(-1, VALUE_LENGTH),
                                                       names.reshape(-1, common.KEY_LENGTH), separator=b">")
        query_tokens, spans = common.queries([([values[0].tobytes()], [name.tobytes() for name in names[0]])])
        return common.haystack_example(rng, self, length, depth, self.filler, starts, statements, order[0],
                                       query_tokens, spans)
