"""Tensor parallelism over heads and data parallelism over batch for the Llama, on a ("data", "model") mesh.

Megatron-style: the QKV and gate/up projections are split by output columns (each device computes whole heads
and a slice of the MLP), the attention output and down projections by input rows (XLA adds the one all-reduce
after each). Attention itself runs per device on its batch slice and heads (`sale_jax.sharding`), so Q/K/V are
never gathered; everything else is partitioned by XLA from the parameter and input shardings.
"""

from __future__ import annotations

import re

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.llama import Llama, with_config

DATA, MODEL = "data", "model"

# (parameter path pattern, partition spec); the first match wins.
_PARAM_SPECS = (
    (r"layers\.\d+\.self_attn\.[qkv]_proj\.kernel", P(None, MODEL)),
    (r"layers\.\d+\.self_attn\.[qkv]_proj\.bias", P(MODEL)),  # Qwen2: split with its projection's columns
    (r"layers\.\d+\.self_attn\.o_proj\.kernel", P(MODEL, None)),
    (r"layers\.\d+\.mlp\.(gate|up)_proj\.kernel", P(None, MODEL)),
    (r"layers\.\d+\.mlp\.down_proj\.kernel", P(MODEL, None)),
    (r"lm_head\.kernel", P(None, MODEL)),
    (r".*", P()),  # embeddings and norms (Qwen3's per-head q/k norms too): replicated
)


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A ("data", "model") mesh with automatic (GSPMD) axes: XLA partitions everything outside attention."""
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def param_spec(path: tuple) -> P:
    name = ".".join(str(p) for p in path)
    return next(spec for pattern, spec in _PARAM_SPECS if re.fullmatch(pattern, name))


def shard_llama(model: Llama, mesh: Mesh) -> Llama:
    """Places the weights on `mesh` (axes "data" and "model") and makes attention run per device."""
    if set(mesh.axis_names) != {DATA, MODEL}:
        raise ValueError(f"the mesh needs axes ('{DATA}', '{MODEL}'), got {mesh.axis_names}")
    config = model.config
    heads = mesh.shape[MODEL]
    for name, count in (("num_kv_heads", config.num_kv_heads), ("intermediate_size", config.intermediate_size)):
        if count % heads:
            raise ValueError(f"{name} ({count}) is not divisible by the mesh's '{MODEL}' axis ({heads})")
    sharded = with_config(model, mesh=mesh)
    state = nnx.state(sharded)
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        variable.set_value(jax.device_put(variable.get_value(), NamedSharding(mesh, param_spec(path))))
    nnx.update(sharded, nnx.from_flat_state(flat))
    return sharded


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Places a `[B, ...]` input with its batch on the "data" axis."""
    return jax.device_put(x, NamedSharding(mesh, P(DATA, *([None] * (x.ndim - 1)))))
