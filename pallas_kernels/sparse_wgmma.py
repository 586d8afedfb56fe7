"""Hopper's 2:4 structured-sparse fp8 `wgmma` (`wgmma.mma_async.sp`), which Pallas does not expose, as Mosaic GPU
code for kernels to issue from `plgpu.inline_mgpu`.

The A operand keeps at most two of every four consecutive channels of each row: it is stored compressed, the two
kept values of each group of four side by side (half the row's width), with a 4-bit position code per group,
`first | second << 2` (`first < second`, the channels the two values came from). One instruction multiplies 64
rows by a 64-channel slice of B (the dense K of 64, 32 stored bytes of A per row) at the tensor cores' sparse rate,
twice the dense one, into the same f32 accumulator a dense `wgmma` uses.

The position codes reach the tensor cores as one 32-bit register per thread and instruction: eight codes, those of
eight consecutive groups of one row. With lane l of warp w (thread `32 w + l` of the warpgroup), the row is
`16 w + l // 4 + 8 (l % 2)` and the groups start at `8 ((l // 2) % 2)` of the instruction's sixteen, code s in bits
`4 s ... 4 s + 3` (`metadata_words` packs them; the sparsity selector is 0, as PTX requires for fp8). This layout
was read off the H200 by planting one code at a time; tests/test_mosaic_estimate.py holds the sparse kernel to the
reference natively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir  # inline_mgpu bodies are MLIR builders; jax has no public path to these modules
from jax._src.lib.mlir.dialects import arith, llvm, memref
from jax.experimental.mosaic.gpu import mma_utils
from jax.experimental.mosaic.gpu import utils as mgpu_utils

GROUP = 4  # channels per group, of which at most two are kept
ROWS = 64  # rows of one instruction (wgmma's M)
DENSE_K = 64  # dense channels of one fp8 instruction
GROUPS_PER_INSTRUCTION = DENSE_K // GROUP
THREADS = 128  # one warpgroup
_CODES_PER_WORD = 8  # 4-bit position codes in a thread's 32-bit metadata register


def compress(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`codes [..., D]` (D a multiple of 4) to 2:4 form: the two largest |code| of each group of four channels
    (ties to the lower channel), in channel order, as `values [..., D // 2]` (codes' dtype) and their position
    codes `positions` uint8 `[..., D // 4]`. Elementwise over the groups (each channel's rank from its three
    comparisons), so it fuses into one pass over the codes."""
    if codes.shape[-1] % GROUP:
        raise ValueError(f"2:4 compression needs head_dim a multiple of {GROUP}, got {codes.shape[-1]}")
    grouped = codes.reshape(*codes.shape[:-1], -1, GROUP).astype(jnp.float32)  # no arithmetic on 8-bit floats
    channels = [grouped[..., c] for c in range(GROUP)]
    sizes = [jnp.abs(x) for x in channels]

    def beats(j, i):  # channel j ranks above channel i: larger, or as large and earlier
        return (sizes[j] >= sizes[i]) if j < i else (sizes[j] > sizes[i])

    kept = [sum(beats(j, i).astype(jnp.int32) for j in range(GROUP) if j != i) < 2 for i in range(GROUP)]
    first = jnp.where(kept[0], 0, jnp.where(kept[1], 1, 2))
    second = jnp.where(kept[3], 3, jnp.where(kept[2], 2, 1))

    def value_at(position):
        return jnp.select([position == c for c in range(GROUP - 1)], channels[:-1], channels[-1])

    values = jnp.stack([value_at(first), value_at(second)], axis=-1).reshape(*codes.shape[:-1], -1)
    return values.astype(codes.dtype), (first | second << 2).astype(jnp.uint8)


def decompress(values: jax.Array, positions: jax.Array) -> jax.Array:
    """The dense codes `[..., D]` that `compress` gave `(values, positions)` for, zeros where it dropped one."""
    positions = positions.astype(jnp.int32)
    pairs = values.reshape(*positions.shape, 2).astype(jnp.float32)
    channel = jnp.arange(GROUP)
    dense = (jnp.where(channel == (positions & 3)[..., None], pairs[..., :1], 0.0)
             + jnp.where(channel == (positions >> 2)[..., None], pairs[..., 1:], 0.0))
    return dense.astype(values.dtype).reshape(*positions.shape[:-1], -1)


def prune(codes: jax.Array) -> jax.Array:
    """`codes` with what `compress` drops zeroed: the dense codes a sparse wgmma multiplies."""
    return decompress(*compress(codes))


