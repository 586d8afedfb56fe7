"""The Pallas kernels held to the reference: in interpret mode on a CPU, natively when a GPU is present.

Kernel outputs start from poisoned buffers (NaN, out-of-range codes, -1 indices), so an element the kernel fails
to write cannot pass by matching a zero-initialized buffer.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
import sale_jax
import sale_jax.config
from pallas_kernels import mosaic_estimate
from sale_jax import mosaic_gpu_backend, triton_backend, tuning
from sale_jax.ops import pad_axis, smoothing_means
from sale_jax.reference import block_sparse_attention_reference, quantize_reference
from sale_jax.reference.selection import selection_margins_reference
from tests import cases, oracle

INTERPRET = jax.default_backend() != "gpu"
OUT_TOLERANCES = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def draw_kernel_case(rng, **overrides):
    """Shapes the kernels accept: power-of-two head_dim >= 32 and blocks >= 16."""
    fields = dict(block_q=int(rng.choice([16, 32, 64])), block_k=int(rng.choice([16, 32])),
                  sink_tokens=int(rng.choice([0, 16, 40])), local_tokens=int(rng.choice([1, 32, 70])),
                  quant_granularity=str(rng.choice(["per_token", "per_block"])), backend="triton",
                  interpret=INTERPRET)
    fields.update(overrides)
    case = cases.draw_case(rng, **fields)
    kv_len = int(rng.integers(100, 420))
    q_len = kv_len if rng.integers(2) else int(rng.integers(1, kv_len))
    return cases.Case(batch=case.batch, q_len=q_len, kv_len=kv_len, q_heads=case.q_heads, kv_heads=case.kv_heads,
                      head_dim=int(rng.choice([32, 64])), config=case.config)


def poisoned(shape, dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(shape, jnp.nan, dtype)
    return jnp.full(shape, -1 if dtype != jnp.int8 else 99, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("granularity", ["per_token", "per_block"])
def test_quantize_kernel_equals_reference(rng, dtype, granularity):
    case = draw_kernel_case(rng, quant_granularity=granularity)
    q, k, _ = cases.draw_qkv(rng, case, dtype)
    cfg = case.config
    want = quantize_reference(q, k, granularity=granularity, block_q=cfg.block_q, block_k=cfg.block_k)
    q_mean, k_mean = smoothing_means(q, k)
    for x, mean, tile, codes, scale, smooth in (
            (q, q_mean, cfg.block_q, want.q_codes, want.q_scale, None),
            (k, k_mean, cfg.block_k, want.k_codes, want.k_scale, want.k_smooth)):
        rows = pad_axis(x, 1, tile)
        batch, padded, heads, _ = rows.shape
        initial = [poisoned(rows.shape, jnp.int8), poisoned((batch, heads, padded), jnp.float32)]
        if smooth is not None:
            initial.append(poisoned(rows.shape, dtype))
        got = pallas_kernels.quantize_rows(
            rows, mean[:, 0], length=x.shape[1], tile=tile, per_tile_scale=granularity == "per_block",
            return_smooth=smooth is not None, interpret=INTERPRET, initial_outputs=initial)
        length = x.shape[1]
        np.testing.assert_array_equal(got[0][:, :length], codes)
        np.testing.assert_array_equal(got[1][..., :length], scale.transpose(0, 2, 1))
        assert np.all(np.asarray(got[0][:, length:]) == 0) and np.all(np.isfinite(np.asarray(got[1])))
        if smooth is not None:
            np.testing.assert_array_equal(got[2][:, :length], smooth)


def _kernel_layout(q, k, tau, config):
    """The selection kernels' layout, from poisoned buffers, through the same glue the API uses."""
    grid = sale_jax.BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)
    lists = [poisoned((q.shape[0], q.shape[2], grid.num_slots), grid.index_dtype()),
             poisoned((q.shape[0], q.shape[2], grid.num_q_blocks), jnp.int32)]
    thresholds = [poisoned((q.shape[0], q.shape[2], grid.num_q_blocks * config.block_q), jnp.float32)]
    poisoned_kernels = {"select_blocks": lists, "compact_hits": lists, "row_thresholds": thresholds}
    originals = {name: getattr(pallas_kernels, name) for name in poisoned_kernels}

    def with_poison(name):
        return lambda *args, **kwargs: originals[name](*args, **kwargs, initial_outputs=poisoned_kernels[name])

    for name in poisoned_kernels:
        setattr(pallas_kernels, name, with_poison(name))
    try:
        backend = mosaic_gpu_backend if config.backend == "mosaic_gpu" else triton_backend
        return backend.select_blocks(q, k, jnp.asarray(tau, jnp.float32), config, tuning.for_backend(config.backend))
    finally:
        for name, original in originals.items():
            setattr(pallas_kernels, name, original)


