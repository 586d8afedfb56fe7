"""One training step: the loss of a batch and an AdamW update, jitted.

The loss is the mean cross-entropy over the answer tokens (`tasks.Example.loss_mask`), plus `filler_loss_weight`
times the mean next-token loss on the filler and `lookback_loss_weight` times the look-back probe's loss. The
metrics beside it: those three losses, and the fractions of answer tokens and of the answers' first tokens alone
predicted right (argmax; the loss is teacher-forced). A retrieval answer's first token is the lookup itself; its
later tokens can be copied from wherever the first came from, so the accuracy over all answer tokens climbs well
before the lookup is learned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.lib.training.lookback_probe import LookbackProbe
from models import llama

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    filler_loss_weight: float = 0.0
    lookback_tokens: int = 3  # the probe reads this many previous tokens; 0: no probe
    lookback_loss_weight: float = 1.0

    def __post_init__(self):
        for name in ("filler_loss_weight", "lookback_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lookback_tokens < 0:
            raise ValueError(f"lookback_tokens must be >= 0 (0: no probe), got {self.lookback_tokens}")


class Trainee(nnx.Module):
    """What training updates: the Llama, and the look-back probe (None without one)."""

    def __init__(self, model: llama.Llama, probe: LookbackProbe | None):
        self.model, self.probe = model, probe

    @classmethod
    def create(cls, model: llama.Llama, loss: LossConfig, seed: int) -> Trainee:
        """The model with a fresh probe if `loss` has one (initialized from `seed + 1`; the model's is `seed`)."""
        probe = None
        if loss.lookback_tokens:
            probe = LookbackProbe(model.config.hidden_size, model.config.vocab_size, loss.lookback_tokens,
                                  nnx.Rngs(seed + 1))
        return cls(model, probe)


def as_computed(model: llama.Llama, compute_dtype: str) -> llama.Llama:
    """The model as it runs. Behind a bfloat16 config the float32 weights are cast to bfloat16 where used (matmuls,
    attention and the residual stream run in bfloat16), and the gradients still come back in float32."""
    return model if compute_dtype == model.config.dtype else llama.with_config(model, dtype=compute_dtype)


def training_loss(trainee: Trainee, tokens: jax.Array, loss_mask: jax.Array, filler_mask: jax.Array,
                  compute_dtype: str, loss: LossConfig):
    """The weighted loss and the metrics of a batch (the module's docstring)."""
    all_logits, residuals = as_computed(trainee.model, compute_dtype).train_forward(tokens)
    logits, targets = all_logits[:, :-1], tokens[:, 1:]
    mask, filler_mask = loss_mask[:, :-1], filler_mask[:, :-1]
    first_tokens = mask * (1 - jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1])  # answer targets after a non-answer one
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = jnp.argmax(logits, axis=-1) == targets
    answer = (losses * mask).sum() / mask.sum()
    filler = (losses * filler_mask).sum() / jnp.maximum(filler_mask.sum(), 1)
    lookback = jnp.float32(0.0) if trainee.probe is None else trainee.probe.loss(residuals[0], tokens)
    metrics = {"loss": answer, "filler_loss": filler, "lookback_loss": lookback,
               "accuracy": (correct * mask).sum() / mask.sum(),
               "first_token_accuracy": (correct * first_tokens).sum() / first_tokens.sum()}
    return answer + loss.filler_loss_weight * filler + loss.lookback_loss_weight * lookback, metrics


@functools.partial(nnx.jit, static_argnames=("compute_dtype", "loss"))
def train_step(trainee: Trainee, optimizer: nnx.Optimizer, tokens: jax.Array, loss_mask: jax.Array,
               filler_mask: jax.Array, compute_dtype: str, loss: LossConfig) -> dict:
    """One AdamW update of `trainee` in place; returns the metrics before it."""
    (_, metrics), grads = nnx.value_and_grad(training_loss, has_aux=True)(
        trainee, tokens, loss_mask, filler_mask, compute_dtype, loss)
    optimizer.update(trainee, grads)
    return metrics
