"""A training-only linear probe that reads the previous tokens off the residual stream after the first layer; it is
not part of the saved model.

Its loss makes the first layer gather local context at every position. The retrieval model's key match needs it
and never forms without it (docs/retrieval_model.md, "The look-back probe, and why"): answering `?KK:` needs, at
each record's first digit, the key letters two and three tokens back, which the first layer has no reason to
gather until a later layer uses them, and no later layer can use them before they are there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import llama


class LookbackProbe(nnx.Module):
    """One linear map per distance `1..num_tokens`, after a norm."""

    def __init__(self, hidden_size: int, vocab_size: int, num_tokens: int, rngs: nnx.Rngs):
        if num_tokens < 1:
            raise ValueError(f"a look-back probe reads >= 1 previous tokens, got num_tokens={num_tokens}")
        self.num_tokens, self.vocab_size = num_tokens, vocab_size
        self.norm = llama.RMSNorm(hidden_size, 1e-5, jnp.float32)
        self.readout = nnx.Linear(hidden_size, num_tokens * vocab_size, use_bias=False, rngs=rngs)

    def loss(self, residual: jax.Array, tokens: jax.Array) -> jax.Array:
        """Mean cross-entropy of predicting `tokens[t - j]` at every `t >= j`, averaged over `j = 1..num_tokens`."""
        logits = self.readout(self.norm(residual.astype(jnp.float32)))
        logits = logits.reshape(*tokens.shape, self.num_tokens, self.vocab_size)
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[:, back:, back - 1], tokens[:, :-back]).mean()
                  for back in range(1, self.num_tokens + 1)]
        return sum(losses) / self.num_tokens