@pytest.mark.parametrize("trial", range(3))
def test_selection_kernel_matches_reference_and_oracle(rng, trial):
    case = draw_kernel_case(rng)
    # MHA in the first trial, GQA (2 or 3 q heads per kv head) in the others.
    case = dataclasses.replace(case, q_heads=case.kv_heads * (1 if trial == 0 else int(rng.choice([2, 3]))))
    dtype = [jnp.float32, jnp.bfloat16, jnp.float16][trial]
    q, k, _ = cases.draw_structured_qkv(rng, case, dtype)
    _check_selection_kernel(case, q, k, cases.draw_tau(rng, case.q_heads))


def test_selection_kernel_middle_off_the_estimate_tile(rng):
    """Middle keys start at 16, off the 128-key estimate tile, and the keys pad to 384: a tile walk that starts at
    the middle would run past the padded keys in its last tile (in interpret mode, a clamped slice that shifts
    block 16's keys onto block 17). A needle in block 16 for the last query rows makes such a shift visible."""
    config = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=16, sink_tokens=16, local_tokens=70,
                                 backend="triton", interpret=INTERPRET)
    case = cases.Case(batch=1, q_len=370, kv_len=370, q_heads=2, kv_heads=1, head_dim=32, config=config)
    q, k, _ = cases.draw_structured_qkv(rng, case, jnp.float32)
    needle = 4.0 * q[:, 368:370].mean(axis=(1, 2))
    k = k.at[:, 256:272].set(needle[:, None, None, :])
    _check_selection_kernel(case, q, k, jnp.full((2,), 0.05, jnp.float32))


def _check_selection_kernel(case, q, k, tau):
    dtype = jnp.dtype(q.dtype).name
    layout = _kernel_layout(q, k, tau, case.config)
    grid = layout.grid
    indices, counts = np.asarray(layout.indices).astype(np.int64), np.asarray(layout.counts)
    mask = np.asarray(layout.to_mask())
    # Packed format: every slot written, ascending kept ids, the tail repeating the last one.
    np.testing.assert_array_equal(counts, mask.sum(-1))
    for b, h, row in np.ndindex(*counts.shape):
        slots = indices[b, h, grid.row_offsets[row]:grid.row_offsets[row + 1]]
        kept = np.flatnonzero(mask[b, h, row])
        np.testing.assert_array_equal(slots[:len(kept)], kept)
        assert np.all(slots[len(kept):] == grid.visible_counts[row] - 1)
    cfg = case.config
    reference_config = sale_jax.SaleConfig(**{**cfg.to_dict(), "backend": "reference", "interpret": False})
    want = np.asarray(sale_jax.select_blocks(q, k, tau, reference_config).to_mask())
    surely, maybe = oracle.selection(
        q, k, np.asarray(tau), bq=cfg.block_q, bk=cfg.block_k, sink=cfg.sink_tokens, local=cfg.local_tokens,
        granularity=cfg.quant_granularity, scale=case.scale, dtype_name=dtype)
    _, margins = selection_margins_reference(q, k, tau, reference_config)
    for name, wrong in (("dropped blocks the oracle surely keeps", surely & ~mask),
                        ("kept blocks the oracle surely drops", mask & ~maybe)):
        assert not wrong.any(), (f"kernel {name}: {np.argwhere(wrong)[:5]}, "
                                 f"reference margins {np.asarray(margins)[wrong][:5]}")
    # Where kernel and reference disagree, the block's best estimate is within the rounding margin of the
    # threshold (the oracle cannot decide it either).
    undecided = maybe & ~surely
    assert np.all(undecided[mask != want]), f"{(mask != want).sum()} blocks differ from the reference"


def draw_mosaic_case(rng):
    """A case for backend='mosaic_gpu': block_q 64 or 128, head_dim 64 or 128."""
    case = draw_kernel_case(rng, backend="mosaic_gpu", block_q=int(rng.choice([64, 128])))
    return dataclasses.replace(case, head_dim=int(rng.choice([64, 128])))


@pytest.mark.parametrize("trial", range(2))
def test_mosaic_selection_matches_reference_and_oracle(rng, trial):
    """Row thresholds (Triton), the Mosaic GPU estimate (interpret mode on a CPU) and the compaction (Triton)."""
    case = draw_mosaic_case(rng)
    case = dataclasses.replace(case, q_heads=case.kv_heads * (1 if trial == 0 else int(rng.choice([2, 3]))))
    q, k, _ = cases.draw_structured_qkv(rng, case, [jnp.float32, jnp.bfloat16][trial])
    _check_selection_kernel(case, q, k, cases.draw_tau(rng, case.q_heads))


