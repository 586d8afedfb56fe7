"""Llama 3.x architecture configuration: presets and construction from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os

from jax.sharding import Mesh

import sale_jax

ATTENTION_KINDS = ("dense", "sale")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131_072
    attention: str = "dense"  # "dense" (cuDNN/XLA) or "sale" (sale_jax.sale_attention in prefill)
    sale: sale_jax.SaleConfig = sale_jax.SaleConfig()
    dtype: str = "bfloat16"  # parameter and activation dtype
    mesh: Mesh | None = None  # set by models.sharding.shard_llama: attention then runs per device on ("data", "model")

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A test-sized model with GQA and Llama-3 RoPE scaling switched on."""
        fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_scaling=RopeScaling(original_max_position_embeddings=64),
                      max_position_embeddings=2048, dtype="float32")
        return cls(**{**fields, **overrides})

    @classmethod
    def llama_3_1_8b(cls, **overrides) -> "LlamaConfig":
        fields = dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_scaling=RopeScaling())
        return cls(**{**fields, **overrides})

    @classmethod
    def llama_3_2_1b(cls, **overrides) -> "LlamaConfig":
        fields = dict(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True)
        return cls(**{**fields, **overrides})

    @classmethod
    def llama_3_2_3b(cls, **overrides) -> "LlamaConfig":
        fields = dict(vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                      num_kv_heads=8, head_dim=128, rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict, **overrides) -> "LlamaConfig":
        """From a Hugging Face `config.json` (a path to the file or its folder, or the parsed dict)."""
        if not isinstance(config, dict):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"expected a llama config, got model_type={config.get('model_type')!r}")
        # transformers 5 nests theta and scaling in `rope_parameters`; 4.x has `rope_theta` and `rope_scaling`.
        rope = config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else config.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ValueError(f"unsupported rope scaling type {kind!r}; supported: llama3 or none")
            scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                  float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        num_heads = config["num_attention_heads"]
        fields = dict(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=config.get("num_key_value_heads", num_heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            rope_theta=float(theta), rope_scaling=scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 131_072))
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` contents for this architecture."""
        scaling = None
        if self.rope_scaling is not None:
            scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
                "rope_scaling": scaling, "rms_norm_eps": self.rms_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "torch_dtype": self.dtype}
