"""The estimate kernel with one of its parts left out, for measuring where its time goes (the roofline record of
`experiments/benchmarks/estimate_kernel.py --variants`). These variants exist only here: each patches the kernel's
modules (`pallas_kernels.mosaic_estimate` and `mosaic_estimate_inline`) while a fresh jit of `estimate_hits`
traces, so the library keeps one kernel.

- `kernel`: the kernel as it ships.
- `no_epilogue`: each tile's epilogue reads one accumulator register instead of reducing every block (the wgmmas
  still run and are waited for): tensor cores, TMA pipeline and synchronisation.
- `no_dots`: the code dots' wgmma left out (the offsets' tf32 wgmma, the epilogue and the pipeline remain).
- `no_offsets`: the offsets' tf32 wgmma left out (the dots, the epilogue and the pipeline remain).
- `pipeline_only`: neither wgmmas nor epilogue: the key tiles stream through shared memory and nothing else.

The variants' flags are meaningless; only their times are.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax._src.lib.mlir import ir  # inline_mgpu bodies are MLIR builders; jax has no public path to these modules
from jax._src.lib.mlir.dialects import arith, memref, vector
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_estimate, mosaic_estimate_inline

VARIANTS = ("kernel", "no_epilogue", "no_dots", "no_offsets", "pipeline_only")


def _one_register_flag(*, block_k: int, tile_k: int, in_flight: bool = False):
    """Stands in for `mosaic_estimate_inline.warp_or_hit_flags`: lane 0 of each warp stores a flag from the sign of its
    first accumulator register, so the wgmmas stay live while the per-block reduction is gone."""
    del block_k, tile_k
    layout = plgpu.Layout._WGMMA_ACC_32BIT if in_flight else plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()))
    def store_flag(_, excess, flags):
        i32 = ir.IntegerType.get_signless(32)
        if in_flight:
            mosaic_estimate_inline.wgmma_group("wgmma.wait_group.sync.aligned 0;")
        first = excess.registers.flat[0]
        value = vector.extract(first, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
        hit = arith.cmpf(arith.CmpFPredicate.OGT, value, arith.constant(value.type, 0.0))
        lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 32))
        first_lane = arith.cmpi(arith.CmpIPredicate.eq, lane, arith.constant(i32, 0))
        with mgpu_utils.when(arith.andi(hit, first_lane)):
            one = arith.constant(ir.MemRefType(flags.type).element_type, 1)
            memref.store(one, flags, [arith.constant(ir.IndexType.get(), 0)])

    return store_flag


class _Forwarding:
    """Attribute access forwarded to `module` except for the names in `overrides`."""

    def __init__(self, module, overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._module, name)


def _skip_wgmma_of(dtype):
    """A `plgpu.wgmma` that drops the instructions whose A operand has `dtype` (f32: the offsets; fp8: the dots)."""
    def wgmma(acc, a, b, **kwargs):
        if jnp.dtype(a.dtype) != jnp.dtype(dtype):
            plgpu.wgmma(acc, a, b, **kwargs)
    return wgmma


def _patches(variant: str) -> dict:
    """The attributes a variant replaces: (module, name) -> value."""
    if variant == "kernel":
        return {}
    if variant == "no_epilogue":
        return {(mosaic_estimate_inline, "warp_or_hit_flags"): _one_register_flag}
    if variant == "no_dots":
        return {(mosaic_estimate, "plgpu"): _Forwarding(plgpu, {"wgmma": _skip_wgmma_of(jnp.float8_e4m3fn)}),
                (mosaic_estimate_inline, "sparse_wgmma"): _Forwarding(
                    mosaic_estimate_inline.sparse_wgmma, {"issue": lambda registers, *operands, n: registers})}
    if variant == "no_offsets":
        return {(mosaic_estimate, "plgpu"): _Forwarding(plgpu, {"wgmma": _skip_wgmma_of(jnp.float32)}),
                (mosaic_estimate_inline, "mgpu"): _Forwarding(
                    mosaic_estimate_inline.mgpu, {"wgmma": lambda acc, *operands, **kwargs: acc})}
    if variant == "pipeline_only":
        def no_tile_work(*args, after_issue=None, **kwargs):
            if after_issue is not None:  # the split-rows kernel's turns: its warpgroups still alternate
                after_issue()
        return {(mosaic_estimate, "_tile_flags"): no_tile_work}
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


@contextlib.contextmanager
def patched(variant: str):
    """The kernel's modules as `variant` for the duration: the estimate traced and lowered inside is the variant
    (its inline Mosaic GPU bodies run at lowering, so both must happen here)."""
    patches = _patches(variant)
    saved = {target: getattr(*target) for target in patches}
    for (module, name), value in patches.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


@functools.cache
def estimate_hits(variant: str):
    """`mosaic_estimate.estimate_hits` as `variant`: a callable taking the same arguments, traced under the
    variant's patches by a jit of its own (so no variant reuses another's compiled kernel), one per variant."""
    def unshared(*args, **kwargs):  # a function of its own: jit's trace cache is keyed by the function
        return mosaic_estimate.estimate_hits.__wrapped__(*args, **kwargs)

    jitted = jax.jit(unshared, static_argnames=mosaic_estimate.STATIC_ARGNAMES)
    _patches(variant)  # an unknown variant fails here, not at the first call

    @functools.wraps(mosaic_estimate.estimate_hits)
    def call(*args, **kwargs):
        with patched(variant):  # a first call traces, lowers and compiles here
            return jitted(*args, **kwargs)

    return call
