"""Static configuration of SALE attention: block sizes, regions, quantization and backend choice."""

from __future__ import annotations

import dataclasses
import math

import jax

QUANT_GRANULARITIES = ("per_token", "per_block")
BACKENDS = ("auto", "reference", "pallas", "pallas_mosaic")
PALLAS_BACKENDS = ("pallas", "pallas_mosaic")
# Where SALE at the default threshold (0.008) starts to beat cuDNN on the H200 (Hq 32 / Hkv 8 / D 128, bf16,
# LLM-like inputs, experiments/results/bench_attention_h200_tau0.008_*): per (backend, block_q); see dense_below.
MEASURED_DENSE_BELOW = {("pallas_mosaic", 128): 16384, ("pallas_mosaic", 64): 65536, ("pallas", 128): 65536,
                        ("pallas", 64): 65536}
DEFAULT_DENSE_BELOW = 65536  # backends and block sizes not measured


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _on_hopper() -> bool:
    """Whether JAX's default device is an sm_90 GPU, where the Mosaic GPU estimate (wgmma, TMA) runs."""
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")


@dataclasses.dataclass(frozen=True)
class SaleConfig:
    """Everything about a SALE call that is fixed at compile time (hashable, so it can be a static jit argument).

    Attributes:
      block_q: query rows per block (power of two). The paper's is 64; the default is 128, where the kernels are
        fastest on the H200 (at density 0.10: 2.45x cuDNN at 128K against 1.77x at 64, and selection 29% of cuDNN's
        time against 34%) and where a calibrated model's retrieval accuracy matched dense attention
        (experiments/results/PERF_NOTES.md, session 9). Thresholds calibrate at whichever block_q they will run
        with (`calibrate` takes the config).
      block_k: keys per block (power of two). The paper's default is 32.
      sink_tokens: key blocks intersecting `[0, sink_tokens)` are always kept and feed the reference statistics.
      local_tokens: key blocks intersecting `[p_first - local_tokens + 1, p_last]` of a query block are always kept
        and feed the reference statistics; at least 1, so the diagonal block is always local.
      quant_granularity: `"per_token"` (one 4-bit scale per query row / key) or `"per_block"` (one per block).
      backend: `"reference"` (pure jnp), `"pallas"` (GPU kernels, Triton lowering), `"pallas_mosaic"` (the same,
        but the selection's low-bit estimate runs as a Mosaic GPU kernel: fp8 wgmma, Hopper only; block_q 64 or
        128, head_dim 64, 128 or 256; for bf16/fp16 inputs with head_dim 64 or 128 the computation pass too) or
        `"auto"`: `"pallas_mosaic"` on Hopper (its selection measured 20-25% faster
        than the Triton one on the H200; calls it cannot take run `"pallas"`), `"pallas"` on other GPUs, the
        reference elsewhere.
      interpret: run Pallas kernels in interpret mode (for CPU testing).
      scale: softmax scale; `None` means `head_dim ** -0.5`.
      dense_below: `sale_attention` runs dense attention for key sequences shorter than this, where the
        selection pass would cost more than the blocks it skips; 0 runs SALE at every length. `None` (the
        default) takes the shortest length at which SALE at the default threshold (0.008) beat cuDNN on the H200
        (Hq 32 / Hkv 8 / D 128, bf16, LLM-like inputs) for the backend the call runs and block_q
        (`MEASURED_DENSE_BELOW`): 16K with the Mosaic GPU kernels at block_q 128 (1.14x at 16K, 1.31x at 32K),
        64K with the Triton ones (0.79x at 32K, 1.06x at 64K) and at block_q 64 (0.89x at 32K, 1.20x at 64K).
    """

    block_q: int = 128
    block_k: int = 32
    sink_tokens: int = 32
    local_tokens: int = 128
    quant_granularity: str = "per_token"
    backend: str = "auto"
    interpret: bool = False
    scale: float | None = None
    dense_below: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not _is_power_of_two(value):
                raise ValueError(f"SaleConfig.{name} must be a positive power of two, got {value!r}")
        for name, minimum in (("sink_tokens", 0), ("local_tokens", 1), ("dense_below", 0)):
            value = getattr(self, name)
            if name == "dense_below" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SaleConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.quant_granularity not in QUANT_GRANULARITIES:
            raise ValueError(
                f"SaleConfig.quant_granularity must be one of {QUANT_GRANULARITIES}, got {self.quant_granularity!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SaleConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
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
        """The backend calls run: `auto` picks the Pallas kernels on GPU (the Mosaic GPU selection on Hopper) and
        the reference elsewhere. `sale_jax.api` narrows an `auto` `pallas_mosaic` to `pallas` for the shapes and
        block sizes the Mosaic kernel does not take."""
        if self.backend != "auto":
            return self.backend
        if jax.default_backend() != "gpu":
            return "reference"
        return "pallas_mosaic" if _on_hopper() else "pallas"

    def resolved_dense_below(self, backend: str) -> int:
        """`dense_below`, or where `backend` (the one a call runs) measured its crossover at this block_q."""
        if self.dense_below is not None:
            return self.dense_below
        return MEASURED_DENSE_BELOW.get((backend, self.block_q), DEFAULT_DENSE_BELOW)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "SaleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown SaleConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**fields)
