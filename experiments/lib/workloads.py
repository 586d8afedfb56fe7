"""Synthetic Q/K/V whose attention looks like a long-context LLM's, for demos, validation and benchmarks.

Real prefill attention (MInference, XAttention, SALE's own figures) is mostly made of: attention sinks (the first
tokens draw mass from every query), local decay (RoPE makes scores peak near the diagonal), vertical stripes (a few
keys many queries attend to), slash lines (fixed relative offsets) and rare far matches (retrieval needles). Each
head here mixes these with its own strengths, so heads range from sharply local to flat, and the density that a
threshold keeps is realistic rather than all-or-nothing as with i.i.d. Gaussian inputs.

Everything is built with RoPE (Llama-3 base 500000): content vectors are drawn before rotation, then Q and K are
rotated by their positions, so relative position shapes the scores the way it does in a model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ROPE_BASE = 500_000.0
KEY_NOISE = 0.5  # std of the content-free part of keys: the spread of scores outside any structure


class Workload(NamedTuple):
    q: jax.Array  # [B, T, Hq, D]
    k: jax.Array  # [B, S, Hkv, D]
    v: jax.Array  # [B, S, Hkv, D]
    needle_rows: jax.Array  # int32 [B, Hq, N]: query row of each planted needle
    needle_keys: jax.Array  # int32 [B, Hq, N]: the far key it matches


def rotate(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
    """Rotary embedding (half-split layout) of `x: [B, L, H, D]` at `positions` broadcastable to `[B, L, H]`
    (a `[L]` vector is taken as the sequence positions)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if positions.ndim == 1:
        positions = positions[None, :, None]
    angles = positions.astype(jnp.float32)[..., None] * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _low_frequency_unit(key, shape, head_dim):
    """Random unit vectors in the slowest-rotating dims, so they keep their alignment across 100K+ tokens."""
    half, slow = head_dim // 2, max(head_dim // 16, 1)
    x = jax.random.normal(key, shape + (head_dim,))
    keep = (jnp.arange(head_dim) % half) >= half - slow
    x = jnp.where(keep, x, 0.0)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def llm_like_qkv(seed: int, batch: int, kv_len: int, q_heads: int, kv_heads: int, head_dim: int,
                 q_len: int | None = None, dtype=jnp.bfloat16, num_needles: int = 4, num_stripes: int = 8,
                 sink_tokens: int = 4, head_seed: int | None = None) -> Workload:
    """Draws one workload; the queries are the last `q_len` (default all) of the `kv_len` positions.

    `head_seed` (default: `seed`) fixes what each head is, its mix of sink, local, stripe and slash strengths and
    directions, as a model's weights would; `seed` draws the sample: the noise, stripe positions, needles and
    values. Samples with one `head_seed` and different `seed`s are like different prompts to the same model,
    which is what calibration needs to transfer from its samples to new inputs.
    """
    q_len = kv_len if q_len is None else q_len
    if num_needles and kv_len < 4 * (sink_tokens + 1):
        raise ValueError(f"kv_len={kv_len} is too short for needles (need >= {4 * (sink_tokens + 1)}); "
                         "pass num_needles=0")
    if num_needles and kv_len - min(1024, kv_len // 4) <= sink_tokens:
        raise ValueError(f"no query position of kv_len={kv_len} has a far key for a needle; pass num_needles=0")
    head_seed = seed if head_seed is None else head_seed
    return _llm_like_qkv(jax.random.key(seed), jax.random.key(head_seed), batch, kv_len, q_heads, kv_heads,
                         head_dim, q_len, jnp.dtype(dtype), num_needles, num_stripes, sink_tokens)


def _distinct_per_kv_head(needle_keys, far_limit, sink_tokens, kv_heads):
    """Moves a needle's key off any key an earlier needle of its KV head took, to the next free position below
    (wrapping to the top of its range `[sink_tokens, far_limit)`). Two needles raising one key would each take
    a third of their rows' attention, not half. Keys stay put where their range has no free position."""
    batch = needle_keys.shape[0]
    if needle_keys.size == 0:
        return needle_keys
    flat = needle_keys.reshape(batch, kv_heads, -1)  # the needles of one KV head's query heads, side by side
    limit = far_limit.reshape(flat.shape)
    needles = jnp.arange(flat.shape[-1])

    def place(i, flat):
        earlier, room, top = needles < i, limit[..., i] - sink_tokens, limit[..., i] - 1

        def clashes(key, tries):
            return jnp.any((flat == key[..., None]) & earlier, axis=-1) & (tries < room)

        def step(state):
            key, tries = state
            busy = clashes(key, tries)
            return jnp.where(busy, jnp.where(key > sink_tokens, key - 1, top), key), tries + busy

        key, _ = jax.lax.while_loop(lambda state: jnp.any(clashes(*state)), step,
                                    (flat[..., i], jnp.zeros_like(room)))
        return flat.at[..., i].set(key)

    return jax.lax.fori_loop(1, flat.shape[-1], place, flat).reshape(needle_keys.shape)


@jax.jit(static_argnums=tuple(range(2, 12)))
def _llm_like_qkv(key, head_key, batch, kv_len, q_heads, kv_heads, head_dim, q_len, dtype, num_needles, num_stripes,
                  sink_tokens):
    keys = iter(jax.random.split(key, 8))
    head_keys = iter(jax.random.split(head_key, 10))
    group = q_heads // kv_heads
    scale = head_dim ** -0.5
    q_pos = jnp.arange(q_len) + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)

    def per_q_head(lo, hi):
        return jax.random.uniform(next(head_keys), (batch, 1, q_heads, 1), minval=lo, maxval=hi)

    def shared_by_group(x):  # [B, 1, Hkv, D] -> [B, 1, Hq, D]
        return jnp.repeat(x, group, axis=2)

    # Local decay: q and k share a content vector, so after RoPE q_i . k_j peaks at i = j and decays with distance.
    local = jax.random.normal(next(head_keys), (batch, 1, kv_heads, head_dim))
    local_q = per_q_head(0.5, 1.2) * shared_by_group(local)
    # Sinks: every query carries a slow direction that the first keys carry strongly.
    sink_dir = _low_frequency_unit(next(head_keys), (batch, 1, kv_heads), head_dim)
    sink_q = per_q_head(0.5, 1.2) * shared_by_group(sink_dir) * jnp.sqrt(head_dim)
    # Vertical stripes: a few keys everywhere in the sequence that queries of a head are drawn to.
    stripe_dir = _low_frequency_unit(next(head_keys), (batch, 1, kv_heads), head_dim)
    stripe_q = per_q_head(0.0, 0.8) * shared_by_group(stripe_dir) * jnp.sqrt(head_dim)
    # Slash lines: a head-specific offset at which q_i . k_{i - offset} peaks.
    offsets = jax.random.randint(next(head_keys), (batch, 1, kv_heads, 1), 64, 4096).astype(jnp.float32)
    slash = jax.random.normal(next(head_keys), (batch, 1, kv_heads, head_dim))
    slash_q = per_q_head(0.0, 0.7) * shared_by_group(slash)

    noise_q = jax.random.normal(next(keys), (batch, q_len, q_heads, head_dim))
    q_pre = noise_q + local_q + sink_q + stripe_q
    q = rotate(q_pre, q_pos) + rotate(jnp.broadcast_to(slash_q, q_pre.shape), q_pos)

    noise_k = KEY_NOISE * jax.random.normal(next(keys), (batch, kv_len, kv_heads, head_dim))
    is_sink = (k_pos < sink_tokens)[None, :, None, None]
    is_stripe = jnp.zeros(kv_len, bool).at[
        jax.random.randint(next(keys), (num_stripes,), 0, kv_len)].set(True)[None, :, None, None]
    k_pre = (noise_k + local + is_sink * 1.2 * sink_dir * jnp.sqrt(head_dim)
             + is_stripe * 0.9 * stripe_dir * jnp.sqrt(head_dim))
    # A key rotated to position p - offset carries the slash content: it lines up with the query at p.
    k = rotate(k_pre, k_pos) + rotate(jnp.broadcast_to(slash, k_pre.shape), k_pos[None, :, None] + offsets[..., 0])

    # Needles: a query row and a far key (past the sinks, at least `far_gap` positions back) raised so that it takes
    # about half of the row's dense attention mass: information that matters and that sink-local statistics cannot
    # see. Needles never touch the sinks, which would change every row's attention.
    far_gap = min(1024, kv_len // 4)
    first_row = max(sink_tokens + far_gap - (kv_len - q_len), 0)
    needle_rows = jax.random.randint(next(keys), (batch, q_heads, num_needles), first_row, q_len)
    far_limit = q_pos[needle_rows] - far_gap
    needle_keys = sink_tokens + (jax.random.uniform(next(keys), needle_rows.shape) * (far_limit - sink_tokens)
                                 ).astype(jnp.int32)
    needle_keys = _distinct_per_kv_head(needle_keys, far_limit, sink_tokens, kv_heads)
    b_idx = jnp.arange(batch)[:, None, None]
    h_idx = jnp.broadcast_to(jnp.arange(q_heads)[None, :, None], needle_rows.shape)
    needle_q = q[b_idx, needle_rows, h_idx]  # [B, Hq, N, D]
    grouped_q = needle_q.reshape(batch, kv_heads, group, num_needles, head_dim)
    row_scores = scale * jnp.einsum("bkgnd,bskd->bkgns", grouped_q, k).reshape(batch, q_heads, num_needles, kv_len)
    visible = k_pos <= q_pos[needle_rows][..., None]
    row_lse = jax.nn.logsumexp(jnp.where(visible, row_scores, -jnp.inf), axis=-1)
    current = jnp.take_along_axis(row_scores, needle_keys[..., None], axis=-1)[..., 0]
    raise_by = jnp.maximum(row_lse - current, 0.0)[..., None]
    # Raise along the row's own part of q (minus the head's mean query), so other rows of the head, which share
    # the mean's sink/stripe/local directions, are barely affected.
    own = needle_q - jnp.mean(q, axis=1)[:, :, None, :]
    k = k.at[b_idx, needle_keys, h_idx // group].add(
        raise_by / scale * own / jnp.sum(needle_q * own, axis=-1, keepdims=True))

    v = jax.random.normal(next(keys), (batch, kv_len, kv_heads, head_dim))
    return Workload(q.astype(dtype), k.astype(dtype), v.astype(dtype), needle_rows, needle_keys)
