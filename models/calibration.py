"""Calibrating a Llama's SALE thresholds from its own forward passes.

Recipes:
- `"paper"`: the paper's per-head halving search on each layer's per-row L1 error (`sale_jax.calibrate`,
  docs/algorithm.md, section 8).
- `"kl_budget"`: the sparsest thresholds whose model keeps its next-token distribution within `kl_budget` nats
  (mean KL divergence from the dense model over the scored positions: by default the last `score_tokens` of each
  prompt, where a prefill's continuation starts; or the positions a caller names, e.g. where a model was trained to
  answer).
- `"density_budget"`: the thresholds that spend a mean density of `density` where it costs the model least.
The budget recipes price each head's thresholds by the first-order change of the model's loss on its own greedy
predictions (`sale_jax.calibration.costs`); no task labels are used.

The forward passes measured here run the decoder's own layer steps (`DecoderLayer.attention_inputs`,
`Attention.attend`, `DecoderLayer.after_attention`) layer by layer, keeping each layer's post-RoPE `(q, k, v)` and
adding a shift to its head outputs: the model itself carries no calibration arguments (docs/models.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import sale_jax
from models import llama
from models.llama import DecoderLayer, Llama
from sale_jax import calibration

RECIPES = ("paper", "kl_budget", "density_budget")
DEFAULT_SCORE_TOKENS = 256


def attention_inputs(model: Llama, tokens: jax.Array) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Runs a dense forward pass one layer at a time, yielding each layer's post-RoPE `(q, k, v)`: the inputs a
    calibration sees, with every layer fed exact (dense) activations. Only one layer's inputs are alive at a
    time when the caller consumes them as they come."""
    positions = llama.prompt_positions(tokens)
    hidden = _embed(model, tokens)
    for layer in model.layers:
        hidden, qkv = _dense_layer(layer, hidden, positions)
        yield qkv


def scored_log_probs(model: Llama, tokens: jax.Array, scored: jax.Array,
                     thresholds: sale_jax.Thresholds | None = None, head_shifts: list[jax.Array] | None = None):
    """The forward pass the budget recipes measure: f32 log-probabilities `[B, P, V]` of the next token at
    positions `scored: int [P]` of every sequence, and each layer's post-RoPE `(q, k, v)`.

    Attention is SALE at `thresholds` under the model's `SaleConfig`, dense when `thresholds` is None.
    `head_shifts` (per layer, `[B, T, N, H]`) are added to each layer's head outputs before its output projection:
    at zero, their gradient is the loss's sensitivity to each head's output (what the budget recipes weigh
    attention errors by).
    """
    positions = llama.prompt_positions(tokens)
    hidden, qkvs = model.embed_tokens(tokens), []
    for index, layer in enumerate(model.layers):
        tau = None if thresholds is None else thresholds.layer(index)
        shift = None if head_shifts is None else head_shifts[index]
        hidden, qkv = _run_layer(layer, hidden, positions, tau, shift)
        qkvs.append(qkv)
    return jax.nn.log_softmax(model.logits(hidden[:, scored]), axis=-1), qkvs


def _run_layer(layer: DecoderLayer, hidden: jax.Array, positions: jax.Array, tau: jax.Array | None = None,
               head_shift: jax.Array | None = None):
    """One decoder layer as the prefill runs it, with `head_shift` added to its head outputs: the residual stream
    after it, and its `(q, k, v)`."""
    q, k, v = layer.attention_inputs(hidden, positions)
    heads, _ = layer.self_attn.attend(q, k, v, tau)
    if head_shift is not None:
        heads = heads + head_shift.astype(heads.dtype)
    return layer.after_attention(hidden, heads), (q, k, v)


_dense_layer = nnx.jit(_run_layer)  # every layer has the same structure: compiled once


@nnx.jit
def _embed(model: Llama, tokens: jax.Array) -> jax.Array:
    return model.embed_tokens(tokens)


