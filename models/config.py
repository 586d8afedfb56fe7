"""Decoder configuration for Llama 3.x and the Llama-shaped Qwen2/Qwen2.5, Qwen3 and Mistral families: presets and
construction from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os

from jax.sharding import Mesh

import sale_jax

ATTENTION_KINDS = ("dense", "sale")

# Hugging Face `model_type` -> (its `architectures` name, the `LlamaConfig` fields that set the family apart).
# Everything else (sizes, RoPE, norms, tied embeddings) is read from config.json the same way for every family.
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-shaped decoder (RMSNorm, SwiGLU, GQA, RoPE). `qkv_bias` (Qwen2) adds biases to the q, k and v
    projections; `qk_norm` (Qwen3) applies an RMSNorm over each head's q and k before RoPE."""

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
    qkv_bias: bool = False
    qk_norm: bool = False
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
        """From a Hugging Face `config.json` (a path to the file or its folder, or the parsed dict) of a family in
        `FAMILIES`, chosen by `model_type` (or, without it, by `architectures`). Only full attention is supported:
        a sliding window shorter than `max_position_embeddings` is refused. Errors name the file and the field."""
        source = "config"
        if not isinstance(config, dict):
            source = os.path.join(config, "config.json") if os.path.isdir(config) else os.fspath(config)
            config = _read_json(source)
        family = _family(config, source)
        _check_sizes(config, family, source)
        # Qwen2 and Qwen3 keep a `sliding_window` size that `use_sliding_window: false` switches off.
        window = None if config.get("use_sliding_window") is False else config.get("sliding_window")
        max_positions = config.get("max_position_embeddings", 131_072)
        if window is not None and window < max_positions:
            raise ValueError(f"{source}: sliding_window={window} is below max_position_embeddings={max_positions}: "
                             f"only full attention is supported, not sliding-window attention (sliding_window null)")
        for name in ("attention_bias", "mlp_bias"):  # Qwen2's q/k/v biases are its family's, not these flags
            if config.get(name):
                raise ValueError(f"{source}: {name}=true is not supported: the only biases are Qwen2's, on q, k "
                                 f"and v")
        # transformers 5 nests theta and scaling in `rope_parameters`; 4.x has `rope_theta` and `rope_scaling`.
        rope = config.get("rope_parameters") or {}
        theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else config.get("rope_scaling")
        num_heads = config["num_attention_heads"]
        fields = dict(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=_optional(config, "num_key_value_heads", num_heads),
            head_dim=_optional(config, "head_dim", config["hidden_size"] // num_heads),
            rope_theta=float(theta), rope_scaling=_rope_scaling(scaling, source),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=max_positions, **FAMILIES[family][1])
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` contents for this architecture."""
        scaling = None
        if self.rope_scaling is not None:
            scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        family = self.family()
        return {"architectures": [FAMILIES[family][0]], "model_type": family, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
                "rope_scaling": scaling, "rms_norm_eps": self.rms_norm_eps,
                "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "torch_dtype": self.dtype}

    def family(self) -> str:
        """The Hugging Face `model_type` this configuration saves as: the first family in `FAMILIES` (llama before
        mistral, which has the same architecture) whose distinguishing fields it has."""
        differences = {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm}
        for name, (_, fields) in FAMILIES.items():
            if differences == {**dict.fromkeys(differences, False), **fields}:
                return name
        raise ValueError(f"no Hugging Face family has {differences}; supported: {_supported()}")


# The sizes every family's config.json gives; `num_key_value_heads` (default: num_attention_heads) and `head_dim`
# (default: hidden_size / num_attention_heads) may be left out or null.
REQUIRED_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_HF_SIZES = ("num_key_value_heads", "head_dim")
LLAMA3_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); an interrupted download leaves a file like this: "
                             f"download it again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of model settings, got a {type(config).__name__}")
    return config


def _optional(config: dict, name: str, default):
    return default if config.get(name) is None else config[name]


def _check_sizes(config: dict, family: str, source: str) -> None:
    """The sizes are there, positive ints, and agree: heads divide the hidden size where no head_dim is given,
    and k/v heads divide the q heads."""
    missing = [name for name in REQUIRED_HF_SIZES if name not in config]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)}; a {family} config.json needs "
                         f"{', '.join(REQUIRED_HF_SIZES)} (each a positive int), and may give "
                         f"{' and '.join(OPTIONAL_HF_SIZES)}")
    for name in REQUIRED_HF_SIZES + OPTIONAL_HF_SIZES:
        value = config.get(name)
        if name in OPTIONAL_HF_SIZES and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: {name} must be a positive int, got {value!r}")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; without "
                         f"head_dim the head size is hidden_size / num_attention_heads (give head_dim, or fix one "
                         f"of the two)")
    kv_heads = _optional(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads}; grouped-query attention shares each k/v head among a whole number of q heads")


def _rope_scaling(scaling: dict | None, source: str) -> RopeScaling | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"{source}: unsupported rope scaling type {kind!r}; supported: llama3 or none")
    missing = [name for name in LLAMA3_SCALING_FIELDS if name not in scaling]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling without {', '.join(missing)}; it needs "
                         f"{', '.join(LLAMA3_SCALING_FIELDS)}")
    return RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))


def _family(config: dict, source: str) -> str:
    """The `FAMILIES` key of a Hugging Face config: its `model_type`, without one its `architectures`, without
    either llama."""
    architectures = {architecture: name for name, (architecture, _) in FAMILIES.items()}
    if "model_type" in config:
        family = config["model_type"]
    elif "architectures" in config:
        family = next((architectures[a] for a in config["architectures"] if a in architectures), None)
    else:
        family = "llama"
    if family not in FAMILIES:
        raise ValueError(f"{source}: unsupported architecture: model_type={config.get('model_type')!r}, "
                         f"architectures={config.get('architectures')}; supported: {_supported()}")
    return family


def _supported() -> str:
    return ", ".join(f"{name} ({architecture})" for name, (architecture, _) in FAMILIES.items())
