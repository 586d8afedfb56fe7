"""The estimate kernel's code below Pallas's array level (inline Mosaic GPU: MLIR builders over the accumulator's
registers): the warp-level epilogue, which turns a tile's accumulator into hit flags without shuffles or barriers,
and the issue of the 2:4-sparse wgmmas, which Pallas has no operation for. Interpret mode cannot run inline Mosaic
GPU code; `mosaic_estimate` uses an array-level epilogue there.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir  # inline_mgpu bodies are MLIR builders; jax has no public path to these modules
from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_estimate_operands as operands
from pallas_kernels import sparse_wgmma


def balanced(op, values):
    """op folded over `values` as a balanced tree (independent steps in flight, not one chain)."""
    while len(values) > 1:
        values = [op(a, b) for a, b in zip(values[::2], values[1::2])] + values[len(values) & ~1:]
    return values[0]


def and_tree(values):
    """Bitwise AND of `values` (MLIR integer values) in groups of three, `(a & b) & c` each: ptxas fuses each group
    into one three-input LOP3, and the groups are independent steps in flight."""
    while len(values) > 1:
        groups = [values[i:i + 3] for i in range(0, len(values), 3)]
        values = [functools.reduce(arith.andi, group) for group in groups]
    return values[0]


_WGMMA_COLUMN_GROUP = 8  # the wgmma accumulator layout's registers come in 8-column groups (its registers' axis 1)
_WARP_SIZE = 32


def wgmma_group(instruction: str):
    """`wgmma.commit_group` or `wgmma.wait_group 0`, for wgmmas issued in inline Mosaic GPU code."""
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], instruction, "", has_side_effects=True)


def warp_or_hit_flags(*, block_k: int, tile_k: int, in_flight: bool = False):
    """The epilogue below Pallas's array level: stores 1 into `flags[j]` for each of the tile's blocks j that has
    an accumulator element >= 0, leaving the others as they are (the accumulator is 2**-64 below the excess over
    k_scale, `operands.offset_terms`, so `>= 0` is `excess > 0`).

    Per thread, the AND of the block's registers as bits: its sign bit is 1 only if every element is negative, and
    three-input ANDs (one LOP3 per two registers) are half the instructions of a maximum's chain. Then one bit per
    block, one `redux.sync.or` per warp, and lane j of each warp stores block j's flag. The warps never wait for
    each other (they store the same 1), where the array-level epilogue needs cross-lane shuffles per row and a
    warpgroup barrier per tile. `in_flight`: the accumulator comes straight from `issue_sparse` (its registers as
    wgmma holds them, the instructions not yet waited for), so the epilogue waits for them first."""
    num_blocks = tile_k // block_k  # at most 256 // 8 = 32, one per lane
    layout = plgpu.Layout._WGMMA_ACC_32BIT if in_flight else plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()))
    def store_flags(_, excess, flags):
        i32 = ir.IntegerType.get_signless(32)
        if in_flight:
            wgmma_group("wgmma.wait_group.sync.aligned 0;")
            excess = mgpu.optimization_barrier(excess)
        registers = excess.registers
        if registers.shape[1] != tile_k // _WGMMA_COLUMN_GROUP:
            raise NotImplementedError(f"unexpected wgmma register layout {registers.shape} for {tile_k} columns")
        per_block = [[] for _ in range(num_blocks)]
        for index in np.ndindex(registers.shape):
            per_block[index[1] * _WGMMA_COLUMN_GROUP // block_k].append(registers[index])
        [width] = ir.VectorType(registers.flat[0].type).shape
        as_bits = ir.VectorType.get([width], i32)
        negative = arith.constant(i32, 0)  # bit j: every element of block j is negative
        for block, block_registers in enumerate(per_block):
            words = and_tree([arith.bitcast(as_bits, register) for register in block_registers])
            word = and_tree([vector.extract(words, dynamic_position=[],
                                             static_position=ir.DenseI64ArrayAttr.get([i])) for i in range(width)])
            sign = arith.shrui(word, arith.constant(i32, 31))
            negative = arith.ori(negative, arith.shli(sign, arith.constant(i32, block)))
        bits = arith.xori(negative, arith.constant(i32, (1 << num_blocks) - 1 if num_blocks < 32 else -1))
        bits = mgpu_utils.redux(bits, arith.constant(i32, 0xFFFFFFFF), mgpu_utils.ReductionKind.OR)
        lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, _WARP_SIZE))
        lane_bit = arith.andi(arith.shrui(bits, lane), arith.constant(i32, 1))
        stores = arith.andi(arith.cmpi(arith.CmpIPredicate.ult, lane, arith.constant(i32, num_blocks)),
                            arith.cmpi(arith.CmpIPredicate.ne, lane_bit, arith.constant(i32, 0)))
        with mgpu_utils.when(stores):
            one = arith.constant(ir.MemRefType(flags.type).element_type, 1)
            memref.store(one, flags, [arith.index_cast(ir.IndexType.get(), lane)])

    return store_flags


def issue_sparse(*, rows: int, tile_k: int, head_dim: int):
    """The offsets' tf32 wgmma and the dots as 2:4-sparse fp8 wgmmas (`sparse_wgmma`), issued and committed, not
    waited for: returns the accumulator as wgmma holds it, for `warp_or_hit_flags(in_flight=True)`.

    The accumulator stays in the layout wgmma writes (`_WGMMA_ACC_32BIT`, Pallas's name for Mosaic GPU's
    `WGMMA_LAYOUT_ACC_32BIT`): converting it to `WGMMA` here would read registers the instructions still write.
    Mosaic GPU's accumulator exposes its registers only as `_value`, which its own wgmma lowering reads too."""
    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(operands.terms_transforms()), plgpu.RefType(operands.terms_transforms()),
                   plgpu.RefType(operands.mma_transforms(head_dim // 2)), plgpu.RefType(),
                   plgpu.RefType(operands.mma_transforms(head_dim))),
        return_type=plgpu.ShapeDtypeStruct((rows, tile_k), jnp.float32, layout=plgpu.Layout._WGMMA_ACC_32BIT))
    def issue(_, row_terms, key_terms, q_values, q_metadata, k):
        acc = mgpu.WGMMAAccumulator.zero(rows, tile_k)
        acc = mgpu.wgmma(acc, row_terms, mgpu.memref_transpose(key_terms, (1, 0, 3, 2)),
                         swizzle=4 * operands.OFFSET_TERMS)
        registers = sparse_wgmma.issue(acc._value.registers, q_values, q_metadata, k, n=tile_k)
        wgmma_group("wgmma.commit_group.sync.aligned;")
        return mgpu.FragmentedArray(_registers=registers, _layout=acc._value.layout, _is_signed=None)

    return issue
