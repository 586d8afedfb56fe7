"""Hugging Face checkpoints of the Llama-shaped families (safetensors, single file or sharded with an index) to and
from the NNX model. The families share tensor names; a tensor a family lacks (a bias, a q/k norm) has no place in
the model built from its config, and loading says so.

The name mapping is a table of regular expressions: each Hugging Face tensor name maps to a path in the NNX state
and a transform (PyTorch's Linear stores `[out, in]`; `nnx.Linear` stores `[in, out]`).
"""

from __future__ import annotations

import json
import os
import re

from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from models.config import LlamaConfig
from models.llama import Llama

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def _transpose(x):
    return x.T


def _identity(x):
    return x


# (Hugging Face name pattern, NNX path template with {0}, {1}... for the groups, transform to NNX layout)
_NAME_TABLE = (
    (r"model\.embed_tokens\.weight", ("embed_tokens", "embedding"), _identity),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", ("layers", "{0}", "self_attn", "{1}_proj", "kernel"),
     _transpose),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", ("layers", "{0}", "self_attn", "{1}_proj", "bias"),
     _identity),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", ("layers", "{0}", "self_attn", "{1}_norm", "weight"),
     _identity),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", ("layers", "{0}", "mlp", "{1}_proj", "kernel"),
     _transpose),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", ("layers", "{0}", "{1}", "weight"),
     _identity),
    (r"model\.norm\.weight", ("norm", "weight"), _identity),
    (r"lm_head\.weight", ("lm_head", "kernel"), _transpose),
)


def _nnx_path(hf_name: str):
    """The NNX state path and transform for a Hugging Face tensor name, or None if the name is not ours."""
    for pattern, template, transform in _NAME_TABLE:
        match = re.fullmatch(pattern, hf_name)
        if match:
            path = tuple(int(p.format(*match.groups())) if p == "{0}" else p.format(*match.groups())
                         for p in template)
            return path, transform
    return None


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint folder: `model.safetensors`, or the shards its index names."""
    index = os.path.join(directory, _INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, _SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{directory}: neither {_SINGLE_FILE} nor {_INDEX_FILE}")


def load_llama(directory: str | os.PathLike, **config_overrides) -> Llama:
    """A `Llama` built from `directory/config.json` (plus overrides such as attention, sale, dtype) with the
    checkpoint's weights cast to the config's dtype. Parameters are never randomly initialized."""
    config = LlamaConfig.from_hf(directory, **config_overrides)
    abstract = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = dict(nnx.to_flat_state(state))
    loaded = {}
    unexpected = []
    for path in checkpoint_files(directory):
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                target = _nnx_path(name)
                if target is None or (target[0] == ("lm_head", "kernel") and config.tie_word_embeddings):
                    unexpected.append(name)
                    continue
                nnx_path, transform = target
                if nnx_path not in expected:
                    unexpected.append(name)
                    continue
                want = expected[nnx_path]
                shape = tuple(reversed(f.get_slice(name).get_shape())) if transform is _transpose else tuple(
                    f.get_slice(name).get_shape())
                if shape != tuple(want.shape):
                    raise ValueError(f"{path}: {name} has shape {tuple(f.get_slice(name).get_shape())}, the model "
                                     f"needs {tuple(want.shape)} at {'.'.join(map(str, nnx_path))} "
                                     f"(after {transform.__name__.lstrip('_')})")
                loaded[nnx_path] = transform(f.get_tensor(name)).astype(want.dtype)
    if unexpected:
        raise ValueError(f"{directory}: tensors the model has no place for: {sorted(unexpected)[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    missing = sorted(".".join(map(str, p)) for p in expected if p not in loaded)
    if missing:
        raise ValueError(f"{directory}: the checkpoint lacks {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    for nnx_path, variable in expected.items():
        variable.set_value(loaded[nnx_path])
    return nnx.merge(graphdef, nnx.from_flat_state(expected))


def save_llama(model: Llama, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Writes `config.json` and the weights in Hugging Face's names and layouts: `model.safetensors`, or with
    `max_shard_bytes` (when the weights exceed it) shards `model-0000i-of-0000n.safetensors` of at most that size
    (a larger tensor gets a shard of its own) and `model.safetensors.index.json`."""
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        tensors[_hf_name(path)] = value.T if path[-1] == "kernel" else value
    shards = [{}]
    for name, value in tensors.items():
        if max_shard_bytes and shards[-1] and _nbytes(shards[-1]) + value.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = value
    for stale in (_SINGLE_FILE, _INDEX_FILE):  # a folder already holding a checkpoint must not mix two layouts
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        save_file(tensors, os.path.join(directory, _SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, shard in enumerate(shards):
            file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        with open(os.path.join(directory, _INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": _nbytes(tensors)}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=1)


def _nbytes(tensors: dict) -> int:
    return sum(value.nbytes for value in tensors.values())


def _hf_name(path: tuple) -> str:
    if path[0] == "layers":
        return f"model.layers.{path[1]}." + ".".join(str(p) for p in path[2:-1]) + (
            ".bias" if path[-1] == "bias" else ".weight")
    if path == ("lm_head", "kernel"):
        return "lm_head.weight"
    return f"model.{path[0]}.weight"
