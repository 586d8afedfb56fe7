"""Token-level prompts of the paper's calibration task: JSON key-value retrieval (LongBench's kv_retrieval form).

A prompt is a long JSON object of random UUID keys and values, followed by a question for one key's value.
Tokens are bytes (a byte-level vocabulary of 256), so no tokenizer files are needed; a model with a real tokenizer
can encode `text` instead. Records have a fixed width, so a prompt of any length is built with a few numpy ops.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

_INSTRUCTION = b"Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
_QUESTION = b'}\n\nKey: "%s"\nThe value associated with the specified key is: '
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_UUID_DASHES = (8, 13, 18, 23)
_UUID_LENGTH = 36
_RECORD_LENGTH = 2 * _UUID_LENGTH + 8  # "key": "value", (quotes, colon, comma and spaces)


class KeyValuePrompt(NamedTuple):
    tokens: np.ndarray  # int32 [num_tokens], byte values
    answer: bytes  # the queried value (a UUID)
    query_key: bytes
    record_start: int  # token offset of the queried record inside `tokens`
    num_records: int

    @property
    def text(self) -> str:
        return self.tokens.astype(np.uint8).tobytes().decode("ascii")


def _uuids(rng: np.random.Generator, count: int) -> np.ndarray:
    """uint8 [count, 36]: random UUID-formatted hex strings."""
    digits = _HEX[rng.integers(0, 16, size=(count, _UUID_LENGTH))]
    digits[:, _UUID_DASHES] = ord("-")
    return digits


def json_kv_prompt(seed: int, num_tokens: int, depth: float | None = None) -> KeyValuePrompt:
    """A prompt of at most `num_tokens` tokens (the largest whole number of records that fits).

    Args:
      seed: makes the prompt reproducible.
      num_tokens: token budget; at least room for the instruction, one record and the question.
      depth: where the queried record sits, as a fraction of the records (0 = first, 1 = last); random if None.
    """
    overhead = len(_INSTRUCTION) + len(_QUESTION % (b"x" * _UUID_LENGTH))
    num_records = (num_tokens - overhead) // _RECORD_LENGTH
    if num_records < 1:
        raise ValueError(f"num_tokens={num_tokens} leaves no room for a record (need >= {overhead + _RECORD_LENGTH})")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    keys, values = _uuids(rng, num_records), _uuids(rng, num_records)
    records = np.empty((num_records, _RECORD_LENGTH), np.uint8)
    records[:, 0] = records[:, 37] = records[:, 40] = records[:, 77] = ord('"')
    records[:, 1:37] = keys
    records[:, 38], records[:, 39] = ord(":"), ord(" ")
    records[:, 41:77] = values
    records[:, 78], records[:, 79] = ord(","), ord(" ")
    records[-1, 78:] = ord(" ")  # no trailing comma: the object stays valid JSON
    target = int(rng.integers(num_records)) if depth is None else round(depth * (num_records - 1))
    query_key = keys[target].tobytes()
    question = np.frombuffer(_QUESTION % query_key, np.uint8)
    tokens = np.concatenate([np.frombuffer(_INSTRUCTION, np.uint8), records.ravel(), question]).astype(np.int32)
    return KeyValuePrompt(tokens=tokens, answer=values[target].tobytes(), query_key=query_key,
                          record_start=len(_INSTRUCTION) + target * _RECORD_LENGTH, num_records=num_records)
