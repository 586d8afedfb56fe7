"""Byte-level key-value retrieval sequences, for training a small Llama to retrieve over long contexts.

A sequence is filler text with key-value records hidden in it, followed by queries for some of the keys:

    qzkf wyj#QX:4821#ab xnw oe ... lmr#DT:0375#ep ...?DT:0375\n?QX:4821 

Tokens are bytes (a vocabulary of 256). Filler is lowercase letters and spaces only, so '#', '?', uppercase letters
and digits occur only in records and queries: random bytes ("random"), or words from a small vocabulary drawn for
each sequence ("words"), so that a repeated word's later letters can be predicted from its earlier occurrence in
the same sequence (an in-context matching target for an auxiliary loss, as natural text offers real LLMs). The
loss is on the 4 answer digits of each query: predicting them needs the record with the same key, wherever it sits
in the context (the text before the first query).

This is the suite's single-needle task (experiments/lib/tasks/single_needle.py draws it); its filler, records and
placement by depth are the suite's (experiments/lib/tasks/common.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from experiments.lib.tasks import common

RECORD_LENGTH = common.RECORD_LENGTH  # "#KK:dddd#"
ANSWER_LENGTH = common.VALUE_LENGTH
QUERY_LENGTH = common.query_length([common.KEY_LENGTH], [ANSWER_LENGTH])  # "?KK:dddd" and a newline or a space
ANSWER_OFFSET = 4  # the digits follow "#KK:" in a record and "?KK:" in a query
MAX_RECORDS = common.NUM_KEYS  # keys are two uppercase letters, unique within a sequence

FILLERS = common.FILLERS
WORDS_PER_SEQUENCE = common.WORDS_PER_SEQUENCE
_QUERY_ENDS = np.frombuffer(b"\n ", np.uint8)

Seed = int | Sequence[int] | np.random.SeedSequence | np.random.Generator


class RetrievalSequence(NamedTuple):
    tokens: np.ndarray  # int32 [length], byte values
    loss_mask: np.ndarray  # float32 [length]: 1 at t iff token t + 1 is an answer digit
    filler_mask: np.ndarray  # float32 [length]: 1 at t iff token t + 1 is filler (in the context)
    query_positions: np.ndarray  # int32 [num_queries]: index of each query's first answer digit
    answers: tuple[bytes, ...]  # each query's 4 answer digits
    record_positions: np.ndarray  # int32 [num_queries]: start ('#') of each query's record
    record_depths: np.ndarray  # float32 [num_queries]: record start / last possible start in the context (0 to 1)


class RetrievalBatch(NamedTuple):
    tokens: np.ndarray  # int32 [B, length]
    loss_mask: np.ndarray  # float32 [B, length]
    filler_mask: np.ndarray  # float32 [B, length]
    query_positions: np.ndarray  # int32 [B, num_queries]


def min_length(num_records: int, num_queries: int) -> int:
    """The shortest sequence that holds these records and queries: records fill at most half of the context, so
    there is filler between them and a `depth` can always be honoured."""
    return common.room_needed(num_records, RECORD_LENGTH) + num_queries * QUERY_LENGTH


def _check(length: int, num_records: int, num_queries: int, depth: float | None, filler: str):
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if not 1 <= num_queries <= num_records <= MAX_RECORDS:
        raise ValueError(f"need 1 <= num_queries ({num_queries}) <= num_records ({num_records}) <= {MAX_RECORDS}")
    if length < min_length(num_records, num_queries):
        raise ValueError(f"length {length} is too short for {num_records} records and {num_queries} queries "
                         f"(records may fill at most half of the context): need >= "
                         f"{min_length(num_records, num_queries)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def sequence(seed: Seed, length: int, num_records: int, num_queries: int,
             depth: float | None = None, filler: str = "random") -> RetrievalSequence:
    """One sequence of exactly `length` tokens.

    Args:
      seed: anything `np.random.default_rng` takes; the same seed gives the same sequence.
      length: tokens in all; at least `min_length(num_records, num_queries)`.
      num_records: records in the context, each with its own key.
      num_queries: queries at the end, for distinct records.
      depth: where the queried records sit, as a fraction of the context (0 = at its start, 1 = ending where it
        ends); they are then next to each other, the other records spread before and after them in proportion.
        Random places if None.
      filler: "random" bytes or "words" of a vocabulary drawn for this sequence (see the module's docstring).
    """
    _check(length, num_records, num_queries, depth, filler)
    rng = np.random.default_rng(seed)
    context = length - num_queries * QUERY_LENGTH
    starts, queried = common.place(rng, context, RECORD_LENGTH, num_records, num_queries, depth)

    codes = rng.choice(MAX_RECORDS, num_records, replace=False)
    keys = common.letters(codes)  # [R, 2]
    values = common.DIGITS[rng.integers(0, 10, (num_records, ANSWER_LENGTH))]  # [R, 4]
    records = common.records(keys, values)
    queries = np.concatenate([np.full((num_queries, 1), ord("?"), np.uint8), keys[queried],
                              np.full((num_queries, 1), ord(":"), np.uint8), values[queried],
                              _QUERY_ENDS[rng.integers(0, 2, (num_queries, 1))]], axis=1)

    tokens = common.filler(rng, length, filler)
    record_slots = (starts[:, None] + np.arange(RECORD_LENGTH)).reshape(-1)
    tokens[record_slots] = records.reshape(-1)
    tokens[context:] = queries.reshape(-1)

    query_positions = context + QUERY_LENGTH * np.arange(num_queries) + ANSWER_OFFSET
    loss_mask = np.zeros(length, np.float32)
    loss_mask[(query_positions[:, None] + np.arange(ANSWER_LENGTH)).reshape(-1) - 1] = 1.0
    is_filler = np.ones(length, bool)
    is_filler[record_slots] = False
    is_filler[context:] = False
    filler_mask = np.zeros(length, np.float32)
    filler_mask[:-1] = is_filler[1:]
    record_positions = starts[queried]
    return RetrievalSequence(
        tokens=tokens.astype(np.int32), loss_mask=loss_mask, filler_mask=filler_mask,
        query_positions=query_positions.astype(np.int32),
        answers=tuple(bytes(v) for v in values[queried]), record_positions=record_positions.astype(np.int32),
        record_depths=(record_positions / (context - RECORD_LENGTH)).astype(np.float32))


def batch(seed: int | Sequence[int], batch_size: int, length: int, num_records: int, num_queries: int,
          depth: float | None = None, filler: str = "random") -> RetrievalBatch:
    """`batch_size` independent sequences (seeded by children of `seed`), stacked into `[B, length]` arrays."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = np.random.SeedSequence(seed).spawn(batch_size)
    sequences = [sequence(s, length, num_records, num_queries, depth, filler) for s in seeds]
    return RetrievalBatch(*(np.stack([getattr(s, field) for s in sequences]) for field in RetrievalBatch._fields))
