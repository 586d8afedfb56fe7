"""SALE and the Llama prefill on a device mesh equal their single-device results (4 host devices on a CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sale_jax
from sale_jax import sharding
from tests import cases

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (CPU runs force 4 host devices)")


def _mesh(data, model):
    from models.sharding import make_mesh
    return make_mesh(data, model, devices=jax.devices()[:data * model])


def _sharded_inputs(rng, mesh):
    config = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=32, backend="reference")
    case = cases.Case(batch=2 * mesh.shape["data"], q_len=150, kv_len=200, q_heads=2 * 2 * mesh.shape["model"],
                      kv_heads=2 * mesh.shape["model"], head_dim=32, config=config)
    q, k, v = cases.draw_structured_qkv(rng, case)
    tau = cases.draw_tau(rng, case.q_heads)
    rows = NamedSharding(mesh, P("data", None, "model", None))
    placed = [jax.device_put(x, rows) for x in (q, k, v)]
    return case, (q, k, v, tau), (*placed, jax.device_put(tau, NamedSharding(mesh, P("model"))))


@pytest.mark.parametrize("data,model", [(2, 2), (1, 4), (4, 1)])
def test_sharded_sale_equals_single_device(rng, data, model):
    mesh = _mesh(data, model)
    case, (q, k, v, tau), (qs, ks, vs, taus) = _sharded_inputs(rng, mesh)
    want_out, want_lse, want_layout = sale_jax.sale_attention(q, k, v, tau, case.config, return_lse=True,
                                                              return_layout=True)
    out, lse, layout = sharding.sale_attention(qs, ks, vs, taus, case.config, mesh=mesh, return_lse=True,
                                               return_layout=True)
    assert out.sharding.spec == P("data", None, "model", None)  # stays sharded: nothing was gathered
    np.testing.assert_array_equal(np.asarray(layout.indices), np.asarray(want_layout.indices))
    np.testing.assert_allclose(out, want_out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-6, rtol=1e-6)
    selected = sharding.select_blocks(qs, ks, taus, case.config, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(selected.counts), np.asarray(want_layout.counts))
    attended = sharding.block_sparse_attention(qs, ks, vs, selected, case.config, mesh=mesh)
    np.testing.assert_allclose(attended, want_out, atol=1e-6, rtol=1e-6)
    dense = sharding.dense_attention(qs, ks, vs, mesh=mesh)
    np.testing.assert_allclose(dense, sale_jax.dense_attention(q, k, v), atol=1e-6, rtol=1e-6)


def test_sharded_sale_in_query_chunks_equals_single_device(rng):
    mesh = _mesh(2, 2)
    case, (q, k, v, tau), (qs, ks, vs, taus) = _sharded_inputs(rng, mesh)
    config = dataclasses.replace(case.config, query_chunk=64)  # 150 queries: chunks of 64, 64 and 22
    want_out, want_layout = sale_jax.sale_attention(q, k, v, tau, config, return_layout=True)
    out, layout = sharding.sale_attention(qs, ks, vs, taus, config, mesh=mesh, return_layout=True)
    assert isinstance(layout, sale_jax.ChunkedLayout) and len(layout.chunks) == 3
    for got, want in zip(layout.chunks, want_layout.chunks):
        np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_allclose(out, want_out, atol=1e-6, rtol=1e-6)


def test_unshardable_shapes_are_rejected(rng):
    mesh = _mesh(2, 2)
    config = sale_jax.SaleConfig(dense_below=0, backend="reference")
    q = jnp.ones((2, 64, 6, 32))
    k = jnp.ones((2, 64, 3, 32))
    with pytest.raises(ValueError, match="kv heads \\(3\\) are not divisible"):
        sharding.sale_attention(q, k, k, jnp.zeros(6), config, mesh=mesh)
    with pytest.raises(ValueError, match="batch 3 is not divisible"):
        sharding.sale_attention(jnp.ones((3, 64, 4, 32)), jnp.ones((3, 64, 2, 32)), jnp.ones((3, 64, 2, 32)),
                                jnp.zeros(4), config, mesh=mesh)
    with pytest.raises(ValueError, match="not 'heads'"):
        sharding.sale_attention(q, q, q, jnp.zeros(6), config, mesh=mesh, head_axis="heads")


@pytest.mark.parametrize("attention", ["dense", "sale"])
def test_tensor_and_data_parallel_llama_equals_single_device(rng, attention):
    import os
    from models import checkpoint, llama
    from models.sharding import shard_batch, shard_llama
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_llama")
    sale = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=16, backend="reference")
    model = llama.with_attention(checkpoint.load_llama(fixture, dtype="float32"), attention, sale)
    thresholds = sale_jax.Thresholds.uniform(2, 4, 0.02) if attention == "sale" else None
    tokens = jnp.asarray(rng.integers(0, 256, size=(2, 96)), jnp.int32)
    lengths = jnp.asarray([96, 70])
    want, _ = llama.prefill(model, tokens, lengths, thresholds)
    want_tokens = llama.generate(model, tokens, lengths, thresholds, max_new_tokens=4)

    mesh = _mesh(2, 2)
    sharded = shard_llama(model, mesh)
    q_kernel = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == P(None, "model")  # column-parallel
    assert sharded.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("model", None)  # row-parallel
    got, _ = llama.prefill(sharded, shard_batch(tokens, mesh), shard_batch(lengths, mesh), thresholds)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    got_tokens = llama.generate(sharded, shard_batch(tokens, mesh), shard_batch(lengths, mesh), thresholds,
                                max_new_tokens=4)
    np.testing.assert_array_equal(got_tokens, want_tokens)
