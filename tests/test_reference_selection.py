"""The reference selection pass against the float64 oracle written from the spec."""

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from sale_jax.reference import quantize_reference
from tests import cases, oracle


@pytest.mark.parametrize("granularity", ["per_token", "per_block"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantization_matches_oracle(rng, granularity, dtype):
    case = cases.draw_case(rng, quant_granularity=granularity)
    q, k, _ = cases.draw_qkv(rng, case, dtype)
    quant = quantize_reference(q, k, granularity=granularity, block_q=case.config.block_q,
                               block_k=case.config.block_k)
    group = case.q_heads // case.kv_heads
    for b in range(case.batch):
        for h in range(case.q_heads):
            qs, q_error = oracle.smooth(oracle.as_f64(q[b, :, h]))
            ks, k_error = oracle.smooth(oracle.as_f64(k[b, :, h // group]))
            per_block = granularity == "per_block"
            q_codes, q_scale, _, q_tie = oracle.quantize(qs, q_error, case.config.block_q if per_block else None)
            k_codes, k_scale, _, k_tie = oracle.quantize(ks, k_error, case.config.block_k if per_block else None)
            got_q = np.asarray(quant.q_codes[b, :, h], np.float64)
            got_k = np.asarray(quant.k_codes[b, :, h // group], np.float64)
            assert np.all((got_q == q_codes) | q_tie), "q codes differ away from rounding ties"
            assert np.all((got_k == k_codes) | k_tie), "k codes differ away from rounding ties"
            assert np.all(np.abs(got_q - q_codes) <= 1) and np.all(np.abs(got_k - k_codes) <= 1)
            np.testing.assert_allclose(quant.q_scale[b, :, h], q_scale, rtol=1e-5)
            np.testing.assert_allclose(quant.k_scale[b, :, h // group], k_scale, rtol=1e-5)
            column = ks @ oracle.as_f64(q[b, :, h]).mean(0)
            np.testing.assert_allclose(quant.column_bias[b, h], column, rtol=1e-4, atol=1e-4 * np.abs(column).max())


def _check_selection(rng, case, dtype, tau, draw=cases.draw_qkv):
    q, k, _ = draw(rng, case, dtype)
    layout = sale_jax.select_blocks(q, k, tau, case.config)
    got = np.asarray(layout.to_mask())
    cfg = case.config
    surely, maybe = oracle.selection(
        q, k, np.asarray(tau), bq=cfg.block_q, bk=cfg.block_k, sink=cfg.sink_tokens, local=cfg.local_tokens,
        granularity=cfg.quant_granularity, scale=case.scale, dtype_name=jnp.dtype(dtype).name)
    missing, extra = surely & ~got, got & ~maybe
    assert not missing.any(), f"{missing.sum()} blocks the oracle surely keeps were dropped"
    assert not extra.any(), f"{extra.sum()} blocks the oracle surely drops were kept"
    undecided = (maybe & ~surely).sum() / max(maybe.sum(), 1)
    assert undecided < 0.05, f"oracle left {undecided:.1%} of blocks undecided: the test has lost its power"
    np.testing.assert_array_equal(np.asarray(layout.counts), got.sum(-1))
    return surely, maybe


@pytest.mark.parametrize("trial", range(6))
def test_selection_matches_oracle(rng, trial):
    case = cases.draw_case(rng)
    draw = cases.draw_structured_qkv if trial % 2 else cases.draw_qkv
    _check_selection(rng, case, jnp.float32, cases.draw_tau(rng, case.q_heads), draw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_selection_matches_oracle_half_precision(rng, dtype):
    case = cases.draw_case(rng)
    _check_selection(rng, case, dtype, cases.draw_tau(rng, case.q_heads))


def test_selection_default_blocks_selects_some_middle_blocks(rng):
    """Paper block sizes on a longer sequence: the oracle agrees and the middle region is neither all kept nor
    all dropped, so the comparison is not trivially true."""
    config = sale_jax.SaleConfig(block_q=64, block_k=32, dense_below=0, backend="reference")
    case = cases.Case(batch=1, q_len=448, kv_len=480, q_heads=4, kv_heads=2, head_dim=32, config=config)
    surely, maybe = _check_selection(rng, case, jnp.float32, jnp.full((4,), 0.05, jnp.float32),
                                     cases.draw_structured_qkv)
    visible, always = oracle.region_blocks(448, 480, 64, 32, 32, 128)
    middle = visible & ~always
    assert middle.sum() > 0
    kept_middle = maybe[..., middle]
    assert 0 < kept_middle.sum() < kept_middle.size, "expected some but not all middle blocks selected"