def calibrate_model(model: Llama, prompts: Sequence[jax.Array], recipe: str = "paper", *,
                    theta: float = calibration.DEFAULT_THETA, kl_budget: float = calibration.DEFAULT_KL_BUDGET,
                    density: float = calibration.DEFAULT_DENSITY_BUDGET,
                    score_tokens: int = DEFAULT_SCORE_TOKENS, scored_positions: Sequence | None = None,
                    cost: str = "first_order", model_name: str = "", progress: bool = True,
                    **search) -> sale_jax.Thresholds:
    """Per-layer, per-head thresholds from `prompts` (each int `[T]` or `[1, T]`), with the model's own SALE
    configuration (the one inference runs).

    Args:
      recipe: one of `RECIPES`.
      theta: the paper recipe's per-row L1 bound; `search` passes `tau0` / `tau_min` on to `sale_jax.calibrate`.
      kl_budget: the `"kl_budget"` recipe's bound on the mean KL divergence (nats) from the dense model.
      density: the `"density_budget"` recipe's mean density of kept blocks, in (0, 1].
      score_tokens: the budget recipes score the next-token distribution at each prompt's last this many
        positions (where a prefill's continuation starts).
      scored_positions: instead of the last `score_tokens`, per prompt the positions (int `[P]`, each in
        `[0, T)`) whose next-token distributions are scored: where the model's predictions matter. The targets
        stay the dense model's own predictions, never labels.
      cost: the budget recipes' price of a head's attention error: `"first_order"` (the loss's first-order
        change) or `"l1"` (the paper's per-row L1 error, for comparison).
    """
    config = model.config
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if recipe == "paper":
        samples = [attention_inputs(model, jnp.atleast_2d(jnp.asarray(prompt, jnp.int32))) for prompt in prompts]
        return calibration.calibrate(samples, config.num_layers, config.num_heads, config.sale, theta=theta,
                                     model_name=model_name, progress=progress, **search)
    if search:
        raise ValueError(f"recipe {recipe!r} takes no {sorted(search)}")
    if cost not in calibration.COSTS:
        raise ValueError(f"cost must be one of {calibration.COSTS}, got {cost!r}")
    if recipe == "kl_budget" and not kl_budget > 0:
        raise ValueError(f"kl_budget must be > 0 nats, got {kl_budget}")
    if recipe == "density_budget":
        calibration.check_density_budget(density)
    if not score_tokens >= 1:
        raise ValueError(f"score_tokens must be >= 1, got {score_tokens}")
    prompts = [jnp.atleast_2d(jnp.asarray(prompt, jnp.int32)) for prompt in prompts]
    scored = _scored(prompts, score_tokens, scored_positions)

    sale_model = llama.with_attention(model, "sale", calibration.measured_config(config.sale))
    references, table = _cost_table(sale_model, prompts, scored, cost, progress)

    measured_kl = {}  # by allocation: the search's own measurements, reused for the recipe's record

    def mean_kl(taus):
        key = taus.tobytes()
        if key not in measured_kl:
            thresholds = sale_jax.Thresholds(jnp.asarray(taus))
            measured_kl[key] = float(np.mean([_kl_from_dense(sale_model, tokens, scored, dense, thresholds)
                                              for tokens, scored, dense in references]))
        return measured_kl[key]

    if recipe == "density_budget":
        taus = table.spend(density)
    else:
        bar = tqdm(desc=f"{recipe} search", unit="step", disable=not progress)

        def within_budget(taus):
            value = mean_kl(taus)
            bar.update(1)
            bar.set_postfix(kl=f"{value:.3g}", density=f"{table.mean_density(taus):.3f}")
            return value <= kl_budget

        _, taus = calibration.search_price(table, within_budget)
        bar.close()
    params = {"name": recipe, "cost": cost, "prompts": len(prompts), "calibration_density": table.mean_density(taus),
              **({"scored": "end", "score_tokens": score_tokens} if scored_positions is None else
                 {"scored": "given", "scored_per_prompt": float(np.mean([len(p) for p in scored]))})}
    if recipe == "kl_budget":
        params.update(kl_budget=kl_budget, calibration_kl=mean_kl(taus))
    else:
        params.update(density=density)
    if progress:
        for layer, layer_taus in enumerate(taus):
            print(f"layer {layer:3d}: tau {np.array2string(layer_taus, precision=3)}")
    return sale_jax.Thresholds(jnp.asarray(taus), model_name=model_name, recipe=params, config=config.sale)


