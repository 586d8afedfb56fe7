"""The reference computation pass and the composed `sale_attention` against the float64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from tests import cases, oracle

TOLERANCES = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}  # atol on outputs of unit-scale V


def random_block_mask(rng, case, keep_probability):
    grid = sale_jax.BlockGrid(case.q_len, case.kv_len, case.config.block_q, case.config.block_k)
    shape = (case.batch, case.q_heads, grid.num_q_blocks, grid.num_k_blocks)
    return grid, rng.uniform(size=shape) < keep_probability


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_block_sparse_attention_matches_oracle(rng, dtype):
    case = cases.draw_case(rng)
    q, k, v = cases.draw_qkv(rng, case, dtype)
    grid, mask = random_block_mask(rng, case, keep_probability=rng.uniform(0.2, 0.9))
    layout = sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)
    out, lse = sale_jax.block_sparse_attention(q, k, v, layout, case.config, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (case.batch, case.q_heads, case.q_len)
    want_out, want_lse = oracle.attention(q, k, v, mask & grid.visible_mask, bq=case.config.block_q,
                                          bk=case.config.block_k, scale=case.scale)
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sale_attention_matches_oracle_on_its_own_layout(rng, dtype):
    case = cases.draw_case(rng)
    q, k, v = cases.draw_structured_qkv(rng, case, dtype)
    out, lse, layout = sale_jax.sale_attention(q, k, v, cases.draw_tau(rng, case.q_heads), case.config,
                                               return_lse=True, return_layout=True)
    want_out, want_lse = oracle.attention(q, k, v, np.asarray(layout.to_mask()), bq=case.config.block_q,
                                          bk=case.config.block_k, scale=case.scale)
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])
    np.testing.assert_allclose(lse, want_lse, atol=1e-4 if dtype == jnp.float32 else 2e-2, rtol=1e-5)
