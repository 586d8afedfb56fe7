"""The Mosaic GPU estimate kernel held to its reference: in Mosaic GPU interpret mode on a CPU, natively on a GPU.

Interpret mode fills fresh buffers, the kernel's output included, with poison (the largest integer), so a flag
the kernel fails to write shows up as neither 0 nor 1. Thresholds sit halfway between two neighbouring block margins,
so no block's margin is near zero and the comparison can be exact.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import sparse_wgmma
from pallas_kernels.mosaic_estimate import estimate_hits
from pallas_kernels.mosaic_estimate_operands import offset_terms
from pallas_kernels.mosaic_estimate_reference import estimate_hits_reference, estimate_margins_reference

INTERPRET = False if jax.default_backend() == "gpu" else plgpu.InterpretGPUParams(uninitialized_memory="nan")
Q_CODES, K_CODES, ROW_FACTOR, ROW_THRESHOLD, K_SCALE, COLUMN_BIAS, MIDDLE_END = range(7)  # estimate_hits' inputs


def draw_inputs(rng, *, batch, q_len, kv_len, q_heads, kv_heads, head_dim, block_q, block_k, middle_start):
    """Random codes and factors, thresholds left to `set_thresholds`; middle ends cover empty, partial-block,
    clipped and full ranges, and with 4 heads or more one head with none (a streaming head)."""
    q_codes = rng.integers(-7, 8, (batch, q_len, q_heads, head_dim), dtype=np.int8)
    k_codes = rng.integers(-7, 8, (batch, kv_len, kv_heads, head_dim), dtype=np.int8)
    row_factor = rng.uniform(0.5, 2.0, (batch, q_heads, q_len)).astype(np.float32)
    k_scale = (rng.uniform(0.5, 1.5, (batch, kv_heads, kv_len)) / np.sqrt(head_dim)).astype(np.float32)
    column_bias = rng.normal(0.0, 1.0, (batch, q_heads, kv_len)).astype(np.float32)
    num_q_blocks = q_len // block_q
    middle_end = rng.integers(0, kv_len + block_k, (q_heads, num_q_blocks))
    for head_ends in middle_end:
        head_ends[rng.permutation(num_q_blocks)[:2]] = [middle_start, kv_len]
    if q_heads >= 4:
        middle_end[rng.integers(1, q_heads)] = 0  # a streaming head: nothing estimated
    return [q_codes, k_codes, row_factor, None, k_scale, column_bias, middle_end.astype(np.int32)]


def set_thresholds(rng, inputs, knobs):
    """Row thresholds: a per-(batch, head) level halfway between two neighbouring block margins, plus per-row jitter;
    about a tenth of the rows at +inf (select nothing) and one row very negative (its q block hits everywhere)."""
    batch, q_heads, q_len = inputs[ROW_FACTOR].shape
    jitter = rng.normal(0.0, 0.5, (batch, q_heads, q_len)).astype(np.float32)
    jitter[rng.random(jitter.shape) < 0.1] = np.inf
    inputs[ROW_THRESHOLD] = jitter
    margins = np.asarray(estimate_margins_reference(*inputs, **knobs))  # max over rows of (score - jitter)
    levels = np.zeros((batch, q_heads), np.float32)
    for b, h in np.ndindex(levels.shape):
        values = np.unique(margins[b, h][np.isfinite(margins[b, h])])
        if len(values) < 2:  # a streaming head: nothing estimated
            continue
        middle = values[len(values) // 4:max(len(values) * 19 // 20, len(values) // 4 + 2)]
        widest = int(np.argmax(np.diff(middle)))
        levels[b, h] = (middle[widest] + middle[widest + 1]) / 2
    threshold = jitter + levels[:, :, None]
    threshold[0, 0, int(rng.integers(q_len))] = -1e30
    inputs[ROW_THRESHOLD] = threshold.astype(np.float32)
    return inputs


CASES = {
    "gqa_bq64_tile128": dict(batch=1, q_len=512, kv_len=512, q_heads=4, kv_heads=2, head_dim=128, block_q=64,
                             tile_k=128, middle_start=64),
    "bq128_d64_longer_keys": dict(batch=1, q_len=256, kv_len=512, q_heads=2, kv_heads=1, head_dim=64, block_q=128,
                                  tile_k=128, middle_start=0),
    "batch2_tile256_odd_sink": dict(batch=2, q_len=256, kv_len=512, q_heads=2, kv_heads=2, head_dim=128,
                                    block_q=64, tile_k=256, middle_start=40),
    "blocks_of_16": dict(batch=1, q_len=256, kv_len=512, q_heads=2, kv_heads=1, head_dim=64, block_q=128,
                         tile_k=128, middle_start=16, block_k=16),  # 8 blocks per chunk: two packed words
    # compute_warpgroups=2: a 128-row q block as two 64-row warpgroups that share the key tiles.
    "split_rows_tile256": dict(batch=1, q_len=384, kv_len=768, q_heads=4, kv_heads=2, head_dim=128, block_q=128,
                               tile_k=256, middle_start=32, compute_warpgroups=2),
    "split_rows_blocks_of_16": dict(batch=2, q_len=256, kv_len=512, q_heads=2, kv_heads=1, head_dim=64,
                                    block_q=128, tile_k=128, middle_start=48, block_k=16, compute_warpgroups=2),
    # Clusters of q heads of one kv head receive the key codes by multicast; one head streams (its cluster still
    # walks the others' tiles). Interpret mode hangs on clusters of 4 (GPU_ONLY_CASES): they run natively only.
    "split_rows_clusters_of_2": dict(batch=1, q_len=256, kv_len=768, q_heads=4, kv_heads=2, head_dim=128,
                                     block_q=128, tile_k=256, middle_start=32, compute_warpgroups=2,
                                     cluster_heads=2),
    "split_rows_clusters_of_4": dict(batch=2, q_len=256, kv_len=512, q_heads=8, kv_heads=2, head_dim=64,
                                     block_q=128, tile_k=128, middle_start=0, compute_warpgroups=2,
                                     cluster_heads=4),
    # Several q heads of one kv head per CTA, sharing each key tile's codes; a streaming head beside estimated ones.
    "heads_per_cta_2": dict(batch=1, q_len=256, kv_len=512, q_heads=8, kv_heads=2, head_dim=64, block_q=128,
                            tile_k=128, middle_start=32, heads_per_cta=2),
    "heads_per_cta_4_bq64_tile256": dict(batch=2, q_len=128, kv_len=512, q_heads=4, kv_heads=1, head_dim=128,
                                         block_q=64, tile_k=256, middle_start=40, heads_per_cta=4),
}
GPU_ONLY_CASES = {"split_rows_clusters_of_4"}


def _case_inputs(rng, name, *, sparse_q=False):
    """(inputs with thresholds set, reference knobs, launch knobs) of `CASES[name]`; with `sparse_q` the q codes
    are pruned to 2:4 before the thresholds are set."""
    case = dict(CASES[name])
    tile_k, block_k = case.pop("tile_k"), case.pop("block_k", 32)
    launch = dict(tile_k=tile_k, compute_warpgroups=case.pop("compute_warpgroups", 1),
                  cluster_heads=case.pop("cluster_heads", 1), heads_per_cta=case.pop("heads_per_cta", 1))
    knobs = dict(block_q=case["block_q"], block_k=block_k, middle_start=case["middle_start"])
    inputs = draw_inputs(rng, **case, block_k=block_k)
    if sparse_q:
        inputs[Q_CODES] = np.asarray(sparse_wgmma.prune(inputs[Q_CODES]))
    return set_thresholds(rng, inputs, knobs), knobs, launch


def _expected_hits(inputs, knobs):
    margins = np.asarray(estimate_margins_reference(*inputs, **knobs))
    want = np.asarray(estimate_hits_reference(*inputs, **knobs))
    estimated = np.isfinite(margins)
    assert np.abs(margins[estimated]).min() > 1e-3, "thresholds too close to a margin for an exact comparison"
    assert 0 < want.sum() < estimated.sum(), "the case should have blocks that hit and blocks that miss"
    return want


def _assert_flags_equal(got, want):
    got = np.asarray(got)
    assert got.shape == want.shape and got.dtype == np.int8
    assert np.isin(got, (0, 1)).all(), f"unwritten or invalid flags: {np.unique(got)}"
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("codes", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.gpu] if name in GPU_ONLY_CASES else [])
                                  for name in CASES])
def test_kernel_hits_equal_reference(rng, name, codes):
    """Natively the warp-level epilogue runs; in interpret mode the array-level one stands in for it."""
    inputs, knobs, launch = _case_inputs(rng, name)
    want = _expected_hits(inputs, knobs)
    inputs[Q_CODES], inputs[K_CODES] = (jnp.asarray(inputs[i], codes) for i in (Q_CODES, K_CODES))
    _assert_flags_equal(estimate_hits(*inputs, **knobs, **launch, interpret=INTERPRET), want)


@pytest.mark.parametrize("name", ["gqa_bq64_tile128", "bq128_d64_longer_keys", "split_rows_tile256",
                                  "split_rows_clusters_of_2", "heads_per_cta_2"])
def test_sparse_q_kernel_hits_equal_reference_on_pruned_codes(rng, name):
    """2:4-compressed q codes: natively the dots run as sparse wgmmas, whose flags must be the reference's on the
    pruned codes (interpret mode estimates the decompressed codes)."""
    inputs, knobs, launch = _case_inputs(rng, name, sparse_q=True)
    want = _expected_hits(inputs, knobs)
    values, positions = sparse_wgmma.compress(jnp.asarray(inputs[Q_CODES], jnp.float8_e4m3fn))
    inputs[K_CODES] = jnp.asarray(inputs[K_CODES], jnp.float8_e4m3fn)
    _assert_flags_equal(estimate_hits(values, *inputs[1:], **knobs, **launch, q_positions=positions,
                                      interpret=INTERPRET), want)


def valid_inputs():
    rng = np.random.default_rng(0)
    inputs = draw_inputs(rng, batch=1, q_len=128, kv_len=256, q_heads=2, kv_heads=1, head_dim=64, block_q=64,
                         block_k=32, middle_start=0)
    inputs[ROW_THRESHOLD] = np.zeros_like(inputs[ROW_FACTOR])
    return inputs, dict(block_q=64, block_k=32, tile_k=128, middle_start=0)


@pytest.mark.parametrize("input_changes, knob_changes, message", [
    ({Q_CODES: lambda x: x.astype(np.float32)}, {}, "must both be int8 or both float8_e4m3fn"),
    ({K_CODES: lambda x: jnp.asarray(x, jnp.float8_e4m3fn)}, {}, "must both be int8 or both float8_e4m3fn"),
    ({ROW_FACTOR: lambda x: x[:, :, :64]}, {}, "row_factor must be float32"),
    ({K_SCALE: lambda x: x.astype(np.float16)}, {}, "k_scale must be float32"),
    ({MIDDLE_END: lambda x: x[:1]}, {}, "middle_end must be int32"),
    ({K_CODES: lambda x: np.concatenate([x] * 3, axis=2)}, {}, "must be a multiple of kv heads"),
    ({K_CODES: lambda x: x[:, :192], K_SCALE: lambda x: x[..., :192], COLUMN_BIAS: lambda x: x[..., :192]}, {},
     "key length 192 must be a multiple of tile_k"),
    ({}, {"block_q": 32}, "block_q must be 64 or 128"),
    ({}, {"tile_k": 512}, "tile_k must be 64, 128 or 256"),
    ({}, {"block_k": 48}, "block_k 48 must be a multiple of 8 that divides tile_k"),
    ({}, {"middle_start": 999}, "middle_start 999 must lie in"),
    ({}, {"compute_warpgroups": 2}, "compute_warpgroups must be 1, or 2 at block_q 128"),
    ({}, {"compute_warpgroups": 3}, "compute_warpgroups must be 1, or 2 at block_q 128"),
    ({}, {"cluster_heads": 2}, "cluster_heads 2 needs compute_warpgroups=2"),
    ({}, {"heads_per_cta": 3}, "heads_per_cta 3 must divide the q heads per kv head, 2"),
    ({}, {"heads_per_cta": 2, "block_q": 128, "compute_warpgroups": 2}, "heads_per_cta 2 needs compute_warpgroups=1"),
])
def test_bad_inputs_raise_value_error(input_changes, knob_changes, message):
    inputs, knobs = valid_inputs()
    for index, change in input_changes.items():
        inputs[index] = change(inputs[index])
    with pytest.raises(ValueError, match=message):
        estimate_hits(*inputs, **knobs | knob_changes, interpret=INTERPRET)


def test_accumulator_too_large_for_registers_is_refused():
    inputs, knobs = valid_inputs()
    inputs[Q_CODES] = np.concatenate([inputs[Q_CODES]] * 2, axis=1)  # 256 rows: two q blocks of 128
    for index in ROW_FACTOR, ROW_THRESHOLD:
        inputs[index] = np.concatenate([inputs[index]] * 2, axis=2)
    with pytest.raises(ValueError, match="accumulator would not fit in registers"):
        estimate_hits(*inputs, **knobs | {"block_q": 128, "tile_k": 256}, interpret=INTERPRET)


@pytest.mark.parametrize("block_q, tile_k, head_dim, codes, compute_warpgroups, heads", [
    (128, 128, 128, jnp.float8_e4m3fn, 1, 1), (64, 128, 128, jnp.float8_e4m3fn, 1, 1), (64, 256, 128, jnp.int8, 1, 1),
    (64, 128, 64, jnp.float8_e4m3fn, 1, 1), (64, 256, 256, jnp.float8_e4m3fn, 1, 1),
    (128, 64, 256, jnp.float8_e4m3fn, 1, 1), (128, 256, 128, jnp.float8_e4m3fn, 2, 1),
    (128, 128, 64, jnp.float8_e4m3fn, 2, 1), (128, 256, 128, jnp.float8_e4m3fn, 2, 2),
    (128, 128, 128, jnp.float8_e4m3fn, 1, 2)])
def test_kernel_lowers_for_hopper(block_q, tile_k, head_dim, codes, compute_warpgroups, heads):
    """Interpret mode skips Mosaic GPU's own lowering (layouts, wgmma operand rules, TMA shapes); exporting for
    CUDA runs it on any machine, everything short of ptxas (it assumes sm_90 when no GPU is present)."""
    batch, length, q_heads, kv_heads = 1, 2048, 4, 2
    shapes = [((batch, length, q_heads, head_dim), codes), ((batch, length, kv_heads, head_dim), codes),
              ((batch, q_heads, length), jnp.float32), ((batch, q_heads, length), jnp.float32),
              ((batch, kv_heads, length), jnp.float32), ((batch, q_heads, length), jnp.float32),
              ((q_heads, length // block_q), jnp.int32)]
    # `heads` q heads share key tiles: as a cluster in the split-rows kernel, in one CTA in the one-warpgroup one.
    sharing = dict(cluster_heads=heads) if compute_warpgroups == 2 else dict(heads_per_cta=heads)
    kernel = jax.jit(functools.partial(estimate_hits, block_q=block_q, block_k=32, tile_k=tile_k, middle_start=128,
                                       compute_warpgroups=compute_warpgroups, **sharing))
    exported = jax.export.export(kernel, platforms=["cuda"])(*(jax.ShapeDtypeStruct(*s) for s in shapes))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("block_q, tile_k, head_dim, compute_warpgroups, heads_per_cta", [
    (128, 128, 128, 1, 1), (64, 256, 128, 1, 1), (64, 128, 256, 1, 1), (128, 256, 128, 2, 1), (128, 128, 64, 2, 1),
    (128, 128, 128, 1, 2)])
def test_sparse_q_kernel_lowers_for_hopper(block_q, tile_k, head_dim, compute_warpgroups, heads_per_cta):
    """The sparse wgmmas are inline PTX: lowering checks their operands and metadata plumbing, ptxas (on a GPU)
    their syntax."""
    batch, length, q_heads, kv_heads = 1, 2048, 4, 2
    shapes = [((batch, length, q_heads, head_dim // 2), jnp.float8_e4m3fn),
              ((batch, length, kv_heads, head_dim), jnp.float8_e4m3fn),
              ((batch, q_heads, length), jnp.float32), ((batch, q_heads, length), jnp.float32),
              ((batch, kv_heads, length), jnp.float32), ((batch, q_heads, length), jnp.float32),
              ((q_heads, length // block_q), jnp.int32), ((batch, length, q_heads, head_dim // 4), jnp.uint8)]

    def kernel(*inputs):
        return estimate_hits(*inputs[:-1], q_positions=inputs[-1], block_q=block_q, block_k=32, tile_k=tile_k,
                             middle_start=128, compute_warpgroups=compute_warpgroups, heads_per_cta=heads_per_cta)

    exported = jax.export.export(jax.jit(kernel), platforms=["cuda"])(*(jax.ShapeDtypeStruct(*s) for s in shapes))
    assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.parametrize("change, message", [
    (lambda values, positions: (values, positions.astype(jnp.int32)), "uint8 positions"),
    (lambda values, positions: (values[..., :16], positions), "2:4-compressed q codes must be values"),
])
def test_bad_compressed_q_codes_raise_value_error(change, message):
    inputs, knobs = valid_inputs()
    codes = jnp.asarray(inputs[Q_CODES], jnp.float8_e4m3fn)
    values, positions = change(*sparse_wgmma.compress(codes))
    inputs[K_CODES] = jnp.asarray(inputs[K_CODES], jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match=message):
        estimate_hits(values, *inputs[1:], **knobs, q_positions=positions, interpret=INTERPRET)


def test_offset_terms_carry_the_offsets_through_tf32(rng):
    """The tensor cores read tf32 (f32 with the low 13 mantissa bits dropped): the hi halves must be exact in it,
    and the three hi/lo products must give the offsets to within 2**-18 of their size even with the lo halves
    truncated too. Interpret mode multiplies in full f32, so this is what stands for the hardware's rounding."""
    batch, q_heads, kv_heads, q_len, kv_len = 1, 4, 2, 64, 96
    row_factor = rng.uniform(0.5, 40.0, (batch, q_heads, q_len)).astype(np.float32)
    row_threshold = rng.normal(0.0, 20.0, (batch, q_heads, q_len)).astype(np.float32)
    row_threshold[0, 0, :2] = [np.inf, -np.inf]  # rows that select nothing / everything
    k_scale = rng.uniform(0.01, 0.2, (batch, kv_heads, kv_len)).astype(np.float32)
    k_scale[..., -3:] = 0.0  # padded keys
    column_bias = rng.normal(0.0, 5.0, (batch, q_heads, kv_len)).astype(np.float32)
    rows, keys = (np.asarray(t) for t in offset_terms(*map(jnp.asarray, (row_factor, row_threshold, k_scale,
                                                                          column_bias))))
    assert rows.shape == (batch, q_heads, q_len, 8) and keys.shape == (batch, q_heads, kv_len, 8)
    assert np.isfinite(rows).all() and np.isfinite(keys).all()
    hi_columns = [0, 1, 3, 4]
    assert not (rows[..., hi_columns].view(np.uint32) & 0x1FFF).any()
    assert not (keys[..., [0, 2, 3, 5]].view(np.uint32) & 0x1FFF).any()
    as_tf32 = lambda x: (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
    got = np.einsum("bhrt,bhct->bhrc", as_tf32(rows), as_tf32(keys))
    scale = np.repeat(k_scale, q_heads // kv_heads, axis=1).astype(np.float64)[:, :, None, :]
    inverse = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0)
    threshold = np.clip(row_threshold, -1e30, 1e30).astype(np.float64)[..., None]
    nudge = 2.0 ** -64  # every offset sits this far below, so an exact zero reads as negative in the sign test
    want = row_factor.astype(np.float64)[..., None] * column_bias[:, :, None, :] * inverse - threshold * inverse - nudge
    size = np.abs(row_factor[..., None] * column_bias[:, :, None, :] * inverse) + np.abs(threshold * inverse)
    finite = np.abs(threshold) < 1e30
    np.testing.assert_array_less(np.abs(got - want)[np.broadcast_to(finite, got.shape)],
                                 (2.0 ** -18 * size + 1e-30)[np.broadcast_to(finite, got.shape)])
    padded = np.broadcast_to(scale == 0, got.shape)
    assert (got[padded] == -nudge).all()
    assert (got[0, 0, 0, :-3] < -1e29).all() and (got[0, 0, 1, :-3] > 1e29).all()