def test_mosaic_selection_through_the_split_rows_estimate(rng, monkeypatch):
    """block_q 128 routed through the split-rows estimate (two 64-row warpgroups, 256-key tiles), as long keys
    are (here from 0 keys on)."""
    monkeypatch.setattr(tuning, "HOPPER", dataclasses.replace(tuning.HOPPER, mosaic_split_rows_from=0))
    launches = []
    estimate_hits = pallas_kernels.estimate_hits
    monkeypatch.setattr(pallas_kernels, "estimate_hits",
                        lambda *args, **knobs: launches.append(knobs) or estimate_hits(*args, **knobs))
    config = sale_jax.SaleConfig(block_q=128, block_k=16, sink_tokens=16, local_tokens=32, dense_below=0,
                                 backend="mosaic_gpu", interpret=INTERPRET)
    case = cases.Case(batch=1, q_len=448, kv_len=512, q_heads=2, kv_heads=1, head_dim=64, config=config)
    q, k, _ = cases.draw_structured_qkv(rng, case, jnp.bfloat16)
    _check_selection_kernel(case, q, k, cases.draw_tau(rng, case.q_heads))
    [knobs] = launches
    assert (knobs["compute_warpgroups"], knobs["tile_k"], knobs["max_concurrent_steps"]) == (
        2, 256, tuning.HOPPER.mosaic_split_rows_stages)


def _draw_estimated_case(rng, attempts=100):
    """A Mosaic case with two q heads per kv head and thresholds under which the estimate decides some block: a
    visible middle block and a head whose tau is neither 0 (dense) nor inf (streaming). Without one, nothing the
    estimate computes reaches the layout and the case checks nothing."""
    for _ in range(attempts):
        case = draw_mosaic_case(rng)
        case = dataclasses.replace(case, q_heads=2 * case.kv_heads)
        tau = cases.draw_tau(rng, case.q_heads)
        grid = sale_jax.BlockGrid(case.q_len, case.kv_len, case.config.block_q, case.config.block_k)
        has_middle = grid.regions(case.config.sink_tokens, case.config.local_tokens).middle.any()
        if has_middle and np.any((tau > 0) & np.isfinite(tau)):
            return case, tau
    raise AssertionError(f"no case with estimated blocks in {attempts} draws")


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_sparse_q_selection_matches_the_reference(rng, backend):
    """`estimate="sparse_q"`: the kernels estimate the 2:4-pruned q codes (natively on Hopper, as sparse wgmmas)
    and keep the reference's blocks wherever its margin is clear of rounding."""
    case, tau = _draw_estimated_case(rng)
    case = dataclasses.replace(case, config=dataclasses.replace(case.config, backend=backend, estimate="sparse_q"))
    q, k, _ = cases.draw_structured_qkv(rng, case, jnp.bfloat16)
    mask = np.asarray(_kernel_layout(q, k, tau, case.config).to_mask())
    reference_config = dataclasses.replace(case.config, backend="reference", interpret=False)
    want = np.asarray(sale_jax.select_blocks(q, k, tau, reference_config).to_mask())
    _, margins = selection_margins_reference(q, k, tau, reference_config)
    _, full_margins = selection_margins_reference(q, k, tau, dataclasses.replace(reference_config, estimate="full"))
    margins, full_margins = np.asarray(margins), np.asarray(full_margins)
    finite = np.isfinite(margins)
    assert not np.allclose(margins[finite], full_margins[finite]), "pruning the q codes should move the estimate"
    assert np.all(np.abs(margins[mask != want]) < 1e-3), f"{(mask != want).sum()} blocks differ from the reference"


@pytest.mark.parametrize("block_q, block_k, kv_len, head_dim, group, warpgroups, heads_per_cta, estimate", [
    (128, 32, 32768, 128, 4, 1, 1, "full"), (128, 32, 65536, 128, 4, 2, 1, "full"),
    (128, 32, 131072, 64, 4, 2, 1, "full"), (64, 32, 131072, 128, 4, 1, 1, "full"),
    (128, 32, 131072, 256, 4, 1, 1, "full"),  # three stages of 256 x 256-byte key tiles would not fit in shared memory
    (128, 16, 131072, 128, 4, 2, 1, "full"), (128, 16, 262144, 128, 4, 2, 1, "full"),  # longer keys: key chunks
    # sparse dots: one warpgroup per CTA, two q heads of a kv head sharing its key tiles where the group allows
    (128, 32, 131072, 128, 4, 1, 2, "sparse_q"), (128, 32, 32768, 128, 2, 1, 2, "sparse_q"),
    (128, 32, 131072, 128, 1, 1, 1, "sparse_q"), (128, 32, 131072, 128, 3, 1, 1, "sparse_q"),
])
def test_mosaic_estimate_launch_table(block_q, block_k, kv_len, head_dim, group, warpgroups, heads_per_cta,
                                      estimate):
    config = sale_jax.SaleConfig(block_q=block_q, block_k=block_k, estimate=estimate)
    launch = mosaic_gpu_backend.estimate_launch(kv_len, head_dim, group, config, tuning.HOPPER)
    assert launch.compute_warpgroups == warpgroups and launch.heads_per_cta == heads_per_cta
    assert launch.tile_k * block_q // warpgroups == mosaic_estimate.MAX_ACC_ELEMENTS


