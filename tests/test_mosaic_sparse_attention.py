"""The Mosaic GPU computation pass held to the f64 oracle: in Mosaic GPU interpret mode on a CPU, natively on a GPU.

Interpret mode fills fresh buffers, the kernel's outputs included, with NaN, so an output the kernel fails to write
fails the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import sale_jax
from pallas_kernels.mosaic_sparse_attention import mosaic_block_sparse_attention
from sale_jax import mosaic_gpu_backend, tuning
from sale_jax.ops import pad_axis
from tests import cases, oracle

INTERPRET = False if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams(uninitialized_memory="nan")
OUT_TOLERANCES = {jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def draw_layout(rng, grid, batch, q_heads):
    """A random kept-block mask at a random density, with some rows keeping nothing and some keeping every
    visible block."""
    mask = rng.uniform(size=(batch, q_heads, grid.num_q_blocks, grid.num_k_blocks)) < rng.uniform(0.2, 1)
    rows = mask.reshape(-1, grid.num_k_blocks)
    empty, *full = rng.permutation(len(rows))[:2]
    rows[empty] = False
    rows[full] = True
    return mask & grid.visible_mask


@pytest.mark.parametrize("block_k, head_dim, keys_per_step, stages, dtype", [
    (32, 128, 128, 2, jnp.bfloat16), (16, 64, 128, 3, jnp.float16), (64, 128, 64, 1, jnp.bfloat16),
    (32, 64, 64, 2, jnp.float16), (16, 128, 64, 3, jnp.bfloat16)])
def test_kernel_matches_oracle(rng, block_k, head_dim, keys_per_step, stages, dtype):
    """Natively P reaches the P V wgmma from registers; interpret mode, which models shared-memory wgmma operands
    only, stages it through shared memory."""
    kv_len = int(rng.integers(200, 400))
    q_len = kv_len if rng.integers(2) else int(rng.integers(1, kv_len))  # chunked prefill: queries at the end
    check_against_oracle(rng, q_len, kv_len, dtype=dtype, block_k=block_k, head_dim=head_dim,
                         keys_per_step=keys_per_step, stages=stages)


def test_an_odd_number_of_q_blocks(rng):
    check_against_oracle(rng, 3 * 128 - 10, 420, dtype=jnp.bfloat16, block_k=32, head_dim=64, keys_per_step=64,
                         stages=2)


def check_against_oracle(rng, q_len, kv_len, *, dtype, block_k, head_dim, block_q=128, **knobs):
    kv_heads = int(rng.choice([1, 2]))
    q_heads = kv_heads * int(rng.choice([1, 2]))
    case = cases.Case(batch=int(rng.choice([1, 2])), q_len=q_len, kv_len=kv_len, q_heads=q_heads,
                      kv_heads=kv_heads, head_dim=head_dim,
                      config=sale_jax.SaleConfig(block_q=block_q, block_k=block_k))
    q, k, v = cases.draw_qkv(rng, case, dtype)
    grid = sale_jax.BlockGrid(q_len, kv_len, block_q, block_k)
    mask = draw_layout(rng, grid, case.batch, q_heads)
    layout = sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)

    out, lse = mosaic_block_sparse_attention(
        pad_axis(q, 1, block_q), pad_axis(k, 1, block_k), pad_axis(v, 1, block_k), layout.indices, layout.counts,
        jnp.asarray(grid.row_offsets), q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
        scale=case.scale, **knobs, interpret=INTERPRET)
    out, lse = out[:, :q_len], np.asarray(lse[..., :q_len])
    want_out, want_lse = oracle.attention(q, k, v, mask, bq=block_q, bk=block_k, scale=case.scale)
    tolerance = OUT_TOLERANCES[dtype]
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=tolerance, rtol=tolerance)
    finite = np.isfinite(want_lse)
    assert not finite.all(), "the layout should leave some rows without keys"
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], want_lse[finite], atol=2e-3, rtol=1e-5)


def inputs(dtype=jnp.bfloat16, head_dim=64, q_heads=2, kv_heads=1, length=256, block_q=128, block_k=32):
    grid = sale_jax.BlockGrid(length, length, block_q, block_k)
    q = jnp.zeros((1, length, q_heads, head_dim), dtype)
    k = v = jnp.zeros((1, length, kv_heads, head_dim), dtype)
    layout = sale_jax.BlockLayout.from_mask(jnp.asarray(np.broadcast_to(grid.visible_mask, (1, q_heads)
                                                                         + grid.visible_mask.shape)), grid)
    return [q, k, v, layout.indices, layout.counts, jnp.asarray(grid.row_offsets)], dict(
        q_len=length, kv_len=length, block_q=block_q, block_k=block_k, scale=0.125)


@pytest.mark.parametrize("changes, message", [
    (dict(dtype=jnp.float32), "must share a 16-bit float dtype"),
    (dict(head_dim=32), "head_dim must be one of"),
    (dict(q_heads=3, kv_heads=2), "must be a multiple of kv heads"),
    (dict(block_q=64), "block_q must be 128"),
    (dict(block_k=48), "keys_per_step 128 must be one of"),
])
def test_bad_inputs_raise_value_error(changes, message):
    arrays, knobs = inputs(**changes)
    with pytest.raises(ValueError, match=message):
        mosaic_block_sparse_attention(*arrays, **knobs, interpret=INTERPRET)


@pytest.mark.parametrize("stages", [0, 3])
def test_stages_beyond_shared_memory_are_refused(stages):
    """Three stages of 128-key tiles at head_dim 128 leave too little for Mosaic GPU's barriers and alignment (the
    H200 refused them)."""
    arrays, knobs = inputs(head_dim=128)
    with pytest.raises(ValueError, match="stages must be at least 1 and keep stages"):
        mosaic_block_sparse_attention(*arrays, **knobs, keys_per_step=128, stages=stages, interpret=INTERPRET)


def test_counts_must_match_the_q_blocks():
    arrays, knobs = inputs()
    arrays[4] = arrays[4][..., :-1]
    with pytest.raises(ValueError, match="counts must be"):
        mosaic_block_sparse_attention(*arrays, **knobs, interpret=INTERPRET)


@pytest.mark.parametrize("block_k, head_dim, keys_per_step, stages", [
    (32, 128, 128, 2), (16, 64, 64, 6), (64, 128, 64, 3), (32, 64, 128, 2), (16, 128, 128, 1)])
def test_kernel_lowers_for_hopper(block_k, head_dim, keys_per_step, stages):
    """Interpret mode skips Mosaic GPU's own lowering (layouts, wgmma operand rules, TMA shapes); exporting for
    CUDA runs it on any machine, everything short of ptxas."""
    length, q_heads, kv_heads = 2048, 4, 2
    block_q = 128
    grid = sale_jax.BlockGrid(length, length, block_q, block_k)
    shapes = [((1, length, q_heads, head_dim), jnp.bfloat16), ((1, length, kv_heads, head_dim), jnp.bfloat16),
              ((1, length, kv_heads, head_dim), jnp.bfloat16), ((1, q_heads, grid.num_slots), jnp.int16),
              ((1, q_heads, grid.num_q_blocks), jnp.int32), ((grid.num_q_blocks + 1,), jnp.int32)]
    kernel = jax.jit(functools.partial(mosaic_block_sparse_attention, q_len=length, kv_len=length, block_q=block_q,
                                       block_k=block_k, scale=0.1, keys_per_step=keys_per_step, stages=stages))
    exported = jax.export.export(kernel, platforms=["cuda"])(*(jax.ShapeDtypeStruct(*s) for s in shapes))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("dtype, head_dim, block_q, block_k, fits", [
    (jnp.bfloat16, 128, 128, 32, True), (jnp.float16, 64, 128, 16, True), (jnp.float32, 128, 128, 32, False),
    (jnp.bfloat16, 256, 128, 32, False), (jnp.bfloat16, 128, 128, 256, False), (jnp.bfloat16, 128, 64, 32, False)])
def test_mosaic_gpu_runs_the_computation_where_the_kernel_fits(dtype, head_dim, block_q, block_k, fits):
    """16-bit inputs, head_dim 64 or 128, block_q 128 and blocks that divide a step take the Mosaic kernel; the rest
    (block_q 64 among them, which the kernel is not built for) Triton."""
    q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), dtype)
    config = sale_jax.SaleConfig(block_q=block_q, block_k=block_k)  # "auto": block_k 256 is no mosaic_gpu config
    assert mosaic_gpu_backend.fits_attention(q, config, tuning.HOPPER) == fits
