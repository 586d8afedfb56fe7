"""sale_jax.nn.dot_product_attention: jax.nn.dot_product_attention's arguments and layout, its result where every
block is kept, and a clear refusal of what SALE does not compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax

CONFIG = sale_jax.SaleConfig(block_q=16, block_k=16, sink_tokens=16, local_tokens=16, backend="reference",
                             dense_below=0)


def _qkv(rng, batch=2, length=100, q_heads=4, kv_heads=2, head_dim=32):
    q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
               for heads in (q_heads, kv_heads, kv_heads))
    return q, k, v


@pytest.mark.parametrize("scale", [None, 0.3])
def test_equals_jax_nn_where_every_block_is_kept(rng, scale):
    q, k, v = _qkv(rng)
    with jax.default_matmul_precision("highest"):
        want = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
        got = sale_jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, tau=0.0, config=CONFIG)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_right_padded_batch_equals_jax_nn_with_sequence_lengths(rng):
    q, k, v = _qkv(rng)
    lengths = jnp.asarray([37, 100], jnp.int32)
    with jax.default_matmul_precision("highest"):
        want = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths)
        got = sale_jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                                key_value_seq_lengths=lengths, tau=jnp.zeros(4), config=CONFIG)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert not np.asarray(got[0, 37:]).any()


def test_thresholds_select_as_sale_attention_does(rng):
    q, k, v = _qkv(rng, batch=1, length=256)
    tau = jnp.asarray([0.0, 0.01, 0.1, 1.0])
    got = sale_jax.nn.dot_product_attention(q, k, v, is_causal=True, tau=tau, config=CONFIG)
    np.testing.assert_array_equal(got, sale_jax.sale_attention(q, k, v, tau, CONFIG))


@pytest.mark.parametrize("arguments,message", [
    (dict(is_causal=False), "causal attention only"),
    (dict(bias=jnp.zeros((1, 4, 8, 8))), "does not take bias"),
    (dict(mask=jnp.ones((1, 4, 8, 8), bool)), "does not take mask"),
    (dict(local_window_size=4), "does not take local_window_size"),
    (dict(implementation="cudnn"), "does not take implementation"),
    (dict(return_residual=True), "does not take return_residual"),
    (dict(key_value_seq_lengths=jnp.asarray([8])), "same array as query_seq_lengths"),
    (dict(query_seq_lengths=jnp.asarray([8.0])), "query_seq_lengths must be int"),
    (dict(scale=0.5, config=dataclasses.replace(CONFIG, scale=0.25)), "disagrees"),
])
def test_refuses_what_it_does_not_compute(rng, arguments, message):
    q, k, v = _qkv(rng, batch=1, length=8)
    arguments = {"is_causal": True, "config": CONFIG, **arguments}
    with pytest.raises(ValueError, match=message):
        sale_jax.nn.dot_product_attention(q, k, v, **arguments)


def test_refuses_queries_shorter_than_the_keys(rng):
    q, k, v = _qkv(rng, batch=1, length=32)
    with pytest.raises(ValueError, match="chunked prefill"):
        sale_jax.nn.dot_product_attention(q[:, 16:], k, v, is_causal=True, config=CONFIG)
