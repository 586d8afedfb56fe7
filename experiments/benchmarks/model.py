"""Prefill of a Llama-shaped model, random weights of a preset or a Hugging Face checkpoint of any supported family:
dense (cuDNN) attention against SALE, per layer and whole.

    python -m experiments.benchmarks.model --output=experiments/results/model_prefill/h200/model.json  # 8B, 64K
    python -m experiments.benchmarks.model --checkpoint=DIR --thresholds=t.json --output=/tmp/model.json
    python -m experiments.benchmarks.model --preset=tiny --seq_len=1024 --output=/tmp/model.json  # CPU smoke run
    python -m experiments.benchmarks.model --seq_len=131072 --mesh=1,4 --output=...           # 4 GPUs, tensor-parallel

Reports, on the same random prompt: each layer's attention time (dense vs SALE, on that layer's captured q/k/v,
with the layer's kept-block density), the whole prefill's time (last-position logits only), and each compiled
prefill's device memory (arguments + outputs + temporaries, from XLA's memory analysis). Medians of --repeats.
Random weights give no learned attention pattern; the densities are what a uniform --tau keeps on them.
A checkpoint's densities are what its thresholds (--thresholds, or a uniform --tau) keep on a random prompt.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import sale_jax
from experiments.lib import flags as common, results
from experiments.lib.timing import median_seconds
from models import checkpoint, llama
from models.calibration import attention_inputs
from models.config import LlamaConfig
from models.sharding import make_mesh, shard_batch, shard_llama
from sale_jax import sharding

_PRESET = flags.DEFINE_enum("preset", "llama_3_1_8b", ["llama_3_1_8b", "llama_3_2_3b", "llama_3_2_1b", "tiny"],
                            "Model shape, with random weights (without --checkpoint).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint folder of a supported family "
                                  "(models.config.FAMILIES), loaded with its weights instead of a --preset.")
_LAYERS = flags.DEFINE_integer("layers", None, "Override a --preset's number of layers.")
_SEQ_LEN = common.define_seq_len(65536, "Prompt tokens.")
_DTYPE = common.define_dtype("auto", "The model's dtype.")
_SALE = common.SaleFlags.define(backend="auto")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Uniform SALE threshold (without --thresholds).")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Thresholds file (sale_jax.Thresholds.save) for the model.")
_REPEATS = common.define_repeats(3)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before them (the first one compiles).", lower_bound=1)
_TIME_LAYERS = flags.DEFINE_bool("time_layers", True, "Also time each layer's attention alone (dense vs SALE) "
                                 "on its captured q/k/v; without it, only whole prefills are timed.")
_MESH = common.define_numbers("mesh", [1, 1], "Device mesh as data,model: batch on data, heads (tensor "
                              "parallelism) on model. 1,1 = one device.", kind=int)
_OUTPUT = common.define_output()


def _memory_bytes(fn, *args) -> int | None:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def _dense_model(dtype: str) -> llama.Llama:
    if _CHECKPOINT.value is None:
        overrides = {"dtype": dtype, **({"num_layers": _LAYERS.value} if _LAYERS.value else {})}
        return llama.Llama(getattr(LlamaConfig, _PRESET.value)(**overrides), nnx.Rngs(0))
    if _LAYERS.value:
        raise ValueError("--layers changes a --preset's shape; a --checkpoint has the layers its weights have")
    return checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype)


def main(argv):
    del argv
    dense_model = _dense_model(common.resolve_dtype(_DTYPE.value).name)
    config = dense_model.config
    thresholds = (sale_jax.Thresholds.load(_THRESHOLDS.value, num_layers=config.num_layers,
                                           num_q_heads=config.num_heads) if _THRESHOLDS.value
                  else sale_jax.Thresholds.uniform(config.num_layers, config.num_heads, _TAU.value))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, _SEQ_LEN.value)), jnp.int32)
    lengths = jnp.asarray([_SEQ_LEN.value])
    if len(_MESH.value) != 2:
        raise ValueError(f"--mesh takes two sizes, data,model; got {_MESH.value}")
    data, model_axis = _MESH.value
    mesh = None
    attend, dense_attend = sale_jax.sale_attention, sale_jax.dense_attention
    if data * model_axis > 1:
        mesh = make_mesh(data, model_axis)
        dense_model = shard_llama(dense_model, mesh)
        tokens, lengths = shard_batch(tokens, mesh), shard_batch(lengths, mesh)
        attend = functools.partial(sharding.sale_attention, mesh=mesh)
        dense_attend = functools.partial(sharding.dense_attention, mesh=mesh)
    sale_model = llama.with_attention(dense_model, "sale", _SALE.config())

    def ms(fn):
        return median_seconds(fn, _REPEATS.value, warmup=_WARMUP.value) * 1e3

    layers = []
    for index, (q, k, v) in enumerate(attention_inputs(dense_model, tokens) if _TIME_LAYERS.value else ()):
        tau = thresholds.layer(index)
        _, layout = attend(q, k, v, tau, sale_model.config.sale, return_layout=True)
        layers.append({
            "layer": index, "density": float(layout.density()),
            "dense_ms": ms(lambda: dense_attend(q, k, v)),
            "sale_ms": ms(lambda: attend(q, k, v, tau, sale_model.config.sale)),
        })
        print(json.dumps(layers[-1]), flush=True)

    def run_prefill(model, use_thresholds):
        graphdef, state = nnx.split(model)

        def fn(state, tokens, lengths, tau):
            merged = nnx.merge(graphdef, state)
            thresholds_arg = sale_jax.Thresholds(tau) if use_thresholds else None
            return merged.prefill(tokens, lengths, thresholds_arg, all_logits=False)[0]

        compiled = jax.jit(fn)
        milliseconds = ms(lambda: compiled(state, tokens, lengths, thresholds.tau))
        return milliseconds, _memory_bytes(fn, state, tokens, lengths, thresholds.tau)

    dense_ms, dense_bytes = run_prefill(dense_model, False)
    sale_ms, sale_bytes = run_prefill(sale_model, True)
    summary = {
        "model": _CHECKPOINT.value or _PRESET.value, "family": config.family(), "layers": config.num_layers,
        "seq_len": _SEQ_LEN.value, "dtype": config.dtype,
        "thresholds": _THRESHOLDS.value or f"uniform tau {_TAU.value:g}", "repeats": _REPEATS.value,
        "warmup": _WARMUP.value,
        "per_layer": layers,
        "attention_ms_total": {"dense": sum(r["dense_ms"] for r in layers), "sale": sum(r["sale_ms"] for r in layers)},
        "prefill_ms": {"dense": dense_ms, "sale": sale_ms},
        "prefill_memory_bytes": {"dense": dense_bytes, "sale": sale_bytes},
        "mesh": {"data": data, "model": model_axis},
        "peak_bytes_per_device": [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()],
    }
    print(json.dumps({k: summary[k] for k in ("attention_ms_total", "prefill_ms", "prefill_memory_bytes")}, indent=1))
    results.write(_OUTPUT.value, summary, sale_model.config.sale)


if __name__ == "__main__":
    app.run(main)
