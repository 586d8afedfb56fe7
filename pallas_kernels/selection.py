"""Pass 2 kernel: per (q block, q head, batch element), exact sink-local statistics, then a low-bit estimate of
every middle key, then the kept key-block list written straight into the packed layout.

The middle region of a q block holds only key blocks that every row of the block sees in full (the local region
always covers the diagonal), so the estimate loop needs no causal mask. It walks the middle keys in tiles of
`estimate_tile` keys (a multiple of `block_k`; larger int8 tiles run the tensor cores better) and reduces each
tile's hits to one flag per key block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.launch import QBlockGrid, pallas_call_with_initial_outputs

_PAD_CHUNK = 256  # slots written per store when filling the tail of a row's index list
_THRESHOLD_FLOOR = -1e30  # below any finite score estimate
_EXACT = jax.lax.Precision.HIGHEST  # IEEE f32 dots for f32 inputs (the default is TF32); no effect on bf16/fp16


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _selection_kernel(q_ref, q_codes_ref, q_scale_ref, k_smooth_ref, k_codes_ref, k_scale_ref, bias_ref, tau_ref,
                      row_offsets_ref, indices_ref, counts_ref, *, q_len, kv_len, block_q, block_k, sink_tokens,
                      local_tokens, scale, estimate_tile, num_q_blocks):
    q_block = num_q_blocks - 1 - pl.program_id(0)  # QBlockGrid's order: longest rows first
    head = pl.program_id(1)
    offset = kv_len - q_len
    rows = q_block * block_q + jnp.arange(block_q)
    row_is_real = rows < q_len
    row_pos = rows + offset
    first_pos = q_block * block_q + offset
    last_pos = jnp.minimum(q_block * block_q + block_q, q_len) - 1 + offset
    num_visible = last_pos // block_k + 1
    num_sink = jnp.minimum(-(-sink_tokens // block_k), num_visible)
    local_start = jnp.maximum(jnp.maximum(first_pos - local_tokens + 1, 0) // block_k, num_sink)

    # Exact statistics over the sink and local blocks, online over key blocks.
    q = q_ref[...]

    def reference_block(block, carry):
        row_max, row_sum = carry
        keys = block * block_k + jnp.arange(block_k)
        k = k_smooth_ref[pl.ds(block * block_k, block_k), :]
        s = scale * jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_EXACT,
                                        preferred_element_type=jnp.float32)
        visible = (keys[None, :] <= row_pos[:, None]) & (keys[None, :] < kv_len)
        s = jnp.where(visible, s, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        row_sum = row_sum * jnp.exp(row_max - safe_max) + jnp.sum(jnp.exp(s - safe_max[:, None]), axis=1)
        return new_max, row_sum

    stats = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    stats = jax.lax.fori_loop(0, num_sink, reference_block, stats)
    row_max, row_sum = jax.lax.fori_loop(local_start, num_visible, reference_block, stats)
    row_max = jnp.where(row_is_real, row_max, 0.0)

    tau = tau_ref[head]
    log_tau = jnp.log(jnp.where(tau > 0, tau, 1.0))
    threshold = jnp.where(tau > 0, row_max + log_tau + jnp.log(row_sum), -jnp.inf)
    # scale * (sq_i * sk_j * dot + c_j) > threshold_i  <=>  sk_j * dot + c_j / sq_i - threshold_i / (scale * sq_i) > 0
    # (sq_i > 0): two fused multiply-adds per score instead of four operations. Rounding differs from the
    # reference's order only in the last bits, which can flip blocks whose best margin is within rounding of the
    # threshold. The floor keeps dense heads (-inf) finite, so masked keys (-inf) never meet -inf - -inf = NaN.
    row_scale = q_scale_ref[...]
    inverse_row_scale = 1.0 / row_scale
    row_threshold = jnp.maximum(threshold * (inverse_row_scale / scale), _THRESHOLD_FLOOR)
    row_threshold = jnp.where(row_is_real, row_threshold, jnp.inf)  # padding rows select nothing

    slot_base = row_offsets_ref[q_block]
    index_dtype = indices_ref.dtype

    def write_slots(slots, values, valid):
        """Stores block ids at positions `slots` of this q block's list where `valid`."""
        pltriton.store(indices_ref.at[slot_base + slots], values.astype(index_dtype), mask=valid)

    sink_ids = jnp.arange(_next_power_of_two(max(-(-sink_tokens // block_k), 1)))
    write_slots(sink_ids, sink_ids, sink_ids < num_sink)

    # Middle keys: low-bit estimate, one flag per key block, compacted into the list as we go.
    q_codes = q_codes_ref[...]
    middle_start, middle_end = num_sink * block_k, local_start * block_k
    # Tiles are aligned to `estimate_tile` so the last one ends inside the padded keys (the caller pads them to a
    # multiple of the tile); the first one may start among the sink keys, which are masked like the local ones.
    first_tile_start = middle_start // estimate_tile * estimate_tile
    blocks_per_tile = estimate_tile // block_k
    tile_block_ids = jnp.arange(blocks_per_tile)

    def middle_tile(tile, count):
        start = first_tile_start + tile * estimate_tile
        keys = start + jnp.arange(estimate_tile)
        k_codes = k_codes_ref[pl.ds(start, estimate_tile), :]
        dots = jax.lax.dot_general(q_codes, k_codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        k_scale = k_scale_ref[pl.ds(start, estimate_tile)]
        bias = bias_ref[pl.ds(start, estimate_tile)]
        # Sink and local keys are never "selected": they are kept anyway and already in the statistics.
        bias = jnp.where((keys >= middle_start) & (keys < middle_end), bias, -jnp.inf)

        excess = k_scale[None, :] * dots.astype(jnp.float32) + (
            bias[None, :] * inverse_row_scale[:, None] - row_threshold[:, None])
        # Reduce within each key block first (along the fast axis), then over rows: reducing over rows first costs
        # a layout change of the whole tile (measured 1.7x slower for the whole kernel).
        block_best = jnp.max(jnp.max(excess.reshape(block_q, blocks_per_tile, block_k), axis=2), axis=0)
        block_hit = (block_best > 0).astype(jnp.int32)
        position = count + jnp.cumsum(block_hit) - block_hit
        write_slots(position, start // block_k + tile_block_ids, block_hit > 0)
        return count + jnp.sum(block_hit)

    num_tiles = jnp.where(middle_end > middle_start, pl.cdiv(middle_end - first_tile_start, estimate_tile), 0)
    count = jax.lax.fori_loop(0, num_tiles, middle_tile, num_sink)

    max_local = _next_power_of_two(-(-(local_tokens + block_q - 1) // block_k) + 1)
    local_ids = jnp.arange(max_local)
    write_slots(count + local_ids, local_start + local_ids, local_ids < num_visible - local_start)
    count = count + num_visible - local_start

    # Tail: repeat the last kept block (the diagonal one) so a kernel prefetching one past the end reads a valid id.
    def pad_chunk(chunk, carry):
        slots = count + chunk * _PAD_CHUNK + jnp.arange(_PAD_CHUNK)
        write_slots(slots, jnp.full((_PAD_CHUNK,), num_visible - 1), slots < num_visible)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(num_visible - count, _PAD_CHUNK), pad_chunk, 0)
    counts_ref[q_block] = count


@functools.partial(jax.jit, static_argnames=("num_slots", "q_len", "kv_len", "block_q", "block_k", "sink_tokens",
                                             "local_tokens", "scale", "estimate_tile", "num_warps", "num_stages",
                                             "index_dtype", "interpret"))
def select_blocks(q, q_codes, q_scale, k_smooth, k_codes, k_scale, column_bias, tau, row_offsets, *, num_slots: int,
                  q_len: int, kv_len: int, block_q: int, block_k: int, sink_tokens: int, local_tokens: int,
                  scale: float,
                  estimate_tile: int = 128, num_warps: int = 4, num_stages: int = 2, index_dtype=jnp.int16,
                  interpret: bool = False, initial_outputs=None):
    """Runs the selection pass; returns the packed kept-block `indices [B, Hq, slots]` and `counts [B, Hq, nQ]`.

    Shapes (lengths padded: `T_pad` to a multiple of `block_q`, `S_pad` to a multiple of `block_k` and of
    `estimate_tile`): q, q_codes `[B, T_pad, Hq, D]`; q_scale f32 `[B, Hq, T_pad]`; k_smooth, k_codes
    `[B, S_pad, Hkv, D]`; k_scale f32 `[B, Hkv, S_pad]`; column_bias f32 `[B, Hq, S_pad]`; tau f32 `[Hq]`;
    row_offsets int32 `[nQ + 1]` (start of each q block's list; the last entry is `num_slots`).
    `initial_outputs` (tests only) are buffers the outputs start from.
    """
    batch, padded_q_len, q_heads, head_dim = q.shape
    padded_kv_len, kv_heads = k_codes.shape[1], k_codes.shape[2]
    num_q_blocks = padded_q_len // block_q
    if estimate_tile % block_k or padded_kv_len % estimate_tile:
        raise ValueError(f"estimate_tile {estimate_tile} must be a multiple of block_k {block_k} and divide the "
                         f"padded key length {padded_kv_len}")
    kernel = functools.partial(
        _selection_kernel, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k, sink_tokens=sink_tokens,
        local_tokens=local_tokens, scale=scale, estimate_tile=estimate_tile, num_q_blocks=num_q_blocks)

    grid = QBlockGrid(num_q_blocks, q_heads, kv_heads, batch)
    q_spec, kv_spec = grid.q_rows_spec(block_q, head_dim), grid.kv_spec(padded_kv_len, head_dim)
    return pallas_call_with_initial_outputs(
        kernel,
        inputs=(q, q_codes, q_scale, k_smooth, k_codes, k_scale, column_bias, tau, row_offsets),
        initial_outputs=initial_outputs,
        grid=grid.shape,
        in_specs=[
            q_spec,
            q_spec,
            pl.BlockSpec((None, None, block_q), lambda i, h, b: (b, h, grid.q_block(i))),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, padded_kv_len), lambda i, h, b: (b, h // grid.group, 0)),
            pl.BlockSpec((None, None, padded_kv_len), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((q_heads,), lambda i, h, b: (0,)),
            pl.BlockSpec((num_q_blocks + 1,), lambda i, h, b: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, num_slots), lambda i, h, b: (b, h, 0)),
            pl.BlockSpec((None, None, num_q_blocks), lambda i, h, b: (b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, q_heads, num_slots), index_dtype),
            jax.ShapeDtypeStruct((batch, q_heads, num_q_blocks), jnp.int32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sale_select_blocks",
    )

