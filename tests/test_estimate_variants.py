"""The roofline variants of the estimate kernel (experiments/lib/estimate_variants.py) leave out what they name: each
is lowered for Hopper (everything short of ptxas, on any machine) and its Mosaic GPU module is read."""

import jax
import jax.numpy as jnp
import pytest

from experiments.lib import estimate_variants
from pallas_kernels import mosaic_estimate, mosaic_estimate_inline

LENGTH, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_Q = 2048, 4, 2, 128, 128


def lowered_module(variant: str, sparse: bool, compute_warpgroups: int) -> str:
    q_width = HEAD_DIM // 2 if sparse else HEAD_DIM
    shapes = [((1, LENGTH, Q_HEADS, q_width), jnp.float8_e4m3fn), ((1, LENGTH, KV_HEADS, HEAD_DIM), jnp.float8_e4m3fn),
              ((1, Q_HEADS, LENGTH), jnp.float32), ((1, Q_HEADS, LENGTH), jnp.float32),
              ((1, KV_HEADS, LENGTH), jnp.float32), ((1, Q_HEADS, LENGTH), jnp.float32),
              ((Q_HEADS, LENGTH // BLOCK_Q), jnp.int32)]
    if sparse:
        shapes.append(((1, LENGTH, Q_HEADS, HEAD_DIM // 4), jnp.uint8))
    estimate_hits = estimate_variants.estimate_hits(variant)
    knobs = dict(block_q=BLOCK_Q, block_k=32, tile_k=128 * compute_warpgroups, middle_start=128,
                 compute_warpgroups=compute_warpgroups)

    def call(*inputs):
        if sparse:
            return estimate_hits(*inputs[:-1], q_positions=inputs[-1], **knobs)
        return estimate_hits(*inputs, **knobs)

    with estimate_variants.patched(variant):
        exported = jax.export.export(jax.jit(call), platforms=["cuda"])(
            *(jax.ShapeDtypeStruct(*shape) for shape in shapes))
    return exported.mlir_module()


@pytest.mark.parametrize("sparse, compute_warpgroups", [(False, 1), (False, 2), (True, 1)])
def test_each_variant_leaves_out_what_it_names(sparse, compute_warpgroups):
    modules = {variant: lowered_module(variant, sparse, compute_warpgroups) for variant in estimate_variants.VARIANTS}
    wgmmas = {variant: module.count("mma_async") for variant, module in modules.items()}
    reductions = {variant: module.count("redux") for variant, module in modules.items()}
    assert wgmmas["kernel"] > 0 and reductions["kernel"] > 0
    assert reductions["no_epilogue"] == 0 and wgmmas["no_epilogue"] == wgmmas["kernel"]
    assert 0 < wgmmas["no_dots"] < wgmmas["kernel"] and reductions["no_dots"] == reductions["kernel"]
    assert 0 < wgmmas["no_offsets"] < wgmmas["kernel"] and reductions["no_offsets"] == reductions["kernel"]
    assert wgmmas["pipeline_only"] == 0 and reductions["pipeline_only"] == 0


def test_the_kernel_modules_are_restored_after_a_variant():
    targets = [(mosaic_estimate, "plgpu"), (mosaic_estimate, "_tile_flags"), (mosaic_estimate_inline, "mgpu"),
               (mosaic_estimate_inline, "sparse_wgmma"), (mosaic_estimate_inline, "warp_or_hit_flags")]
    functions = {target: getattr(*target) for target in targets}
    for variant in estimate_variants.VARIANTS:
        with estimate_variants.patched(variant):
            pass
    assert functions == {target: getattr(*target) for target in targets}


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant 'no_such'"):
        estimate_variants.estimate_hits("no_such")
