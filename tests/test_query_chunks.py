"""Long calls in pieces: queries in chunks (`SaleConfig.query_chunk`), and the Mosaic GPU estimate's keys in
launches whose flags fit shared memory (`mosaic_gpu_backend.estimate_key_chunks`). Each piece must keep the blocks
the whole call keeps, and the chunked output must be the whole call's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from sale_jax import api, mosaic_gpu_backend, tuning
from tests import cases

INTERPRET = jax.default_backend() != "gpu"


def _config(backend: str, **overrides) -> sale_jax.SaleConfig:
    return sale_jax.SaleConfig(backend=backend, interpret=INTERPRET and backend != "reference", dense_below=0,
                               **overrides)


def _structured(rng, *, batch, q_len, kv_len, q_heads, kv_heads, head_dim, config):
    case = cases.Case(batch=batch, q_len=q_len, kv_len=kv_len, q_heads=q_heads, kv_heads=kv_heads,
                      head_dim=head_dim, config=config)
    return cases.draw_structured_qkv(rng, case, jnp.bfloat16, num_needles=6)


@pytest.mark.parametrize("backend", ["reference", "triton", "mosaic_gpu"])
def test_query_chunks_keep_the_whole_calls_blocks_and_output(rng, backend):
    # Chunked prefill (200 queries at the end of 520 keys) in chunks of 128: a whole chunk and a ragged one.
    whole = _config(backend, block_q=64, block_k=32)
    chunked = _config(backend, block_q=64, block_k=32, query_chunk=128)
    q, k, v = _structured(rng, batch=1, q_len=200, kv_len=520, q_heads=4, kv_heads=2, head_dim=64, config=whole)
    tau = jnp.asarray([0.01, 0.0, np.inf, 0.002], jnp.float32)

    want_out, want_lse, layout = sale_jax.sale_attention(q, k, v, tau, whole, return_lse=True, return_layout=True)
    got_out, got_lse, pieces = sale_jax.sale_attention(q, k, v, tau, chunked, return_lse=True, return_layout=True)
    np.testing.assert_allclose(np.asarray(got_out, np.float32), np.asarray(want_out, np.float32), atol=1e-2)
    np.testing.assert_allclose(np.asarray(got_lse), np.asarray(want_lse), rtol=1e-5, atol=1e-5)

    # Each chunk's blocks are the whole call's rows for its q blocks, and the densities are the whole call's.
    assert isinstance(pieces, sale_jax.ChunkedLayout) and len(pieces.chunks) == 2
    want_mask = np.asarray(layout.to_mask())
    for start, piece in zip((0, 128), pieces.chunks):
        mask = np.asarray(piece.to_mask())
        rows = slice(start // 64, start // 64 + mask.shape[2])
        np.testing.assert_array_equal(mask, want_mask[:, :, rows, :mask.shape[3]])
        assert not want_mask[:, :, rows, mask.shape[3]:].any()
    np.testing.assert_allclose(float(pieces.density()), float(layout.density()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pieces.density_per_head()), np.asarray(layout.density_per_head()),
                               rtol=1e-6)
    assert 0.1 < float(layout.density()) < 0.9  # kept and skipped blocks both present


def test_automatic_chunks_bound_the_selection():
    config = sale_jax.SaleConfig()
    # The 8B shape: none at 256K, two at 512K, eight at 1M.
    for length, chunks in ((262144, 1), (524288, 2), (1048576, 8)):
        chunk = config.resolved_query_chunk(1, 32, length)
        assert -(-length // chunk) == chunks
        assert chunk % config.block_q == 0
        assert chunk // config.block_q * 32 * (length // config.block_k) <= sale_jax.config.MAX_SELECTION_PAIRS
    assert config.resolved_query_chunk(64, 64, 1 << 24) == config.block_q  # at least one q block
    assert sale_jax.SaleConfig(query_chunk=256).resolved_query_chunk(1, 32, 1 << 20) == 256


def test_chunked_layouts_follow_the_calls_grids(rng):
    config = _config("reference", block_q=16, block_k=16, query_chunk=32)
    q, k, v = _structured(rng, batch=1, q_len=72, kv_len=100, q_heads=2, kv_heads=1, head_dim=32, config=config)
    _, pieces = sale_jax.sale_attention(q, k, v, jnp.full(2, 0.01), config, return_layout=True)
    grids = api.layout_grids(q, k, config)
    assert [piece.grid for piece in pieces.chunks] == grids
    assert [(g.q_len, g.kv_len) for g in grids] == [(32, 60), (32, 92), (8, 100)]
    with pytest.raises(ValueError, match="query_chunk must be a multiple of block_q"):
        sale_jax.SaleConfig(block_q=64, query_chunk=100)


def test_key_chunks_tile_the_padded_keys():
    config = sale_jax.SaleConfig(block_q=128, block_k=32)
    one = mosaic_gpu_backend.EstimateLaunch(compute_warpgroups=1, tile_k=128, max_concurrent_steps=2)
    split = mosaic_gpu_backend.EstimateLaunch(compute_warpgroups=2, tile_k=256, max_concurrent_steps=3)
    assert mosaic_gpu_backend.estimate_key_chunks(1 << 20, config, one) == [(0, 524288), (524288, 1048576)]
    assert len(mosaic_gpu_backend.estimate_key_chunks(1 << 20, config, split)) == 4
    two_heads = mosaic_gpu_backend.EstimateLaunch(compute_warpgroups=1, tile_k=128, max_concurrent_steps=2,
                                                  heads_per_cta=2)
    assert len(mosaic_gpu_backend.estimate_key_chunks(1 << 20, config, two_heads)) == 4  # a row of flags per head
    assert mosaic_gpu_backend.estimate_key_chunks(8192, config, one) == [(0, 8192)]
    assert mosaic_gpu_backend.estimate_key_chunks(12288, config, one, max_k_blocks=128) == [
        (0, 4096), (4096, 8192), (8192, 12288)]


def test_mosaic_estimate_in_key_chunks_keeps_the_same_blocks(rng, monkeypatch):
    # Queries at the end of 12K keys; with 128 flags per launch the estimate runs as three launches of 4096 keys.
    config = _config("mosaic_gpu", block_q=64, block_k=32, sink_tokens=4000)  # the sink ends inside a chunk
    q, k, _ = _structured(rng, batch=1, q_len=128, kv_len=12288, q_heads=2, kv_heads=1, head_dim=64, config=config)
    tau = jnp.asarray([0.01, 0.001], jnp.float32)
    want = np.asarray(mosaic_gpu_backend.select_blocks(q, k, tau, config, tuning.HOPPER).to_mask())
    monkeypatch.setattr(mosaic_gpu_backend, "MAX_K_BLOCKS", 128)
    launch = mosaic_gpu_backend.estimate_launch(k.shape[1], 64, 2, config, tuning.HOPPER)
    assert len(mosaic_gpu_backend.estimate_key_chunks(12288, config, launch, mosaic_gpu_backend.MAX_K_BLOCKS)) == 3
    got = np.asarray(mosaic_gpu_backend.select_blocks(q, k, tau, config, tuning.HOPPER).to_mask())
    np.testing.assert_array_equal(got, want)
    for start, end in ((4096, 8192), (8192, 12288 - 256)):  # middle keys of the second and third launch
        middle = got[..., start // 32:end // 32]
        assert middle.any() and not middle.all()
