"""Properties the spec implies, on fresh random inputs: dense limit, monotonicity, regions, GQA, query chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from sale_jax import tuning
from sale_jax import api
from tests import cases, oracle


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tau_zero_is_dense_attention(rng, dtype):
    case = cases.draw_case(rng)
    q, k, v = cases.draw_qkv(rng, case, dtype)
    out, layout = sale_jax.sale_attention(q, k, v, jnp.zeros(case.q_heads), case.config, return_layout=True)
    assert oracle.keeps_every_visible_block(layout)
    dense = sale_jax.dense_attention(q, k, v)
    atol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(oracle.as_f64(out), oracle.as_f64(dense), atol=atol, rtol=atol)


def test_larger_tau_keeps_a_subset(rng):
    case = cases.draw_case(rng)
    q, k, _ = cases.draw_structured_qkv(rng, case)
    taus = np.sort(np.exp(rng.uniform(np.log(1e-4), np.log(1.0), size=5)))
    masks = [np.asarray(sale_jax.select_blocks(q, k, jnp.full(case.q_heads, t), case.config).to_mask()) for t in taus]
    for looser, tighter in zip(masks, masks[1:]):
        assert not (tighter & ~looser).any()


def test_sink_and_local_blocks_are_always_kept(rng):
    case = cases.draw_case(rng)
    q, k, _ = cases.draw_qkv(rng, case)
    cfg = case.config
    visible, always = oracle.region_blocks(case.q_len, case.kv_len, cfg.block_q, cfg.block_k, cfg.sink_tokens,
                                           cfg.local_tokens)
    # exp(shat - m) / l stays far below 1e30 for unit-scale inputs, so only sink and local blocks remain.
    unreachable = sale_jax.select_blocks(q, k, jnp.full(case.q_heads, 1e30), cfg).to_mask()
    np.testing.assert_array_equal(np.asarray(unreachable), np.broadcast_to(always, unreachable.shape))
    some = sale_jax.select_blocks(q, k, cases.draw_tau(rng, case.q_heads), cfg).to_mask()
    assert np.all(np.asarray(some)[..., always])


def test_gqa_equals_repeated_kv_heads(rng):
    case = cases.draw_case(rng)
    while case.q_heads == case.kv_heads:
        case = cases.draw_case(rng)
    q, k, v = cases.draw_structured_qkv(rng, case)
    tau = cases.draw_tau(rng, case.q_heads)
    group = case.q_heads // case.kv_heads
    k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out, layout = sale_jax.sale_attention(q, k, v, tau, case.config, return_layout=True)
    out_rep, layout_rep = sale_jax.sale_attention(q, k_rep, v_rep, tau, case.config, return_layout=True)
    np.testing.assert_array_equal(np.asarray(layout.to_mask()), np.asarray(layout_rep.to_mask()))
    # Same math; XLA may order the f32 sums differently for the grouped and the repeated shapes.
    np.testing.assert_allclose(out, out_rep, atol=2e-5, rtol=2e-5)


def test_query_chunk_equals_last_rows_of_full_call(rng):
    """With the same kept blocks, a chunk of the last T queries reproduces the last T rows (chunked prefill).
    Selection itself is not chunk-invariant: Q is smoothed by the chunk's own mean (docs/algorithm.md, section 3)."""
    case = cases.draw_case(rng, chunked=False)
    bq = case.config.block_q
    full_blocks = -(-case.kv_len // bq)
    q, k, v = cases.draw_qkv(rng, case)
    tau = cases.draw_tau(rng, case.q_heads)
    out, lse, layout = sale_jax.sale_attention(q, k, v, tau, case.config, return_lse=True, return_layout=True)
    chunk_blocks = int(rng.integers(1, full_blocks + 1))
    q_len = case.kv_len - (full_blocks - chunk_blocks) * bq  # the chunk starts on a query-block boundary
    chunk_grid = sale_jax.BlockGrid(q_len, case.kv_len, bq, case.config.block_k)
    chunk_layout = sale_jax.BlockLayout.from_mask(layout.to_mask()[:, :, -chunk_blocks:], chunk_grid)
    chunk_out, chunk_lse = sale_jax.block_sparse_attention(q[:, -q_len:], k, v, chunk_layout, case.config,
                                                           return_lse=True)
    np.testing.assert_allclose(chunk_out, out[:, -q_len:], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(chunk_lse, lse[..., -q_len:], atol=1e-6, rtol=1e-6)
    dense_chunk = sale_jax.sale_attention(q[:, -q_len:], k, v, jnp.zeros(case.q_heads), case.config)
    dense_full = sale_jax.sale_attention(q, k, v, jnp.zeros(case.q_heads), case.config)
    np.testing.assert_allclose(dense_chunk, dense_full[:, -q_len:], atol=2e-6, rtol=2e-6)


def test_new_thresholds_do_not_recompile(rng):
    case = cases.draw_case(rng)
    q, k, v = cases.draw_qkv(rng, case)
    sale_jax.sale_attention(q, k, v, cases.draw_tau(rng, case.q_heads), case.config)
    compiled = api._sale_attention._cache_size()
    for _ in range(3):
        jax.block_until_ready(sale_jax.sale_attention(q, k, v, cases.draw_tau(rng, case.q_heads), case.config))
    assert api._sale_attention._cache_size() == compiled


@pytest.mark.parametrize("backend, block_q, dense_below, want", [
    ("mosaic_gpu", 128, None, 16384), ("mosaic_gpu", 64, None, 65536), ("triton", 128, None, 65536),
    ("reference", 128, None, tuning.DEFAULT_DENSE_BELOW), ("mosaic_gpu", 128, 4096, 4096),
    ("triton", 64, 0, 0)])
def test_dense_below_defaults_to_the_tuning_tables_crossover(backend, block_q, dense_below, want):
    config = sale_jax.SaleConfig(block_q=block_q, dense_below=dense_below)
    assert config.resolved_dense_below(backend, tuning.HOPPER) == want


def test_default_dense_below_sends_short_keys_to_dense(rng):
    """The default (None) resolves inside `sale_attention`: the reference backend's crossover is far above these
    512 keys, so the call keeps every visible block, where dense_below=0 runs the selection, which at tau 1e30
    keeps only the sink and local blocks (random inputs at tau 0.5 could keep every block)."""
    layouts = {}
    for dense_below in (None, 0):
        config = sale_jax.SaleConfig(block_q=64, block_k=32, backend="reference", dense_below=dense_below)
        case = cases.Case(batch=1, q_len=512, kv_len=512, q_heads=2, kv_heads=1, head_dim=32, config=config)
        q, k, v = cases.draw_qkv(rng, case)
        _, layouts[dense_below] = sale_jax.sale_attention(q, k, v, jnp.full(case.q_heads, 1e30), config,
                                                          return_layout=True)
    assert oracle.keeps_every_visible_block(layouts[None])
    assert float(layouts[0].density()) < 1.0


def test_short_sequences_fall_back_to_dense(rng):
    case = cases.draw_case(rng)
    config = sale_jax.SaleConfig(**{**case.config.to_dict(), "dense_below": case.kv_len + 1})
    q, k, v = cases.draw_qkv(rng, case)
    tau = jnp.full(case.q_heads, 0.5)
    out, lse, layout = sale_jax.sale_attention(q, k, v, tau, config, return_lse=True, return_layout=True)
    assert oracle.keeps_every_visible_block(layout)
    np.testing.assert_allclose(out, sale_jax.dense_attention(q, k, v), atol=2e-5, rtol=2e-5)
    plain = sale_jax.sale_attention(q, k, v, tau, config)
    np.testing.assert_allclose(plain, out, atol=2e-5, rtol=2e-5)
    _, want_lse = oracle.attention(q, k, v, np.asarray(layout.to_mask()), bq=config.block_q, bk=config.block_k,
                                   scale=case.scale)
    np.testing.assert_allclose(lse, want_lse, atol=1e-4, rtol=1e-5)
