"""Scoring a model on the key-value retrieval task (experiments/lib/retrieval_task.py): which answer digits it gets.

Shared by the training script's evaluation and by the dense-vs-SALE study (experiments/accuracy/retrieval_eval.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sale_jax
from experiments.lib import retrieval_task
from models import llama


@nnx.jit
def answer_predictions(model: llama.Llama, tokens: jax.Array, query_positions: jax.Array,
                       thresholds: sale_jax.Thresholds | None = None):
    """int32 `[B, Q, 4]`: the model's argmax at each answer digit given the true digits before it (teacher forcing),
    and the density of kept blocks per layer (f32 `[L]`, 1 for dense attention). `thresholds` are traced: new
    values do not recompile."""
    batch, num_queries = query_positions.shape
    lengths = jnp.full((batch,), tokens.shape[1], jnp.int32)
    logits, _, density = model.prefill(tokens, lengths, thresholds, return_density=True)
    digit_positions = (query_positions[..., None] + jnp.arange(retrieval_task.ANSWER_LENGTH)).reshape(batch, -1)
    # Only the logits that predict answer digits are needed: take them before the argmax over the vocabulary.
    predictions = jnp.argmax(jnp.take_along_axis(logits, digit_positions[..., None] - 1, axis=1), axis=-1)
    return predictions.reshape(batch, num_queries, -1).astype(jnp.int32), density


def answer_hits(model: llama.Llama, tokens: jax.Array, query_positions: jax.Array,
                thresholds: sale_jax.Thresholds | None = None):
    """bool `[B, Q, 4]`: whether each answer digit is predicted right (a query is answered exactly when all 4
    are), and the density of kept blocks per layer (`answer_predictions`)."""
    predictions, density = answer_predictions(model, tokens, query_positions, thresholds)
    return predictions == true_answers(tokens, query_positions), density


def true_answers(tokens: jax.Array, query_positions: jax.Array) -> jax.Array:
    """int32 `[B, Q, 4]`: the answer digits as the sequences hold them."""
    digit_positions = query_positions[..., None] + jnp.arange(retrieval_task.ANSWER_LENGTH)
    batch = tokens.shape[0]
    flat = jnp.take_along_axis(jnp.asarray(tokens), digit_positions.reshape(batch, -1), axis=1)
    return flat.reshape(digit_positions.shape).astype(jnp.int32)


def summarize(hits: np.ndarray) -> dict:
    """Accuracies from `hits [N, Q, 4]`: whole queries (exact match), first digits (the lookup), all digits."""
    return {"exact_match": float(hits.all(axis=-1).mean()), "first_digit_accuracy": float(hits[..., 0].mean()),
            "digit_accuracy": float(hits.mean()), "queries": int(hits.shape[0] * hits.shape[1])}
