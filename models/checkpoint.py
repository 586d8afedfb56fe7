"""Hugging Face checkpoints of the Llama-shaped families (safetensors, single file or sharded with an index) to and
from the NNX model. The families share tensor names; a tensor a family lacks (a bias, a q/k norm) has no place in
the model built from its config, and loading says so. `save_state` and `restore_state` keep any other NNX object's
state (an optimizer's, a training-only module's) in a safetensors file too, under its NNX paths.

The name mapping is a table of regular expressions: each Hugging Face tensor name maps to a path in the NNX state
and a transform (PyTorch's Linear stores `[out, in]`; `nnx.Linear` stores `[in, out]`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import load_file, save_file

from models.config import LlamaConfig
from models.llama import Llama

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file, left where the weights should be, starts


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
        shards = _index_shards(index)
        absent = [name for name in shards if not os.path.exists(os.path.join(directory, name))]
        if absent:
            raise FileNotFoundError(f"{index} names shards that {directory} lacks: {absent}; an interrupted download "
                                    f"leaves them out: download them")
        return [os.path.join(directory, name) for name in shards]
    single = os.path.join(directory, _SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{directory}: neither {_SINGLE_FILE} nor {_INDEX_FILE}")


def _index_shards(index: str) -> list[str]:
    """The shard files an index's `weight_map` (tensor name -> file name) names, sorted."""
    with open(index) as f:
        try:
            contents = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e}); an interrupted download leaves a file like this: "
                             f"download it again") from None
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"{index}: needs a 'weight_map' from tensor names to shard file names")
    return sorted(set(weight_map.values()))


@contextlib.contextmanager
def _open_safetensors(path: str):
    """`safe_open`, with safetensors' errors (a file cut short, or not safetensors at all) naming the file and the
    likely cause."""
    try:
        with safe_open(path, framework="flax") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); {_unreadable_hint(path)}") from None


def _unreadable_hint(path: str) -> str:
    with open(path, "rb") as f:
        start = f.read(len(_LFS_POINTER))
    if start == _LFS_POINTER:
        return "it is a Git LFS pointer, not the weights: fetch them (git lfs pull, or huggingface-cli download)"
    size, promised = os.path.getsize(path), _promised_size(path)
    holds = f"it holds {size} bytes" + (f" of the {promised} its header describes" if promised else "")
    return f"{holds}; an interrupted download leaves a file like this: download it again"


def _promised_size(path: str) -> int | None:
    """The file size a safetensors header describes (8 bytes of header length, the JSON header, then the data up
    to the largest data offset), or None where the header is not there to read."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if header_length > os.path.getsize(path) - 8:
            return None
        try:
            header = json.loads(f.read(header_length))
            data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                           default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
    return 8 + header_length + data_end


def _nnx_target(name: str, config: LlamaConfig, expected: dict):
    """The NNX path and transform a checkpoint tensor loads into, or None where the model has no place for it."""
    target = _nnx_path(name)
    if target is None or (target[0] == ("lm_head", "kernel") and config.tie_word_embeddings):
        return None
    return target if target[0] in expected else None


def load_llama(directory: str | os.PathLike, **config_overrides) -> Llama:
    """A `Llama` built from `directory/config.json` (plus overrides such as attention, sale, dtype) with the
    checkpoint's weights cast to the config's dtype. Parameters are never randomly initialized. Errors name the
    file and what in it is wrong."""
    config = LlamaConfig.from_hf(directory, **config_overrides)
    abstract = nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = dict(nnx.to_flat_state(state))
    loaded = {}
    unexpected = []
    for path in checkpoint_files(directory):
        with _open_safetensors(path) as f:
            for name in f.keys():
                target = _nnx_target(name, config, expected)
                if target is None:
                    unexpected.append(name)
                    continue
                nnx_path, transform = target
                want = expected[nnx_path]
                stored = tuple(f.get_slice(name).get_shape())
                shape = tuple(reversed(stored)) if transform is _transpose else stored
                if shape != tuple(want.shape):
                    raise ValueError(f"{path}: {name} has shape {stored}, but {directory}/config.json makes the "
                                     f"model need {tuple(want.shape)} at {'.'.join(map(str, nnx_path))} (after "
                                     f"{transform.__name__.lstrip('_')}): the weights and config.json are of "
                                     f"different models")
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


def save_state(node: nnx.Module | nnx.Optimizer, path: str | os.PathLike) -> None:
    """Every state leaf of `node` (parameters and all other variables) in one safetensors file, keyed by its NNX
    path ("opt_state/1/0/mu/embed_tokens/embedding"), exactly as held (any dtype, scalars included)."""
    save_file({_state_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(node))}, os.fspath(path))


def restore_state(node: nnx.Module | nnx.Optimizer, path: str | os.PathLike) -> None:
    """Sets every state leaf of `node` in place from a file `save_state` wrote for an object of the same structure;
    a file with other paths, shapes or dtypes is refused, naming them."""
    flat = nnx.to_flat_state(nnx.state(node))
    saved = load_file(os.fspath(path))
    expected, found = {_state_key(p) for p, _ in flat}, set(saved)
    if expected != found:
        raise ValueError(f"{path} does not hold this {type(node).__name__}'s state: missing "
                         f"{sorted(expected - found)[:5]}, unexpected {sorted(found - expected)[:5]}")
    for p, variable in flat:
        value, want = saved[_state_key(p)], variable.get_value()
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"{path}: {_state_key(p)} is {value.dtype}{list(value.shape)}, but this "
                             f"{type(node).__name__} holds {want.dtype}{list(want.shape)} there")
        variable.set_value(value)
    nnx.update(node, nnx.from_flat_state(flat))


def _state_key(path: tuple) -> str:
    return "/".join(map(str, path))