def metadata_words(positions: jax.Array) -> jax.Array:
    """Position codes `[..., rows, D // 4]` (rows a multiple of 64, D of 64) as the threads' registers: int32
    `[..., rows // 64, D // 64, 128]`, word `[m, i, t]` being thread t's register for the instruction over
    channels `64 i ... 64 i + 63` of rows `64 m ...` (a reshape and a transpose: row `16 w + 8 a + g` and group
    `8 b + s` go to thread `32 w + 4 g + 2 b + a`, nibble s)."""
    *lead, rows, groups = positions.shape
    if rows % ROWS or groups % GROUPS_PER_INSTRUCTION:
        raise ValueError(f"positions [..., rows, D // 4] need rows a multiple of {ROWS} and D of {DENSE_K}, got "
                         f"{positions.shape}")
    instructions = groups // GROUPS_PER_INSTRUCTION
    n = len(lead)
    # [..., m, w, a, g, i, b, s] -> [..., m, i, w, g, b, a, s]
    codes = positions.astype(jnp.uint32).reshape(*lead, rows // ROWS, 4, 2, 8, instructions, 2, _CODES_PER_WORD)
    codes = codes.transpose(*range(n), n, n + 4, n + 1, n + 3, n + 5, n + 2, n + 6)
    words = jnp.sum(codes << (4 * jnp.arange(_CODES_PER_WORD, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32).reshape(*lead, rows // ROWS, instructions, THREADS)


def _operand_descriptor(ref, row_offset: int, k_byte_offset: int):
    """wgmma shared-memory descriptor of a K-major 8-bit operand `ref` (a tiled, swizzled 4-D memref
    `[rows / 8, K / swizzle, 8, swizzle]`), starting at row `row_offset` and byte `k_byte_offset` of each row."""
    ref_type = ir.MemRefType(ref.type)
    strides, _ = ref_type.get_strides_and_offset()
    swizzle = ref_type.shape[3]  # bytes: 8-bit elements
    row_tile_stride, k_tile_stride = strides[0], strides[1]
    descriptor = mma_utils.encode_descriptor(ref, leading_byte_offset=0, stride_byte_offset=row_tile_stride,
                                             swizzle=swizzle)
    k_tile, within = divmod(k_byte_offset, swizzle)
    offset = row_offset // 8 * row_tile_stride + k_tile * k_tile_stride + within
    i64 = ir.IntegerType.get_signless(64)
    return llvm.add(descriptor, arith.constant(i64, mma_utils.encode_addr(offset)),
                    overflow_flags=llvm.IntegerOverflowFlags.none)


def issue(accumulator_registers: np.ndarray, a_values, metadata, b, *, n: int) -> np.ndarray:
    """Issues `accumulator += A @ B.T` as sparse wgmmas (without committing them) and returns the accumulator's
    new registers (`WGMMA_LAYOUT_ACC_32BIT`, as `mgpu.WGMMAAccumulator` holds them).

    a_values: the compressed A, a tiled fp8 memref `[rows / 8, 1, 8, D / 2]` (swizzled rows of D / 2 bytes);
    metadata: int32 smem `[rows // 64, D // 64, 128]` (`metadata_words` of these rows); b: the dense B, a
    tiled fp8 memref `[n / 8, ., 8, swizzle]` of n rows of D bytes. Must run on all threads of one warpgroup."""
    row_groups = accumulator_registers.shape[0]
    b_type = ir.MemRefType(b.type)
    instructions = b_type.shape[1] * b_type.shape[3] // DENSE_K  # head_dim // 64
    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    f32_register = ir.VectorType.get((1,), ir.F32Type.get())
    count = n // 2  # accumulator registers per thread
    accumulators = "{" + ",".join(f"${j}" for j in range(count)) + "}"
    a_arg, b_arg, meta_arg, one_arg = (f"${2 * count + j}" for j in range(4))
    ptx = (f"{{ .reg .pred p; setp.ne.b32 p, {one_arg}, 0; "
           f"wgmma.mma_async.sp.sync.aligned.m64n{n}k{DENSE_K}.f32.e4m3.e4m3 "
           f"{accumulators}, {a_arg}, {b_arg}, {meta_arg}, 0, p, 1, 1; }}\n")
    constraints = ",".join(["=f"] * count + [str(j) for j in range(count)] + ["l", "l", "r", "n"])
    result_type = llvm.StructType.get_literal([f32_register] * count)
    thread = arith.index_cast(index, arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, THREADS)))
    registers = accumulator_registers.copy()
    for m in range(row_groups):
        block = registers[m:m + 1]
        values = list(block.flat)
        if len(values) != count or values[0].type != f32_register:
            raise NotImplementedError(f"unexpected accumulator registers {block.shape} for {ROWS} x {n}")
        for i in range(instructions):
            word = memref.load(metadata, [arith.constant(index, m), arith.constant(index, i), thread])
            a_descriptor = _operand_descriptor(a_values, m * ROWS, i * DENSE_K // 2)
            b_descriptor = _operand_descriptor(b, 0, i * DENSE_K)
            result = llvm.inline_asm(result_type, [*values, a_descriptor, b_descriptor, word, arith.constant(i32, 1)],
                                     ptx, constraints, asm_dialect=0, has_side_effects=True)
            values = [llvm.extractvalue(f32_register, result, [j]) for j in range(count)]
        registers[m:m + 1] = np.array(values, dtype=object).reshape(block.shape)
    return registers
