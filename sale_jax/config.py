"""Static configuration of SALE attention: block sizes, regions, quantization and backend choice."""

from __future__ import annotations

import dataclasses
import math

import jax

from sale_jax import tuning

QUANT_GRANULARITIES = ("per_token", "per_block")
ESTIMATES = ("full", "sparse_q")
# A selection call's (q block, key block) pairs over batch and heads, at most: its hit flags and layout slots stay
# indexable by int32 and within a few GB (2**30 int32 flags: 4 GB).
MAX_SELECTION_PAIRS = 2 ** 30
BACKENDS = ("auto", "reference", "triton", "mosaic_gpu")
KERNEL_BACKENDS = ("triton", "mosaic_gpu")
BACKEND_ALIASES = {"pallas": "triton", "pallas_mosaic": "mosaic_gpu"}  # accepted, stored as their new names


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_kernel_block_sizes(config: "SaleConfig") -> None:
    """The block sizes the named kernel backend takes, as the backend states them (imported here, not at the top:
    the backends import this module)."""
    from sale_jax.backends import KERNEL_MODULES
    reason = KERNEL_MODULES[config.backend].unsupported_block_sizes(config)
    if reason is not None:
        raise ValueError(f"SaleConfig: {reason}")


@dataclasses.dataclass(frozen=True)
class SaleConfig:
    """Everything about a SALE call that is fixed at compile time (hashable, so it can be a static jit argument).

    Attributes:
      block_q: query rows per block (power of two). The paper's is 64; the default, 128, is where the kernels run
        fastest and a calibrated model's retrieval accuracy matched dense attention (docs/tuning.md#block-q).
        Thresholds calibrate at whichever block_q they will run with (`calibrate` takes the config).
      block_k: keys per block (power of two). The paper's default is 32.
      sink_tokens: key blocks intersecting `[0, sink_tokens)` are always kept and feed the reference statistics.
      local_tokens: key blocks intersecting `[p_first - local_tokens + 1, p_last]` of a query block are always kept
        and feed the reference statistics; at least 1, so the diagonal block is always local. Counted in keys, not
        blocks, and any count is accepted: the blocks the window touches are kept whole, so a window shorter than
        block_k keeps the diagonal blocks and the one holding key `p_first - local_tokens + 1` (at block_k 32,
        every local_tokens from 2 to 33 keeps the same blocks for a query block that starts on a key block).
      quant_granularity: `"per_token"` (one 4-bit scale per query row / key) or `"per_block"` (one per block).
      estimate: what the selection's low-bit estimate multiplies: `"full"`, every 4-bit code (the paper's), or
        `"sparse_q"`, the q codes pruned to 2:4 structured sparsity (the two largest of every four channels): on the
        `mosaic_gpu` backend the estimate's dots then run as Hopper's sparse fp8 wgmma, at twice the dense rate;
        the other backends estimate the same pruned codes (the same selection, without the speedup). What it
        keeps and loses against the full estimate: docs/results.md#cheaper-estimates.
      backend: `"reference"` (pure jnp, any block sizes), `"triton"` (the Pallas kernels, Triton lowering; any GPU;
        block_q and block_k >= 16), `"mosaic_gpu"` (the same, but the selection's low-bit estimate runs as a Pallas
        Mosaic GPU kernel: fp8 wgmma, Hopper only; block_q 64 or 128, block_k from 16 to 256 or 128 with them,
        head_dim 64, 128 or 256; for bf16/fp16 inputs with head_dim 64 or 128 at block_q 128 the computation pass
        too) or `"auto"`: `"mosaic_gpu"` on Hopper, where its selection is the faster one
        (docs/tuning.md#backends), with `"triton"` for the calls it cannot take; `"triton"` on other GPUs; the
        reference elsewhere. The names `"pallas"` and `"pallas_mosaic"` are accepted for `"triton"` and
        `"mosaic_gpu"`. A config naming a kernel backend is refused when made if its block sizes are ones that
        backend never takes; `"auto"` checks them at the call, once it knows the backend.
      interpret: run Pallas kernels in interpret mode (for CPU testing).
      scale: softmax scale; `None` means `head_dim ** -0.5`.
      dense_below: `sale_attention` runs dense attention for key sequences shorter than this, where the
        selection pass would cost more than the blocks it skips; 0 runs SALE at every length. `None` (the
        default) takes the device's tuning table (`sale_jax.tuning`): the shortest key length at which SALE at
        the default threshold beat dense attention for the backend the call runs and block_q
        (docs/tuning.md#dense-below).
      query_chunk: `sale_attention` runs longer queries as consecutive chunks of this many (a multiple of
        block_q), each over the keys up to its end, as chunked prefill would, but smoothed by the whole call's
        means, so the result equals an unchunked call's. `None` (the default) takes the longest chunk whose
        selection has at most `MAX_SELECTION_PAIRS` (q block, key block) pairs over batch and heads (8 chunks at
        1M tokens for 32 q heads; none at 256K).
    """

    block_q: int = tuning.DEFAULT_BLOCK_Q
    block_k: int = 32
    sink_tokens: int = 32
    local_tokens: int = 128
    quant_granularity: str = "per_token"
    estimate: str = "full"
    backend: str = "auto"
    interpret: bool = False
    scale: float | None = None
    dense_below: int | None = None
    query_chunk: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not _is_power_of_two(value):
                raise ValueError(f"SaleConfig.{name} must be a positive power of two, got {value!r}")
        for name, minimum in (("sink_tokens", 0), ("local_tokens", 1), ("dense_below", 0), ("query_chunk", 1)):
            value = getattr(self, name)
            optional = name in ("dense_below", "query_chunk")
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SaleConfig.{name} must be {'None or ' if optional else ''}an int >= {minimum}, "
                                 f"got {value!r}")
        if self.query_chunk is not None and self.query_chunk % self.block_q:
            raise ValueError(f"SaleConfig.query_chunk must be a multiple of block_q {self.block_q}, got "
                             f"{self.query_chunk}")
        if self.quant_granularity not in QUANT_GRANULARITIES:
            raise ValueError(
                f"SaleConfig.quant_granularity must be one of {QUANT_GRANULARITIES}, got {self.quant_granularity!r}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"SaleConfig.estimate must be one of {ESTIMATES}, got {self.estimate!r}")
        if isinstance(self.backend, str):
            object.__setattr__(self, "backend", BACKEND_ALIASES.get(self.backend, self.backend))
        if self.backend not in BACKENDS:
            raise ValueError(f"SaleConfig.backend must be one of {BACKENDS} (or an alias in {BACKEND_ALIASES}), got "
                             f"{self.backend!r}")
        if self.backend in KERNEL_BACKENDS:
            _check_kernel_block_sizes(self)
        if not isinstance(self.interpret, bool):
            raise ValueError(f"SaleConfig.interpret must be a bool, got {self.interpret!r}")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                    math.isfinite(self.scale) and self.scale > 0):
                raise ValueError(f"SaleConfig.scale must be None or a finite positive number, got {self.scale!r}")
            object.__setattr__(self, "scale", float(self.scale))

    def softmax_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else head_dim ** -0.5

    def resolved_backend(self) -> str:
        """The backend calls run: `auto` picks the kernels on GPU (the Mosaic GPU selection on Hopper) and the
        reference elsewhere. A call's plan (`sale_jax.plan.plan_call`) narrows an `auto` `mosaic_gpu` to `triton`
        for the shapes and block sizes the Mosaic GPU kernels do not take."""
        if self.backend != "auto":
            return self.backend
        if jax.default_backend() != "gpu":
            return "reference"
        return "mosaic_gpu" if tuning.on_hopper() else "triton"

    def resolved_dense_below(self, backend: str, table: tuning.KernelTuning) -> int:
        """`dense_below`, or the crossover the tuning table `table` lists for `backend` (the one a call runs) at
        this block_q."""
        if self.dense_below is not None:
            return self.dense_below
        return table.dense_below_for(backend, self.block_q)

    def resolved_query_chunk(self, batch: int, q_heads: int, kv_len: int) -> int:
        """`query_chunk`, or the most queries (whole q blocks, at least one) whose selection stays within
        `MAX_SELECTION_PAIRS` (q block, key block) pairs."""
        if self.query_chunk is not None:
            return self.query_chunk
        pairs_per_q_block = batch * q_heads * -(-kv_len // self.block_k)
        return max(1, MAX_SELECTION_PAIRS // pairs_per_q_block) * self.block_q

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "SaleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown SaleConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**fields)