def test_sale_attention_mosaic_backend_matches_oracle(rng):
    case = draw_mosaic_case(rng)
    q, k, v = cases.draw_structured_qkv(rng, case, jnp.bfloat16)
    tau = cases.draw_tau(rng, case.q_heads)
    out, layout = sale_jax.sale_attention(q, k, v, tau, case.config, return_layout=True)
    want_out, _ = oracle.attention(q, k, v, np.asarray(layout.to_mask()), bq=case.config.block_q,
                                   bk=case.config.block_k, scale=case.scale)
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_attention_kernel_matches_oracle(rng, dtype):
    case = draw_kernel_case(rng)
    q, k, v = cases.draw_qkv(rng, case, dtype)
    grid = sale_jax.BlockGrid(case.q_len, case.kv_len, case.config.block_q, case.config.block_k)
    mask = rng.uniform(size=(case.batch, case.q_heads, grid.num_q_blocks, grid.num_k_blocks)) < rng.uniform(0.2, 1)
    layout = sale_jax.BlockLayout.from_mask(jnp.asarray(mask), grid)
    bq, bk = case.config.block_q, case.config.block_k
    q_rows = pad_axis(q, 1, bq)
    initial = [poisoned(q_rows.shape, dtype), poisoned((case.batch, case.q_heads, q_rows.shape[1]), jnp.float32)]
    out, lse = pallas_kernels.block_sparse_attention(
        q_rows, pad_axis(k, 1, bk), pad_axis(v, 1, bk), layout.indices, layout.counts,
        jnp.asarray(grid.row_offsets), q_len=case.q_len, kv_len=case.kv_len, block_q=bq, block_k=bk,
        scale=case.scale, interpret=INTERPRET, initial_outputs=initial)
    out, lse = out[:, :case.q_len], lse[..., :case.q_len]
    want_out, want_lse = oracle.attention(q, k, v, mask & grid.visible_mask, bq=bq, bk=bk, scale=case.scale)
    tolerance = OUT_TOLERANCES[dtype]
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=tolerance, rtol=tolerance)
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=1e-4 if dtype == jnp.float32 else 2e-3,
                               rtol=1e-5)
    # Kernel and reference each round in the input dtype, each within `tolerance` of the oracle, so they may differ
    # from each other by twice that.
    ref_out, _ = block_sparse_attention_reference(q, k, v, layout, case.scale)
    np.testing.assert_allclose(oracle.as_f64(out), oracle.as_f64(ref_out), atol=2 * tolerance, rtol=2 * tolerance)


def test_sale_attention_triton_backend_matches_reference(rng):
    case = draw_kernel_case(rng)
    q, k, v = cases.draw_structured_qkv(rng, case, jnp.bfloat16)
    tau = cases.draw_tau(rng, case.q_heads)
    out, lse, layout = sale_jax.sale_attention(q, k, v, tau, case.config, return_lse=True, return_layout=True)
    want_out, want_lse = oracle.attention(q, k, v, np.asarray(layout.to_mask()), bq=case.config.block_q,
                                          bk=case.config.block_k, scale=case.scale)
    np.testing.assert_allclose(oracle.as_f64(out), want_out, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(lse, want_lse, atol=2e-2, rtol=1e-5)


@pytest.mark.parametrize("overrides,head_dim,message", [
    (dict(block_q=8), 32, "block_q >= 16"),
    (dict(block_k=8), 32, "block_k >= 16"),
    (dict(), 24, "head_dim to be a power of two"),
    (dict(backend="mosaic_gpu", block_q=32), 64, r"block_q in \(64, 128\)"),
    (dict(backend="mosaic_gpu"), 32, r"head_dim in \(64, 128, 256\)"),
    (dict(backend="mosaic_gpu", block_k=256), 64, "block_k <= 128"),
])
def test_kernel_backends_reject_unsupported_shapes(overrides, head_dim, message):
    """Block sizes are refused when the config is made, head_dim at the call."""
    q = jnp.ones((1, 64, 2, head_dim), jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        config = sale_jax.SaleConfig(**{"dense_below": 0, "backend": "triton", "interpret": INTERPRET, **overrides})
        sale_jax.sale_attention(q, q, q, jnp.zeros(2), config)
