"""The main job: a Llama prefilling a long prompt with dense attention and with SALE, side by side.

    python -m experiments.demo                                   # tiny random Llama, 4K-token prompt, CPU-sized
    python -m experiments.demo --checkpoint=DIR --seq_len=65536  # any Hugging Face Llama checkpoint (GPU: kernels)
    python -m experiments.demo --thresholds=t.json               # calibrated thresholds instead of a uniform tau

The prompt is the paper's calibration task as bytes (a long JSON object of UUID pairs and a question), folded into
the model's vocabulary. Prints per-layer density of kept blocks, the logits' difference from the dense model,
greedy-token agreement over --new_tokens, and median prefill times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import sale_jax
from experiments.lib import flags as common, results
from experiments.lib.timing import median_seconds
from models import checkpoint, llama
from models.config import LlamaConfig
from sale_jax.kv_prompts import json_kv_prompt

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face Llama folder; default: a tiny random Llama.")
_SEQ_LEN = common.define_seq_len(4096, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 16, "Greedy tokens generated after the prompt.")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Uniform threshold when no --thresholds file is given.")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Calibrated thresholds file (sale_jax.Thresholds.save).")
_SALE = common.SaleFlags.define(backend="auto")
_DTYPE = common.define_dtype("auto", "The model's dtype.")
_DENSE_BELOW = flags.DEFINE_integer("dense_below", 0, "SaleConfig.dense_below: 0 shows SALE at every length; "
                                    "the library's default is the measured crossover of the backend that runs "
                                    "(sale_jax.tuning).", lower_bound=0)
_REPEATS = common.define_repeats(3, "Timed prefills (median reported).")
_OUTPUT = common.define_output(required=False)


def main(argv):
    del argv
    dtype = common.resolve_dtype(_DTYPE.value).name
    sale = _SALE.config(dense_below=_DENSE_BELOW.value)
    if _CHECKPOINT.value:
        dense_model = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype)
    else:
        config = LlamaConfig.tiny(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256,
                                  intermediate_size=512, max_position_embeddings=131_072, dtype=dtype)
        dense_model = llama.Llama(config, nnx.Rngs(0))
    config = dense_model.config
    sale_model = llama.with_attention(dense_model, "sale", sale)

    if _THRESHOLDS.value:
        thresholds = sale_jax.Thresholds.load(_THRESHOLDS.value, config.num_layers, config.num_heads)
    else:
        thresholds = sale_jax.Thresholds.uniform(config.num_layers, config.num_heads, _TAU.value)
    prompt = json_kv_prompt(0, _SEQ_LEN.value)
    tokens = jnp.asarray(prompt.tokens % config.vocab_size, jnp.int32)[None]
    lengths = jnp.asarray([tokens.shape[1]])

    dense_logits, _ = llama.prefill(dense_model, tokens, lengths)
    sale_logits, _, density = llama.prefill(sale_model, tokens, lengths, thresholds, return_density=True)
    dense_tokens = llama.generate(dense_model, tokens, lengths, max_new_tokens=_NEW_TOKENS.value)
    sale_tokens = llama.generate(sale_model, tokens, lengths, thresholds, max_new_tokens=_NEW_TOKENS.value)
    dense_seconds = median_seconds(lambda: llama.prefill(dense_model, tokens, lengths), _REPEATS.value, warmup=1)
    sale_seconds = median_seconds(lambda: llama.prefill(sale_model, tokens, lengths, thresholds), _REPEATS.value,
                                  warmup=1)
    summary = {
        "model": _CHECKPOINT.value or "tiny random Llama",
        "layers": config.num_layers, "q_heads": config.num_heads, "kv_heads": config.num_kv_heads,
        "dtype": config.dtype, "backend": sale.resolved_backend(),
        "prompt_tokens": int(tokens.shape[1]),
        "thresholds": _THRESHOLDS.value or f"uniform {_TAU.value}",
        "density_per_layer": np.round(np.asarray(density), 4).tolist(),
        "max_abs_logit_diff": float(jnp.abs(sale_logits - dense_logits).max()),
        "last_position_max_abs_logit_diff": float(jnp.abs(sale_logits[0, -1] - dense_logits[0, -1]).max()),
        "greedy_token_agreement": float(jnp.mean(sale_tokens == dense_tokens)),
        "dense_prefill_seconds": dense_seconds,
        "sale_prefill_seconds": sale_seconds,
    }
    print(f"model {summary['model']} ({config.num_layers} layers, {config.num_heads} q / {config.num_kv_heads} kv "
          f"heads, {config.dtype}) on {jax.devices()[0].device_kind}, SALE backend {summary['backend']}")
    print(f"prompt tokens              {summary['prompt_tokens']}")
    print(f"thresholds                 {summary['thresholds']}")
    print(f"kept-block density / layer {summary['density_per_layer']}")
    print(f"logits vs dense            max |d| {summary['max_abs_logit_diff']:.4f} "
          f"(last position {summary['last_position_max_abs_logit_diff']:.4f})")
    print(f"greedy tokens agreeing     {summary['greedy_token_agreement']:.2%} of {_NEW_TOKENS.value}")
    print(f"prefill (median of {_REPEATS.value})      dense {dense_seconds * 1e3:.1f} ms, "
          f"SALE {sale_seconds * 1e3:.1f} ms")
    if _OUTPUT.value:
        results.write(_OUTPUT.value, summary, sale)


if __name__ == "__main__":
    app.run(main)
