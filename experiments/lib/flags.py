"""The flags the experiment scripts share, each defined here once.

A script calls the `define_*` functions and the `*Flags.define` groups it needs at import time, with its own
defaults, and reads the values back through what they return; `SaleFlags.config()` turns the SALE flags into the
`SaleConfig` the script runs. The flags belong to the calling script (absl lists them under its name in `--help`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import flags

import sale_jax
from experiments.lib import retrieval_task
from sale_jax.config import BACKENDS, ESTIMATES, QUANT_GRANULARITIES

# Flags defined by the functions below are the calling script's own, not this module's.
flags.disclaim_key_flags()

DTYPES = ("auto", "bfloat16", "float16", "float32")
_BACKEND_HELP = ("SaleConfig.backend: reference (pure jnp), triton (the Pallas kernels, Triton lowering; GPU, or "
                 "any device with --interpret), mosaic_gpu (the Mosaic GPU kernels where they fit; Hopper, or "
                 "--interpret), auto (mosaic_gpu on Hopper, triton on other GPUs, the reference elsewhere).")


class _NumberListParser(flags.ListParser):
    """A comma-separated list of numbers of one type; an empty value is an empty list."""

    def __init__(self, kind: Callable[[str], int | float]):
        super().__init__()
        self._kind = kind

    def parse(self, argument):
        values = super().parse(argument)
        try:
            return [self._kind(value) for value in values]
        except ValueError:
            raise ValueError(f"expected comma-separated {self._kind.__name__}s, got {argument!r}") from None

    def flag_type(self):
        return f"comma-separated list of {self._kind.__name__}s"


def define_numbers(name: str, default: Sequence[int | float], help: str, kind: Callable = float):
    """A list flag of numbers (`kind` int or float), parsed and checked when the command line is."""
    return flags.DEFINE(_NumberListParser(kind), name, [kind(value) for value in default], help,
                        serializer=flags.CsvListSerializer(","))


def define_lengths(default: Sequence[int], help: str = "Sequence lengths (queries = keys).") -> flags.FlagHolder:
    return define_numbers("lengths", default, help, kind=int)


def define_seq_len(default: int, help: str = "Tokens (queries = keys).") -> flags.FlagHolder:
    return flags.DEFINE_integer("seq_len", default, help, lower_bound=1)


def define_dtype(default: str = "auto", help: str = "Input dtype.") -> flags.FlagHolder:
    return flags.DEFINE_enum("dtype", default, DTYPES, f"{help} auto: bfloat16 on a GPU, float32 elsewhere (CPUs "
                             "have no fast bfloat16 dots).")


def resolve_dtype(name: str) -> jnp.dtype:
    """The dtype a --dtype value names, with auto resolved for the device JAX runs on."""
    if name == "auto":
        name = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class HeadFlags:
    """--q_heads, --kv_heads and --head_dim: the attention shape of synthetic inputs."""
    q_heads: flags.FlagHolder
    kv_heads: flags.FlagHolder
    head_dim: flags.FlagHolder

    @classmethod
    def define(cls, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> "HeadFlags":
        return cls(flags.DEFINE_integer("q_heads", q_heads, "Query heads.", lower_bound=1),
                   flags.DEFINE_integer("kv_heads", kv_heads, "Key/value heads (GQA: divides --q_heads).",
                                        lower_bound=1),
                   flags.DEFINE_integer("head_dim", head_dim, "Head dimension.", lower_bound=1))

    def values(self) -> tuple[int, int, int]:
        """(q heads, kv heads, head dim)."""
        return self.q_heads.value, self.kv_heads.value, self.head_dim.value


@dataclasses.dataclass(frozen=True)
class SaleFlags:
    """--backend, --block_q, --block_k, --sink_tokens, --local_tokens, --quant_granularity, --estimate and
    --interpret: the `SaleConfig` a script runs. Defaults are `SaleConfig`'s unless the script passes its own;
    `backend=None` leaves --backend out, for the scripts that call the kernels themselves."""
    backend: flags.FlagHolder | None
    block_q: flags.FlagHolder
    block_k: flags.FlagHolder
    sink_tokens: flags.FlagHolder
    local_tokens: flags.FlagHolder
    quant_granularity: flags.FlagHolder
    estimate: flags.FlagHolder
    interpret: flags.FlagHolder

    @classmethod
    def define(cls, backend: str | None = "auto", **defaults) -> "SaleFlags":
        unknown = set(defaults) - {"block_q", "block_k", "sink_tokens", "local_tokens", "quant_granularity"}
        if unknown:
            raise ValueError(f"SaleFlags.define: no flag {sorted(unknown)}")
        default = {field.name: field.default for field in dataclasses.fields(sale_jax.SaleConfig)} | defaults
        return cls(
            backend=None if backend is None else flags.DEFINE_enum("backend", backend, BACKENDS, _BACKEND_HELP),
            block_q=flags.DEFINE_integer("block_q", default["block_q"], "SaleConfig.block_q: query rows per block.",
                                         lower_bound=1),
            block_k=flags.DEFINE_integer("block_k", default["block_k"], "SaleConfig.block_k: keys per block.",
                                         lower_bound=1),
            sink_tokens=flags.DEFINE_integer("sink_tokens", default["sink_tokens"], "SaleConfig.sink_tokens: "
                                             "leading keys always kept.", lower_bound=0),
            local_tokens=flags.DEFINE_integer("local_tokens", default["local_tokens"], "SaleConfig.local_tokens: "
                                              "keys before each query always kept.", lower_bound=1),
            quant_granularity=flags.DEFINE_enum("quant_granularity", default["quant_granularity"],
                                                QUANT_GRANULARITIES,
                                                "SaleConfig.quant_granularity: one 4-bit scale per row or per block."),
            estimate=flags.DEFINE_enum("estimate", default["estimate"], ESTIMATES,
                                       "SaleConfig.estimate: the selection's estimate multiplies every 4-bit code "
                                       "(full) or the q codes pruned to 2:4 (sparse_q, Hopper's sparse wgmma)."),
            interpret=flags.DEFINE_bool("interpret", False, "SaleConfig.interpret: run the Pallas kernels in "
                                        "interpret mode (on a CPU; slow, for smoke runs and tests)."))

    def config(self, **overrides) -> sale_jax.SaleConfig:
        """The `SaleConfig` of the flags, with `overrides` (e.g. `dense_below=0`) on top."""
        fields = {name: getattr(self, name).value for name in ("block_q", "block_k", "sink_tokens", "local_tokens",
                                                                "quant_granularity", "estimate", "interpret")}
        if self.backend is not None:
            fields["backend"] = self.backend.value
        return sale_jax.SaleConfig(**(fields | overrides))


@dataclasses.dataclass(frozen=True)
class RetrievalTaskFlags:
    """--num_records, --num_queries and --filler: the key-value retrieval sequences (experiments/lib/retrieval_task.py).
    An evaluation takes the values the model was trained with."""
    num_records: flags.FlagHolder
    num_queries: flags.FlagHolder
    filler: flags.FlagHolder

    @classmethod
    def define(cls) -> "RetrievalTaskFlags":
        return cls(flags.DEFINE_integer("num_records", 8, "Key-value records per sequence.", lower_bound=1),
                   flags.DEFINE_integer("num_queries", 4, "Queries per sequence (4 answer digits each).",
                                        lower_bound=1),
                   flags.DEFINE_enum("filler", "random", list(retrieval_task.FILLERS), "Filler text between the "
                                     "records."))


def define_repeats(default: int, help: str = "Timed calls per measurement (median reported).") -> flags.FlagHolder:
    return flags.DEFINE_integer("repeats", default, help, lower_bound=1)


def define_output(required: bool = True, default: str | None = None) -> flags.FlagHolder:
    return flags.DEFINE_string("output", default, "JSON file for the results; plots and other files are written "
                               "beside it.", required=required and default is None)
