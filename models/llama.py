"""Llama 3.x in Flax NNX, with the prefill attention chosen by `LlamaConfig.attention` ("dense" or "sale"). The same
decoder runs the Llama-shaped Qwen2/Qwen2.5 (q/k/v biases), Qwen3 (q/k norms) and Mistral (`models.config.FAMILIES`).

Einsum letters: B batch, T query positions, S key positions, D model dim, N q heads, K kv heads, G q heads per kv
head, H head dim, V vocabulary. Prefill runs the whole prompt through dense or SALE attention and returns the KV
cache; decoding continues one token at a time with dense attention over the cache. Batches of prompts of different
lengths are right-padded: causal attention keeps real tokens from ever seeing the padding, and each sequence's
cache is read and extended at its own length.

A decoder layer is three steps: `DecoderLayer.attention_inputs` (norm, projections, RoPE), `Attention.attend`
(attention over the prompt) and `DecoderLayer.after_attention` (output projection, MLP, residuals). The prefill
composes them; threshold calibration (`models.calibration`) composes the same steps, reading each layer's
`(q, k, v)` and perturbing its head outputs between them, so the decoder carries no calibration arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import sale_jax
from models.config import LlamaConfig
from sale_jax import sharding
from models.rope import apply_rope, inverse_frequencies


class KVCache(NamedTuple):
    keys: jax.Array  # [L, B, S_max, K, H]
    values: jax.Array  # [L, B, S_max, K, H]
    lengths: jax.Array  # int32 [B]: tokens held per sequence (the next token's position)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def _linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.config = config
        bias = config.qkv_bias
        self.q_proj = _linear(config.hidden_size, config.num_heads * config.head_dim, dtype, rngs, bias)
        self.k_proj = _linear(config.hidden_size, config.num_kv_heads * config.head_dim, dtype, rngs, bias)
        self.v_proj = _linear(config.hidden_size, config.num_kv_heads * config.head_dim, dtype, rngs, bias)
        self.o_proj = _linear(config.num_heads * config.head_dim, config.hidden_size, dtype, rngs)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None

    def project(self, x: jax.Array, positions: jax.Array):
        """Post-RoPE `q [B, T, N, H]`, `k, v [B, T, K, H]` of the normed residual stream `x [B, T, D]`."""
        batch, length, _ = x.shape
        c = self.config
        q = self.q_proj(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        if c.qk_norm:  # Qwen3: each head's q and k normalized before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, tau: jax.Array | None):
        """Causal attention over the prompt: SALE with thresholds `tau [N]`, dense when `tau` is None. Returns the
        heads' outputs `[B, T, N, H]` and the density of kept blocks (1 for dense)."""
        mesh = self.config.mesh
        if tau is None:
            dense = sale_jax.dense_attention(q, k, v) if mesh is None else sharding.dense_attention(q, k, v, mesh=mesh)
            return dense, jnp.float32(1.0)
        if mesh is None:
            out, layout = sale_jax.nn.dot_product_attention(q, k, v, is_causal=True, tau=tau, config=self.config.sale,
                                                            return_layout=True)
        else:
            out, layout = sharding.sale_attention(q, k, v, tau, self.config.sale, mesh=mesh, return_layout=True)
        return out, layout.density()

    def output(self, heads: jax.Array) -> jax.Array:
        """The output projection of the heads' outputs `[B, T, N, H]`: `[B, T, D]`."""
        return self.o_proj(heads.reshape(*heads.shape[:2], -1))

    def decode(self, x: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array):
        """One new token per sequence (`x: [B, 1, D]`) at position `lengths`; dense attention over the cache. Returns
        the heads' outputs `[B, 1, N, H]` and the cache's keys and values with the token's written in."""
        c = self.config
        q, k, v = self.project(x, lengths[:, None])
        batch_index = jnp.arange(x.shape[0])
        keys = keys.at[batch_index, lengths].set(k[:, 0])
        values = values.at[batch_index, lengths].set(v[:, 0])
        group = c.num_heads // c.num_kv_heads
        grouped = q[:, 0].reshape(x.shape[0], c.num_kv_heads, group, c.head_dim)
        scores = jnp.einsum("BKGH,BSKH->BKGS", grouped, keys, preferred_element_type=jnp.float32)
        scores = scores * c.head_dim ** -0.5
        visible = jnp.arange(keys.shape[1])[None, :] <= lengths[:, None]  # [B, S]
        weights = jax.nn.softmax(jnp.where(visible[:, None, None, :], scores, -jnp.inf), axis=-1)
        out = jnp.einsum("BKGS,BSKH->BKGH", weights.astype(values.dtype), values)
        return out.reshape(x.shape[0], 1, c.num_heads, c.head_dim), keys, values


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, rngs)

    def attention_inputs(self, x: jax.Array, positions: jax.Array):
        """This layer's post-RoPE `(q, k, v)` for the residual stream `x [B, T, D]` before it."""
        return self.self_attn.project(self.input_layernorm(x), positions)

    def after_attention(self, x: jax.Array, heads: jax.Array) -> jax.Array:
        """The residual stream after this layer, from the one before it (`x`) and its attention's head outputs
        (`heads [B, T, N, H]`): the output projection, then the MLP, each added to the stream."""
        x = x + self.self_attn.output(heads)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x: jax.Array, positions: jax.Array, tau: jax.Array | None):
        """The layer over the prompt (`Attention.attend`); returns the residual stream after it, its post-RoPE
        `(k, v)` for the cache and the density of kept blocks."""
        q, k, v = self.attention_inputs(x, positions)
        heads, density = self.self_attn.attend(q, k, v, tau)
        return self.after_attention(x, heads), (k, v), density

    def decode(self, x, keys, values, lengths):
        heads, keys, values = self.self_attn.decode(self.input_layernorm(x), keys, values, lengths)
        return self.after_attention(x, heads), keys, values


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else _linear(config.hidden_size, config.vocab_size, dtype,
                                                                        rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """f32 next-token logits `[B, T, V]` of the residual stream after the last layer: the final norm, then the
        LM head (the embedding, when tied)."""
        hidden = self.norm(hidden)
        logits = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def _layer_tau(self, thresholds: sale_jax.Thresholds | None, layer: int):
        if self.config.attention != "sale":
            return None
        if thresholds is None:
            raise ValueError("attention='sale' needs thresholds (sale_jax.Thresholds [num_layers, num_heads])")
        thresholds.check_config(self.config.sale)
        return thresholds.layer(layer)

    def prefill(self, tokens: jax.Array, lengths: jax.Array, thresholds: sale_jax.Thresholds | None = None,
                cache_size: int | None = None, return_density: bool = False, all_logits: bool = True):
        """Runs right-padded prompts `tokens: int [B, T]` of `lengths: int [B]`; returns f32 logits `[B, T, V]`
        (or only each sequence's last, `[B, V]`, without `all_logits`: at 64K tokens and a 128K vocabulary the
        full logits alone would be 34 GB) and a cache with room for `cache_size` (default T) positions per
        sequence, and with `return_density` the density of kept blocks per layer (f32 `[L]`, 1 for dense)."""
        batch, length = tokens.shape
        cache_size = length if cache_size is None else cache_size
        if cache_size < length:
            raise ValueError(f"cache_size {cache_size} is smaller than the prompt length {length}")
        positions = prompt_positions(tokens)
        hidden = self.embed_tokens(tokens)
        keys, values, densities = [], [], []
        for index, layer in enumerate(self.layers):
            hidden, (k, v), density = layer.prefill(hidden, positions, self._layer_tau(thresholds, index))
            pad = ((0, 0), (0, cache_size - length), (0, 0), (0, 0))
            keys.append(jnp.pad(k, pad))
            values.append(jnp.pad(v, pad))
            densities.append(density)
        cache = KVCache(jnp.stack(keys), jnp.stack(values), lengths.astype(jnp.int32))
        if not all_logits:
            hidden = hidden[jnp.arange(batch), lengths - 1][:, None]
        logits = self.logits(hidden) if all_logits else self.logits(hidden)[:, 0]
        return (logits, cache, jnp.stack(densities)) if return_density else (logits, cache)

    def train_forward(self, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Dense forward pass over whole sequences `tokens: int [B, T]`, for training: f32 logits `[B, T, V]` and
        the residual stream after each layer (`[B, T, D]` each, for auxiliary losses on what a layer has
        gathered)."""
        positions = prompt_positions(tokens)
        hidden, residuals = self.embed_tokens(tokens), []
        for layer in self.layers:
            hidden, _, _ = layer.prefill(hidden, positions, None)
            residuals.append(hidden)
        return self.logits(hidden), residuals

    def decode(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per sequence (`tokens: int [B]`) at each sequence's own position; returns logits `[B, V]`."""
        hidden = self.embed_tokens(tokens[:, None])
        keys, values = [], []
        for index, layer in enumerate(self.layers):
            hidden, k, v = layer.decode(hidden, cache.keys[index], cache.values[index], cache.lengths)
            keys.append(k)
            values.append(v)
        return self.logits(hidden)[:, 0], KVCache(jnp.stack(keys), jnp.stack(values), cache.lengths + 1)


def prompt_positions(tokens: jax.Array) -> jax.Array:
    """int `[B, T]`: each prompt's token positions, 0 to T - 1."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def with_config(model: Llama, **changes) -> Llama:
    """The same weights (shared, not copied) behind a changed configuration of the same shapes."""
    config = model.config.replace(**changes)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def with_attention(model: Llama, attention: str, sale: sale_jax.SaleConfig | None = None) -> Llama:
    """The same weights behind another attention choice, e.g. a dense model's SALE twin."""
    return with_config(model, attention=attention, sale=sale or model.config.sale)


@nnx.jit(static_argnames=("return_density", "all_logits"))
def prefill(model: Llama, tokens: jax.Array, lengths: jax.Array, thresholds: sale_jax.Thresholds | None = None,
            return_density: bool = False, all_logits: bool = True):
    """Jitted `Llama.prefill` without spare cache room; thresholds are traced (new values do not recompile)."""
    return model.prefill(tokens, lengths, thresholds, return_density=return_density, all_logits=all_logits)


@nnx.jit(static_argnames=("max_new_tokens",))
def generate(model: Llama, tokens: jax.Array, lengths: jax.Array, thresholds: sale_jax.Thresholds | None = None,
             max_new_tokens: int = 16) -> jax.Array:
    """Greedy continuation of right-padded prompts: int32 `[B, max_new_tokens]`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    length = tokens.shape[1]
    last_logits, cache = model.prefill(tokens, lengths, thresholds, cache_size=length + max_new_tokens,
                                       all_logits=False)
    first = jnp.argmax(last_logits, axis=-1).astype(jnp.int32)

    def step(carry, _):
        token, cache = carry
        logits, cache = model.decode(token, cache)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (next_token, cache), next_token

    _, rest = jax.lax.scan(step, (first, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)
