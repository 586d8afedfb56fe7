"""Block geometry of causal attention, SALE's sink / middle / local regions on it, and `BlockLayout`, the kept key
blocks of every query block.

The layout stores, for each (batch, q head, q block), the ascending indices of its kept key blocks. Rows are packed
one after another with the width of their causally visible key blocks (the causal triangle, not the square), so
that the layout of B=1, Hq=32 at 128K tokens takes a quarter of the bytes of Q. Where a row keeps fewer blocks than
its width, the remaining slots repeat its last kept index: a kernel that prefetches one index past the end still
reads a valid block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Static block geometry: query block `I` covers rows `[I*block_q, (I+1)*block_q)`, key block `J` keys
    `[J*block_k, (J+1)*block_k)`; query row `i` sits at key position `i + kv_len - q_len`."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    @property
    def query_offset(self) -> int:
        return self.kv_len - self.q_len

    @functools.cached_property
    def visible_counts(self) -> np.ndarray:
        """Per query block, the number of key blocks holding a key visible to some of its rows (always >= 1)."""
        q_blocks = np.arange(self.num_q_blocks)
        last_row = np.minimum((q_blocks + 1) * self.block_q, self.q_len) - 1
        return ((last_row + self.query_offset) // self.block_k + 1).astype(np.int32)

    @functools.cached_property
    def row_offsets(self) -> np.ndarray:
        """`row_offsets[I]` is where query block `I`'s index list starts in the packed layout; the last entry is
        the total number of slots."""
        return np.concatenate([[0], np.cumsum(self.visible_counts)]).astype(np.int32)

    @property
    def num_slots(self) -> int:
        return int(self.row_offsets[-1])

    @functools.cached_property
    def visible_mask(self) -> np.ndarray:
        """bool `[nQ, nK]`: key block `J` is causally visible to query block `I`."""
        return np.arange(self.num_k_blocks)[None, :] < self.visible_counts[:, None]

    def index_dtype(self):
        """int16 while every key-block index fits (sequences up to ~1M tokens at block_k=32), int32 beyond."""
        return jnp.int16 if self.num_k_blocks <= np.iinfo(np.int16).max else jnp.int32

    def regions(self, sink_tokens: int, local_tokens: int) -> "BlockRegions":
        """The sink, middle and local key blocks of every query block (the one definition of SALE's regions)."""
        return BlockRegions(self, sink_tokens, local_tokens)


@dataclasses.dataclass(frozen=True)
class BlockRegions:
    """SALE's three regions of each query block's visible key blocks, in ascending order:

      sink    `[0, num_sink_blocks[I])`: the blocks intersecting keys `[0, sink_tokens)`;
      middle  `[num_sink_blocks[I], local_first_block[I])`: the blocks the selection decides;
      local   `[local_first_block[I], grid.visible_counts[I])`: the blocks intersecting the keys
              `[p_first - local_tokens + 1, p_last]`, where `p_first` and `p_last` are the positions of the
              block's first and last query rows (the diagonal block always among them, since local_tokens >= 1).

    Sink and local blocks are always kept and are the blocks of the exact reference statistics. Where the two
    overlap, the sink takes them (so the middle may be empty and the local region starts after the sink).
    """

    grid: BlockGrid
    sink_tokens: int
    local_tokens: int

    @property
    def sink_blocks(self) -> int:
        """The sink blocks of a row that sees every key block (at most `grid.num_k_blocks`)."""
        return min(-(-self.sink_tokens // self.grid.block_k), self.grid.num_k_blocks)

    @functools.cached_property
    def num_sink_blocks(self) -> np.ndarray:
        """int32 `[nQ]`: the end of each query block's sink region (its visible sink blocks)."""
        return np.minimum(self.sink_blocks, self.grid.visible_counts).astype(np.int32)

    @functools.cached_property
    def local_first_block(self) -> np.ndarray:
        """int32 `[nQ]`: the first local block of each query block, which is where its middle region ends."""
        grid = self.grid
        first_position = np.arange(grid.num_q_blocks) * grid.block_q + grid.query_offset
        first_local_key = np.maximum(first_position - self.local_tokens + 1, 0)
        return np.maximum(first_local_key // grid.block_k, self.num_sink_blocks).astype(np.int32)

    @property
    def max_sink_blocks(self) -> int:
        """The most sink blocks of any query block."""
        return int(self.num_sink_blocks.max())

    @property
    def max_local_blocks(self) -> int:
        """The most local blocks of any query block."""
        return int((self.grid.visible_counts - self.local_first_block).max())

    @functools.cached_property
    def always_kept(self) -> np.ndarray:
        """bool `[nQ, nK]`: the sink and local blocks of each query block."""
        k_blocks = np.arange(self.grid.num_k_blocks)[None, :]
        return self.grid.visible_mask & ((k_blocks < self.num_sink_blocks[:, None])
                                         | (k_blocks >= self.local_first_block[:, None]))

    @functools.cached_property
    def middle(self) -> np.ndarray:
        """bool `[nQ, nK]`: the middle blocks of each query block, the ones the selection decides."""
        return self.grid.visible_mask & ~self.always_kept


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Kept key blocks per (batch, q head, q block).

    Attributes:
      indices: `[B, Hq, grid.num_slots]` (int16, or int32 past 32767 key blocks). Row `I` of a head occupies slots
        `grid.row_offsets[I] : grid.row_offsets[I+1]`; its first `counts[..., I]` entries are the kept key-block
        indices in ascending order, the rest repeat the last kept one.
      counts: int32 `[B, Hq, nQ]`, the number of kept key blocks per row.
      grid: the static block geometry the layout was made for.
    """

    indices: jax.Array
    counts: jax.Array
    grid: BlockGrid

    def tree_flatten(self):
        return (self.indices, self.counts), self.grid

    @classmethod
    def tree_unflatten(cls, grid, children):
        return cls(*children, grid=grid)

    @property
    def batch_size(self) -> int:
        return self.counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    @classmethod
    def from_mask(cls, mask: jax.Array, grid: BlockGrid) -> "BlockLayout":
        """Packs a bool `[B, Hq, nQ, nK]` block mask; blocks outside the causal triangle are dropped."""
        nq, nk = grid.num_q_blocks, grid.num_k_blocks
        if mask.ndim != 4 or mask.shape[2:] != (nq, nk):
            raise ValueError(f"block mask must have shape [B, Hq, {nq}, {nk}] for {grid}, got {mask.shape}")
        mask = jnp.asarray(mask, bool) & jnp.asarray(grid.visible_mask)
        counts = mask.sum(-1, dtype=jnp.int32)
        rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
        row_start = jnp.asarray(grid.row_offsets[:-1])[:, None]
        discard = grid.num_slots
        target = jnp.where(mask, row_start + rank, discard)
        block_ids = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (nq, nk)).ravel()

        def pack_one_head(target_h, mask_h, counts_h):
            scattered = jnp.zeros(grid.num_slots + 1, jnp.int32).at[target_h.ravel()].set(block_ids)
            last_kept = jnp.max(jnp.where(mask_h, jnp.arange(nk, dtype=jnp.int32), 0), axis=-1)
            slot_row, slot_rank = _slot_coordinates(grid)
            is_padding = slot_rank >= counts_h[slot_row]
            return jnp.where(is_padding, last_kept[slot_row], scattered[:-1])

        pack = jax.vmap(jax.vmap(pack_one_head))
        indices = pack(target, mask, counts).astype(grid.index_dtype())
        return cls(indices=indices, counts=counts, grid=grid)

    @classmethod
    def all_visible(cls, batch_size: int, num_heads: int, grid: BlockGrid) -> "BlockLayout":
        """The dense causal layout: every visible block kept."""
        mask = jnp.broadcast_to(jnp.asarray(grid.visible_mask), (batch_size, num_heads) + grid.visible_mask.shape)
        return cls.from_mask(mask, grid)

    def to_mask(self) -> jax.Array:
        """bool `[B, Hq, nQ, nK]`: key block `J` is kept for query block `I`."""
        nq, nk = self.grid.num_q_blocks, self.grid.num_k_blocks
        slot_row, slot_rank = _slot_coordinates(self.grid)

        def unpack_one_head(indices_h, counts_h):
            is_kept = slot_rank < counts_h[slot_row]
            flat = slot_row * nk + indices_h.astype(jnp.int32)
            return jnp.zeros(nq * nk, bool).at[flat].max(is_kept).reshape(nq, nk)

        return jax.vmap(jax.vmap(unpack_one_head))(self.indices, self.counts)

    def density(self) -> jax.Array:
        """Kept blocks over causally visible blocks, over all batch elements and heads (f32 scalar)."""
        visible = float(self.grid.visible_counts.sum()) * self.batch_size * self.num_heads
        return self.counts.sum(dtype=jnp.float32) / visible

    def density_per_head(self) -> jax.Array:
        """f32 `[Hq]`: kept over visible blocks per q head, averaged over the batch."""
        visible = float(self.grid.visible_counts.sum()) * self.batch_size
        return self.counts.sum(axis=(0, 2), dtype=jnp.float32) / visible


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ChunkedLayout:
    """The layouts of a call run in query chunks (`SaleConfig.query_chunk`), in query order: each chunk's queries
    against the keys up to its end, on the chunk's own grid. Densities are the whole call's."""

    chunks: tuple[BlockLayout, ...]

    def tree_flatten(self):
        return (self.chunks,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(tuple(children[0]))

    @property
    def batch_size(self) -> int:
        return self.chunks[0].batch_size

    @property
    def num_heads(self) -> int:
        return self.chunks[0].num_heads

    def _visible(self) -> float:
        return float(sum(layout.grid.visible_counts.sum() for layout in self.chunks))

    def density(self) -> jax.Array:
        """Kept blocks over causally visible blocks, over every chunk, batch element and head (f32 scalar)."""
        kept = sum(layout.counts.sum(dtype=jnp.float32) for layout in self.chunks)
        return kept / (self._visible() * self.batch_size * self.num_heads)

    def density_per_head(self) -> jax.Array:
        """f32 `[Hq]`: kept over visible blocks per q head, over every chunk, averaged over the batch."""
        kept = sum(layout.counts.sum(axis=(0, 2), dtype=jnp.float32) for layout in self.chunks)
        return kept / (self._visible() * self.batch_size)


def _slot_coordinates(grid: BlockGrid) -> tuple[jax.Array, jax.Array]:
    """For every packed slot: the query block it belongs to and its rank within that block's list."""
    slot_row = np.repeat(np.arange(grid.num_q_blocks, dtype=np.int32), grid.visible_counts)
    slot_rank = np.arange(grid.num_slots, dtype=np.int32) - grid.row_offsets[slot_row]
    return jnp.asarray(slot_row), jnp.asarray(slot_rank)