def _scored(prompts: list[jax.Array], score_tokens: int, scored_positions: Sequence | None) -> list[jax.Array]:
    """Per prompt, the positions whose next-token distributions the budget recipes score."""
    if scored_positions is None:
        return [jnp.arange(max(tokens.shape[1] - score_tokens, 0), tokens.shape[1]) for tokens in prompts]
    if len(scored_positions) != len(prompts):
        raise ValueError(f"scored_positions names positions for {len(scored_positions)} prompts; there are "
                         f"{len(prompts)}")
    scored = []
    for tokens, positions in zip(prompts, scored_positions):
        positions = np.asarray(positions)
        if positions.ndim != 1 or positions.size == 0 or not np.issubdtype(positions.dtype, np.integer) or (
                positions.min() < 0 or positions.max() >= tokens.shape[1]):
            raise ValueError(f"scored_positions: each prompt's must be a non-empty int [P] within [0, "
                             f"{tokens.shape[1]}), got {positions!r}")
        scored.append(jnp.asarray(positions, jnp.int32))
    return scored


def _cost_table(sale_model: Llama, prompts, scored_positions: list[jax.Array], cost: str, progress: bool):
    """The dense model's scored log-probabilities per prompt, and the heads' cost table averaged over prompts."""
    config = sale_model.config
    shape = (config.num_layers, len(calibration.TAU_GRID), config.num_heads)
    cost_sum, density_sum = np.zeros(shape), np.zeros(shape)
    references = []
    with tqdm(total=len(prompts) * config.num_layers, desc="pricing heads", unit="layer",
              disable=not progress) as bar:
        for tokens, scored in zip(prompts, scored_positions):
            dense, qkvs, grads = _dense_sensitivities(sale_model, tokens, scored)
            references.append((tokens, scored, dense))
            for layer, ((q, k, v), grad) in enumerate(zip(qkvs, grads)):
                layer_cost, layer_density = calibration.head_costs(
                    q, k, v, config.sale, grad if cost == "first_order" else None)
                cost_sum[layer] += layer_cost
                density_sum[layer] += layer_density
                bar.update(1)
    count = len(prompts)
    return references, calibration.CostTable(cost_sum / count, density_sum / count, calibration.TAU_GRID)


@nnx.jit
def _dense_sensitivities(model: Llama, tokens: jax.Array, scored: jax.Array):
    """The dense model's log-probabilities at `scored`, each layer's `(q, k, v)`, and the gradient of its loss on
    its own greedy predictions there (`-sum log p(argmax)`) with respect to each layer's head outputs."""
    batch, length = tokens.shape
    shape = (batch, length, model.config.num_heads, model.config.head_dim)
    shifts = [jnp.zeros(shape, jnp.float32) for _ in range(model.config.num_layers)]

    def log_probs(head_shifts):
        return scored_log_probs(model, tokens, scored, head_shifts=head_shifts)

    log_p, pullback, qkvs = jax.vjp(log_probs, shifts, has_aux=True)
    greedy = jax.nn.one_hot(jnp.argmax(log_p, axis=-1), log_p.shape[-1], dtype=log_p.dtype)
    (grads,) = pullback(-greedy)
    return log_p, qkvs, grads


@nnx.jit
def _kl_from_dense(model: Llama, tokens: jax.Array, scored: jax.Array, dense_log_p: jax.Array,
                   thresholds: sale_jax.Thresholds) -> jax.Array:
    """Mean KL divergence (nats) of the SALE model's next-token distribution from the dense one at `scored`."""
    log_p, _ = scored_log_probs(model, tokens, scored, thresholds)
    return jnp.mean(jnp.sum(jnp.exp(dense_log_p) * (dense_log_p - log_p), axis=-1))
