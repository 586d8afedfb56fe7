"""The main job: a trained Llama answering questions over a long prompt, with dense attention and with SALE.

    python -m experiments.demo                               # the committed retrieval model, calibrated thresholds
    python -m experiments.demo --seq_len=131072              # longer prompts (a GPU runs the Pallas kernels)
    python -m experiments.demo --checkpoint=DIR --seq_len=65536   # a checkpoint of any supported family
    python -m experiments.demo --checkpoint=random           # a small random-weight Llama

By default the model is the byte-level Llama trained on key-value retrieval
(experiments/results/retrieval_training_128k/h200/checkpoint) and its prompts are fresh sequences of that task: records
`#KK:dddd#` hidden in filler, then questions `?KK:`. For every question it prints the true answer and the answers
dense attention and SALE (at the thresholds calibrated for the model) gave, then exact-match accuracy, the density
of kept blocks per layer and median prefill times. Any other checkpoint (or random weights) prefills the paper's
JSON key-value prompt instead (--prompts) and compares the logits and greedy continuations. --seq_len 0 picks 4K
tokens on a CPU and 128K on a GPU.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import sale_jax
from experiments.lib import flags as common, results, retrieval_scoring, retrieval_task
from experiments.lib.kv_prompts import json_kv_prompt
from experiments.lib.timing import interleaved_median_seconds
from models import checkpoint, llama
from models.config import LlamaConfig

_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RETRIEVAL_MODEL = os.path.join(_RESULTS, "retrieval_training_128k", "h200", "checkpoint")
RETRIEVAL_THRESHOLDS = os.path.join(_RESULTS, "retrieval_accuracy", "h200", "thresholds_kl_budget_0.01.json")
RANDOM = "random"

_CHECKPOINT = flags.DEFINE_string("checkpoint", RETRIEVAL_MODEL, "Hugging Face folder of a supported family, "
                                  "or 'random' for a small random-weight Llama.")
_PROMPTS = flags.DEFINE_enum("prompts", None, ["retrieval", "json_kv"], "Retrieval questions, or the paper's JSON "
                              "key-value prompt with greedy continuations; default: retrieval for the committed "
                              "retrieval model, json_kv for other models.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Prompt tokens; 0: 4096 on a CPU, 131072 on a GPU.", lower_bound=0)
_SEQUENCES = flags.DEFINE_integer("sequences", 2, "Retrieval prompts (each with --num_queries questions).",
                                  lower_bound=1)
_TASK = common.RetrievalTaskFlags.define()  # as the retrieval model was trained
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 16, "Other checkpoints: greedy tokens generated after the prompt.")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Uniform threshold for models without calibrated ones.")
_THRESHOLDS = flags.DEFINE_string("thresholds", None, "Thresholds file (sale_jax.Thresholds.save); default: the "
                                  "retrieval model's calibrated thresholds, or a uniform --tau for other models.")
_SALE = common.SaleFlags.define(backend="auto")
_DTYPE = common.define_dtype("auto", "The model's dtype.")
_DENSE_BELOW = flags.DEFINE_integer("dense_below", 0, "SaleConfig.dense_below: 0 shows SALE at every length; "
                                    "the library's default is the measured crossover of the backend that runs "
                                    "(sale_jax.tuning).", lower_bound=0)
_REPEATS = common.define_repeats(3, "Timed prefills (median reported).")
_SEED = flags.DEFINE_integer("seed", 11, "Seeds the prompts (the retrieval study uses 1, training 0).")
_OUTPUT = common.define_output(required=False)


def _models(sale: sale_jax.SaleConfig, dtype: str) -> tuple[llama.Llama, llama.Llama]:
    if _CHECKPOINT.value == RANDOM:
        config = LlamaConfig.tiny(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=256,
                                  intermediate_size=512, max_position_embeddings=131_072, dtype=dtype)
        dense = llama.Llama(config, nnx.Rngs(0))
    else:
        dense = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype)
    return dense, llama.with_attention(dense, "sale", sale)


def _thresholds(config: LlamaConfig) -> tuple[sale_jax.Thresholds, str]:
    """The thresholds, and where they come from (a file, or a uniform --tau)."""
    path = _THRESHOLDS.value or (RETRIEVAL_THRESHOLDS if _CHECKPOINT.value == RETRIEVAL_MODEL else None)
    if path:
        return sale_jax.Thresholds.load(path, config.num_layers, config.num_heads), os.path.relpath(path)
    return sale_jax.Thresholds.uniform(config.num_layers, config.num_heads, _TAU.value), f"uniform tau {_TAU.value}"


def _answers(digits: np.ndarray) -> list[str]:
    return [bytes(row.tolist()).decode() for row in digits.reshape(-1, digits.shape[-1])]


def retrieval_demo(dense_model, sale_model, thresholds, length: int) -> dict:
    data = retrieval_task.batch((_SEED.value, 0), _SEQUENCES.value, length, _TASK.num_records.value,
                                _TASK.num_queries.value, filler=_TASK.filler.value)
    tokens, positions = jnp.asarray(data.tokens), jnp.asarray(data.query_positions)
    truth = np.asarray(retrieval_scoring.true_answers(tokens, positions))
    dense, _ = retrieval_scoring.answer_predictions(dense_model, tokens, positions)
    sale, density = retrieval_scoring.answer_predictions(sale_model, tokens, positions, thresholds)
    dense, sale = np.asarray(dense), np.asarray(sale)
    # "?KK:" stands in the four tokens before each answer.
    question_positions = (data.query_positions[..., None] - np.arange(4, 0, -1)).reshape(len(data.tokens), -1)
    keys = [bytes(row.tolist()).decode()
            for row in np.take_along_axis(data.tokens, question_positions, axis=1).reshape(-1, 4)]
    print(f"{'question':>9}  {'answer':>6}  {'dense':>6}  {'SALE':>6}")
    for key, want, got_dense, got_sale in zip(keys, *(_answers(d) for d in (truth, dense, sale))):
        marks = ["" if got == want else " x" for got in (got_dense, got_sale)]
        print(f"{key:>9}  {want:>6}  {got_dense + marks[0]:>6}  {got_sale + marks[1]:>6}")
    exact = {name: float((answers == truth).all(-1).mean()) for name, answers in (("dense", dense), ("sale", sale))}
    print(f"exact match                dense {exact['dense']:.3f}, SALE {exact['sale']:.3f} "
          f"({truth.shape[0] * truth.shape[1]} questions); SALE answers as dense on "
          f"{float((dense == sale).all(-1).mean()):.1%}")
    return {"questions": keys, "true_answers": _answers(truth),
            "dense_answers": _answers(dense),
            "sale_answers": _answers(sale),
            "dense_exact_match": exact["dense"], "sale_exact_match": exact["sale"],
            "density_per_layer": np.round(np.asarray(density), 4).tolist(), "tokens": tokens}


def prompt_demo(dense_model, sale_model, thresholds, length: int) -> dict:
    config = dense_model.config
    tokens = jnp.asarray(json_kv_prompt(0, length).tokens % config.vocab_size, jnp.int32)[None]
    lengths = jnp.asarray([tokens.shape[1]])
    dense_logits, _ = llama.prefill(dense_model, tokens, lengths)
    sale_logits, _, density = llama.prefill(sale_model, tokens, lengths, thresholds, return_density=True)
    dense_tokens = llama.generate(dense_model, tokens, lengths, max_new_tokens=_NEW_TOKENS.value)
    sale_tokens = llama.generate(sale_model, tokens, lengths, thresholds, max_new_tokens=_NEW_TOKENS.value)
    summary = {"max_abs_logit_diff": float(jnp.abs(sale_logits - dense_logits).max()),
               "last_position_max_abs_logit_diff": float(jnp.abs(sale_logits[0, -1] - dense_logits[0, -1]).max()),
               "greedy_token_agreement": float(jnp.mean(sale_tokens == dense_tokens)),
               "density_per_layer": np.round(np.asarray(density), 4).tolist(), "tokens": tokens}
    print(f"logits vs dense            max |d| {summary['max_abs_logit_diff']:.4f} "
          f"(last position {summary['last_position_max_abs_logit_diff']:.4f})")
    print(f"greedy tokens agreeing     {summary['greedy_token_agreement']:.2%} of {_NEW_TOKENS.value}")
    return summary


def _warn_if_the_gpu_is_unused() -> None:
    """An NVIDIA driver with a CPU-only jax means the CPU build was installed: say so, rather than run on the CPU
    as if no GPU were there."""
    if jax.default_backend() == "cpu" and (shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia")):
        print("warning: this machine has an NVIDIA GPU, but jax runs on the CPU (its CUDA build is not installed), "
              "so SALE runs its reference, not the GPU kernels. Install the CUDA build with "
              "'bash scripts/setup.sh' (it picks --cuda=13 or --cuda=12 from the driver) or "
              "\"pip install -e '.[cuda13]'\".")


def main(argv):
    del argv
    _warn_if_the_gpu_is_unused()
    dtype = common.resolve_dtype(_DTYPE.value).name
    sale = _SALE.config(dense_below=_DENSE_BELOW.value)
    length = _SEQ_LEN.value or (131_072 if jax.default_backend() == "gpu" else 4096)
    dense_model, sale_model = _models(sale, dtype)
    config = dense_model.config
    thresholds, source = _thresholds(config)
    is_retrieval = _PROMPTS.value == "retrieval" or (_PROMPTS.value is None and _CHECKPOINT.value == RETRIEVAL_MODEL)
    name = os.path.relpath(_CHECKPOINT.value) if os.path.isdir(_CHECKPOINT.value) else _CHECKPOINT.value
    print(f"model {name} ({config.num_layers} layers, {config.num_heads} q / {config.num_kv_heads} kv "
          f"heads, {config.dtype}) on {jax.devices()[0].device_kind}, SALE backend {sale.resolved_backend()}; "
          f"prompts of {length} tokens; thresholds: {source} (recipe {thresholds.recipe_params.get('name', 'none')})")
    demo = retrieval_demo if is_retrieval else prompt_demo
    summary = demo(dense_model, sale_model, thresholds, length)
    tokens = summary.pop("tokens")[:1]
    lengths = jnp.asarray([tokens.shape[1]])
    seconds = interleaved_median_seconds({
        "dense": lambda: llama.prefill(dense_model, tokens, lengths, all_logits=False),
        "sale": lambda: llama.prefill(sale_model, tokens, lengths, thresholds, all_logits=False)},
        _REPEATS.value, warmup=1)
    dense_seconds, sale_seconds = seconds["dense"], seconds["sale"]
    print(f"kept-block density / layer {summary['density_per_layer']} "
          f"(mean {np.mean(summary['density_per_layer']):.3f})")
    print(f"prefill of one prompt      dense {dense_seconds * 1e3:.1f} ms, SALE {sale_seconds * 1e3:.1f} ms "
          f"(x{dense_seconds / sale_seconds:.2f}, median of {_REPEATS.value})")
    if sale.resolved_backend() == "reference":
        print("                           (the reference backend is the algorithm in plain jax.numpy, for "
              "checking answers; SALE's speed comes from the Pallas kernels on a GPU)")
    if _OUTPUT.value:
        results.write(_OUTPUT.value, {
            "model": name, "layers": config.num_layers, "q_heads": config.num_heads,
            "kv_heads": config.num_kv_heads, "dtype": config.dtype, "backend": sale.resolved_backend(),
            "prompt_tokens": length, "thresholds": source, "recipe": thresholds.recipe_params,
            **summary, "dense_prefill_seconds": dense_seconds, "sale_prefill_seconds": sale_seconds}, sale)


if __name__ == "__main__":
    app.run(main)
