"""What the tasks share: the haystack filler, records and queries, placement by depth, and the interface that
training (experiments/lib/training) and scoring take every task by: the `Task` protocol, the `Example` a draw
returns, and `batch`, which stacks a seed's examples.

Bytes are the vocabulary. Filler is lowercase letters and spaces; everything a task asks about is written with
uppercase letters, digits and `# : > ? , \\n`, so those bytes never occur in filler and a model can learn to skip
it. A record is `#` key separator value `#` (`#QX:4821#`); a query is `?`, the asked items joined by `,`, `:`,
the answers joined by `,`, and a newline (`?QX,DT:4821,0375\\n`). Answers are always listed in an order the prompt
fixes (the order of the asked keys, of appearance in the context, or of frequency), so every answer is determined
by the tokens before it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

FILLERS = ("random", "words")
WORDS_PER_SEQUENCE = 8  # the vocabulary of a "words" filler
NUM_KEYS = 26 * 26  # keys are two uppercase letters
KEY_LENGTH = 2
VALUE_LENGTH = 4  # a record's value: four digits
RECORD_LENGTH = 1 + KEY_LENGTH + 1 + VALUE_LENGTH + 1  # "#KK:dddd#"

UPPERCASE = np.frombuffer(string.ascii_uppercase.encode(), np.uint8)
DIGITS = np.frombuffer(string.digits.encode(), np.uint8)
_FILLER = np.frombuffer(string.ascii_lowercase.encode() + b" " * 5, np.uint8)  # a space every ~6 characters
_LOWERCASE = np.frombuffer(string.ascii_lowercase.encode(), np.uint8)


def filler(rng: np.random.Generator, length: int, kind: str) -> np.ndarray:
    """uint8 `[length]` of haystack: random lowercase letters and spaces ("random"), or words of a vocabulary of
    `WORDS_PER_SEQUENCE` drawn for this call ("words"), so that a word's later letters can be predicted from its
    earlier occurrences (an in-context target for an auxiliary loss, as natural text offers real LLMs)."""
    if kind == "random":
        return _FILLER[rng.integers(0, len(_FILLER), length)]
    vocabulary = [_LOWERCASE[rng.integers(0, 26, rng.integers(2, 8))] for _ in range(WORDS_PER_SEQUENCE)]
    space = np.array([ord(" ")], np.uint8)
    # Every word takes at least 3 bytes with its space: length // 3 + 1 words fill the sequence.
    words = rng.integers(0, WORDS_PER_SEQUENCE, length // 3 + 1)
    return np.concatenate([part for word in words for part in (vocabulary[word], space)])[:length]


def _scatter(rng: np.random.Generator, start: int, span: int, count: int, item_length: int) -> np.ndarray:
    """Starts of `count` non-overlapping items at uniformly random places in `[start, start + span)`."""
    gaps = np.sort(rng.integers(0, span - count * item_length + 1, count))
    return start + gaps + item_length * np.arange(count)


def place(rng: np.random.Generator, context: int, item_length: int, num_items: int, num_needles: int,
          depth: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Where `num_items` items of `item_length` tokens go in a context of `context` tokens, `num_needles` of them
    being the needles (the items an answer is read from).

    Returns the items' starts (ascending) and the needles' indices into them (in a random order). With `depth`
    None every item sits at a random place; otherwise the needles sit next to each other, the first at `depth` of
    the room before the block's end (0: the context's start, 1: ending where it ends), and the other items are
    spread before and after the block in proportion. The items may fill at most half of the context
    (`room_needed`), which guarantees that both sides together hold them.
    """
    if depth is None:
        starts = _scatter(rng, 0, context, num_items, item_length)
        return starts, rng.choice(num_items, num_needles, replace=False)
    block = num_needles * item_length
    block_start = round(depth * (context - block))
    after_start = block_start + block
    others = num_items - num_needles
    # As many of the other items before the block as its depth suggests, within what fits on each side.
    before = round(others * block_start / (context - block))
    before = min(max(before, others - (context - after_start) // item_length), block_start // item_length)
    starts = np.concatenate([_scatter(rng, 0, block_start, before, item_length),
                             block_start + item_length * np.arange(num_needles),
                             _scatter(rng, after_start, context - after_start, others - before, item_length)])
    return starts, before + rng.permutation(num_needles)


def room_needed(num_items: int, item_length: int) -> int:
    """The shortest context that `place` accepts for these items: they fill at most half of it."""
    return 2 * num_items * item_length


def letters(codes: np.ndarray, width: int = KEY_LENGTH) -> np.ndarray:
    """uint8 `[N, width]`: each code in `[0, 26 ** width)` in base 26, written in uppercase letters (a key, by
    default)."""
    return UPPERCASE[(np.asarray(codes)[:, None] // 26 ** np.arange(width - 1, -1, -1)) % 26]


def digits(numbers: np.ndarray, width: int) -> np.ndarray:
    """uint8 `[N, width]`: each number in decimal, zero-padded to `width` digits."""
    return DIGITS[(np.asarray(numbers)[:, None] // 10 ** np.arange(width - 1, -1, -1)) % 10]


def records(keys: np.ndarray, values: np.ndarray, separator: bytes = b":") -> np.ndarray:
    """uint8 `[N, 3 + K + V]`: `#` key separator value `#` for each row of `keys [N, K]` and `values [N, V]`."""
    def column(byte: bytes):
        return np.full((len(keys), 1), ord(byte), np.uint8)
    return np.concatenate([column(b"#"), keys, column(separator), values, column(b"#")], axis=1)


def queries(lines: Sequence[tuple[Sequence[bytes], Sequence[bytes]]]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 tokens of one `?asked,...:answer,...\\n` line per `(asked, answers)`, and int32 `[answers, 2]`: each
    answer's [start, end) in them."""
    text, spans = b"", []
    for asked, answers in lines:
        text += b"?" + b",".join(asked) + b":"
        for index, answer in enumerate(answers):
            spans.append((len(text), len(text) + len(answer)))
            text += answer + (b"," if index < len(answers) - 1 else b"\n")
    return np.frombuffer(text, np.uint8).copy(), np.array(spans, np.int32).reshape(-1, 2)


def query_length(asked: Sequence[int], answers: Sequence[int]) -> int:
    """Tokens in a `queries` line whose asked items and answers have these lengths."""
    return 1 + sum(asked) + len(asked) + sum(answers) + len(answers)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One drawn sequence, the same for every task.

    `tokens` are byte values; the model is scored on the answer spans. Answer `a` is `tokens[start:end]` for
    `start, end = answer_spans[a]`, and everything before `start` is its prompt (earlier answers included).
    Greedy decoding from that prompt reproduces the answer exactly when the model's argmax, given the true tokens
    before each answer token, is that token (`answer_hits`): one teacher-forced forward pass scores every answer.
    An example checks its own shape when made, naming the task that drew it: a task's mistake would otherwise
    train silently.
    """
    tokens: np.ndarray  # int32 [length], byte values
    answer_spans: np.ndarray  # int32 [A, 2], A >= 1: start and end (exclusive) of each answer, in order
    filler_mask: np.ndarray  # float32 [length]: 1 at t iff token t + 1 is haystack filler (zeros: no filler)
    task: str
    depth: float | None  # the depth the needles were placed at; None: at random places, or a task without one
    metadata: Mapping[str, Any]  # the task's own facts: where its needles sit, or aggregation's top counts

    def __post_init__(self):
        tokens, spans = np.asarray(self.tokens), np.asarray(self.answer_spans)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{self.task} drew tokens of dtype {tokens.dtype} and shape {tokens.shape}: tokens are "
                             f"integers of shape [length]")
        if np.shape(self.filler_mask) != tokens.shape:
            raise ValueError(f"{self.task} drew a filler_mask of shape {np.shape(self.filler_mask)}: it must have "
                             f"the tokens' shape {tokens.shape}")
        if spans.ndim != 2 or spans.shape[1:] != (2,) or not len(spans):
            raise ValueError(f"{self.task} drew answer_spans of shape {spans.shape}: they are [A, 2] with A >= 1 "
                             f"(the loss needs an answer to score)")
        starts, ends = spans[:, 0], spans[:, 1]
        if not (np.all(starts >= 1) and np.all(starts < ends) and np.all(ends <= len(tokens))
                and np.all(starts[1:] >= ends[:-1])):
            raise ValueError(f"{self.task} drew answer_spans {spans.tolist()}: they are non-empty [start, end) "
                             f"spans in order, each after a prompt (start >= 1) and within the {len(tokens)} tokens")

    @property
    def loss_mask(self) -> np.ndarray:
        """float32 `[length]`: 1 at t iff token t + 1 is an answer token (teacher-forced loss on the answers)."""
        mask = np.zeros(len(self.tokens), np.float32)
        for start, end in self.answer_spans:
            mask[start - 1:end - 1] = 1.0
        return mask

    @property
    def answers(self) -> tuple[bytes, ...]:
        return tuple(self.tokens[start:end].astype(np.uint8).tobytes() for start, end in self.answer_spans)

    def answer_hits(self, predicted: np.ndarray) -> np.ndarray:
        """bool `[A]`: whether each answer is reproduced, given `predicted [length]`, the model's argmax at each
        position (its prediction of the next token) on these tokens."""
        predicted = np.asarray(predicted)
        if predicted.shape != self.tokens.shape:
            raise ValueError(f"predicted must have the tokens' shape {self.tokens.shape}, got {predicted.shape}")
        right = predicted[:-1] == self.tokens[1:]
        return np.array([right[start - 1:end - 1].all() for start, end in self.answer_spans])


@runtime_checkable
class Task(Protocol):
    """A seeded generator of `Example`s: one interface for every task, so that training and evaluation treat them
    alike. Tasks are frozen dataclasses of their settings: they compare by value, print what they are, and pickle
    to the processes that build batches."""
    name: str
    has_depth: bool  # whether `draw` takes a depth (where the needles sit)

    def min_length(self) -> int:
        """The shortest `length` that `draw` accepts."""

    def draw(self, rng: np.random.Generator, length: int, depth: float | None = None) -> Example:
        """One example of exactly `length` tokens, drawn from `rng` alone."""


def check_task(task: Task):
    if not isinstance(task, Task):
        raise TypeError(f"{task!r} is not a task: a task has name, has_depth, min_length() and "
                        f"draw(rng, length, depth) (experiments/lib/tasks/common.py)")


def check_length(task: Task, length: int, where: str | None = None):
    """The error for a length `task` cannot draw; `where` (a flag, a setting) prefixes the message."""
    if length < task.min_length():
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}length {length} is too short for {task}: need >= {task.min_length()}")


def check_draw(task: Task, rng: np.random.Generator, length: int, depth: float | None):
    """The errors every task's `draw` raises for arguments it cannot honour."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    check_length(task, length)
    if depth is not None:
        if not task.has_depth:
            raise ValueError(f"{task.name} has no depth (its answer depends on the whole context): pass None")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1] or None, got {depth}")


def check_filler(kind: str):
    if kind not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {kind!r}")


def haystack_example(rng: np.random.Generator, task: Task, length: int, depth: float | None, kind: str,
                     starts: np.ndarray, items: np.ndarray, needles: np.ndarray, query_tokens: np.ndarray,
                     spans: np.ndarray) -> Example:
    """The example of `items [N, item_length]` written at `starts` into filler of `kind`, followed by the query
    lines; `needles` are the indices of the items the answers come from, `spans` the answers' spans within the
    query lines."""
    context, item_length = length - len(query_tokens), items.shape[1]
    tokens = filler(rng, length, kind)
    slots = (starts[:, None] + np.arange(item_length)).reshape(-1)
    tokens[slots] = items.reshape(-1)
    tokens[context:] = query_tokens
    is_filler = np.ones(length, bool)
    is_filler[slots] = False
    is_filler[context:] = False
    filler_mask = np.zeros(length, np.float32)
    filler_mask[:-1] = is_filler[1:]
    needle_positions = starts[needles].astype(np.int32)
    return Example(tokens=tokens.astype(np.int32), answer_spans=(spans + context).astype(np.int32),
                   filler_mask=filler_mask, task=task.name, depth=depth,
                   metadata={"needle_positions": needle_positions,
                             "needle_depths": (needle_positions / (context - item_length)).astype(np.float32)})


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, length]
    loss_mask: np.ndarray  # float32 [B, length]
    filler_mask: np.ndarray  # float32 [B, length]
    tasks: tuple[str, ...]  # each row's task
    answer_spans: tuple[np.ndarray, ...]  # each row's `Example.answer_spans`


def stack(examples: Sequence[Example]) -> Batch:
    """Examples of one length as `[B, length]` arrays (the loss mask marks every answer's targets)."""
    if len({len(example.tokens) for example in examples}) != 1:
        raise ValueError(f"examples must share one length, got {sorted({len(e.tokens) for e in examples})}")
    return Batch(tokens=np.stack([example.tokens for example in examples]).astype(np.int32, copy=False),
                 loss_mask=np.stack([example.loss_mask for example in examples]),
                 filler_mask=np.stack([example.filler_mask for example in examples]).astype(np.float32, copy=False),
                 tasks=tuple(example.task for example in examples),
                 answer_spans=tuple(example.answer_spans for example in examples))


def batch(task: Task, seed: int | Sequence[int], batch_size: int, length: int,
          depth: float | None = None) -> Batch:
    """`batch_size` examples of `task`, row i drawn from the i-th child of `seed` alone, stacked.

    A row depends on the seed and its index only (not on what the other rows drew, nor on who builds it), so that
    training steps, seeded by the run's seed and the step (experiments/lib/training/seeds.py), draw the same rows
    on resumption and in worker processes, which receive this module-level function by reference.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = []
    for child in np.random.SeedSequence(seed).spawn(batch_size):
        example = task.draw(np.random.default_rng(child), length, depth)
        if len(example.tokens) != length:
            raise ValueError(f"{task} drew {len(example.tokens)} tokens for length {length}: a draw is exactly "
                             f"`length` tokens")
        examples.append(example)
    return stack(examples)
