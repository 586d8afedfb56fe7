"""Random problem instances for the tests: shapes, configs and inputs drawn from a seeded numpy generator."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import sale_jax


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    config: sale_jax.SaleConfig

    @property
    def scale(self) -> float:
        return self.config.softmax_scale(self.head_dim)


def draw_case(rng: np.random.Generator, *, chunked: bool | None = None, **config_overrides) -> Case:
    """Small random shapes with ragged lengths, GQA, batch, and (when `chunked`) queries at the end of the keys."""
    kv_heads = int(rng.choice([1, 2]))
    config = dict(block_q=int(rng.choice([8, 16])), block_k=int(rng.choice([4, 8, 16])),
                  sink_tokens=int(rng.choice([0, 5, 16])), local_tokens=int(rng.choice([1, 12, 33])),
                  quant_granularity=str(rng.choice(["per_token", "per_block"])), backend="reference", dense_below=0)
    config.update(config_overrides)
    kv_len = int(rng.integers(40, 200))
    chunked = bool(rng.integers(2)) if chunked is None else chunked
    q_len = int(rng.integers(1, kv_len)) if chunked else kv_len
    q_heads = kv_heads * int(rng.choice([1, 2, 3]))
    return Case(batch=int(rng.choice([1, 2])), q_len=q_len, kv_len=kv_len, q_heads=q_heads,
                kv_heads=kv_heads, head_dim=int(rng.choice([16, 32])), config=sale_jax.SaleConfig(**config))


def draw_qkv(rng: np.random.Generator, case: Case, dtype=jnp.float32):
    """Gaussian Q/K/V with a per-head temperature and mean offset, so that rows range from flat to peaked and the
    smoothing has something to remove."""
    def normal(length, heads):
        x = rng.standard_normal((case.batch, length, heads, case.head_dim))
        x *= rng.uniform(0.5, 2.5, size=(1, 1, heads, 1))
        x += rng.standard_normal((1, 1, heads, case.head_dim))
        return jnp.asarray(x, dtype)

    return normal(case.q_len, case.q_heads), normal(case.kv_len, case.kv_heads), normal(case.kv_len, case.kv_heads)


def draw_tau(rng: np.random.Generator, q_heads: int, dense_fraction: float = 0.2,
             streaming_fraction: float = 0.15) -> jnp.ndarray:
    """Per head: 0 (dense) with probability `dense_fraction`, inf (streaming: sink and local blocks only) with
    probability `streaming_fraction`, else log-uniform in [1e-3, 0.2]."""
    tau = np.exp(rng.uniform(np.log(1e-3), np.log(0.2), size=q_heads))
    kind = rng.uniform(size=q_heads)
    tau[kind < dense_fraction] = 0.0
    tau[(kind >= dense_fraction) & (kind < dense_fraction + streaming_fraction)] = np.inf
    return jnp.asarray(tau, jnp.float32)


def draw_structured_qkv(rng: np.random.Generator, case: Case, dtype=jnp.float32, num_needles: int = 3):
    """LLM-like attention in miniature: half the head dims carry rotary position features (scores peak near the
    diagonal and decay with distance), the other half noise, plus a few planted far keys that copy a later
    query's noise (needles). Middle blocks are then mostly cold with a few hot ones."""
    half = case.head_dim // 2
    freqs = 1.0 / (10000 ** (np.arange(half // 2) / (half // 2)))

    def rotary(positions, strength):
        angles = positions[:, None] * freqs[None, :]
        return strength * np.concatenate([np.cos(angles), np.sin(angles)], axis=-1)

    q_pos = np.arange(case.q_len) + case.kv_len - case.q_len
    k_pos = np.arange(case.kv_len)
    q = rng.standard_normal((case.batch, case.q_len, case.q_heads, case.head_dim))
    k = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    q[..., :half] = rotary(q_pos, 2.5)[None, :, None, :]
    k[..., :half] = rotary(k_pos, 2.5)[None, :, None, :]
    group = case.q_heads // case.kv_heads
    for _ in range(num_needles):
        b, row = rng.integers(case.batch), rng.integers(case.q_len)
        key = rng.integers(0, max(q_pos[row] - 1, 1))
        h = rng.integers(case.q_heads)
        k[b, key, h // group, half:] = 2.0 * q[b, row, h, half:]
    v = rng.standard_normal((case.batch, case.kv_len, case.kv_heads, case.head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))
