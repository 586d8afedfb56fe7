"""SALE under a JAX device mesh: batch and heads sharded with `jax.shard_map`, nothing gathered.

Every SALE pass is independent per (batch element, q head) once each q head has its kv head: smoothing means,
statistics, selection and attention never mix heads or sequences. So each device runs the single-device function
on its own slice, with q heads split so that a device's q heads read only its own kv heads (Hkv divisible by the
head-axis size keeps each GQA group on one device). Thresholds are split along heads with the q heads.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from sale_jax import api, checks
from sale_jax.config import SaleConfig
from sale_jax.layout import BlockLayout, ChunkedLayout


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    if axis is None:
        return 1
    if axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not {axis!r}")
    return mesh.shape[axis]


def check_shardable(q, k, mesh: Mesh, batch_axis: str | None, head_axis: str | None) -> None:
    """Batch divisible by the batch axis; q and kv heads divisible by the head axis (GQA groups stay whole)."""
    batch, _, q_heads, _ = q.shape
    kv_heads = k.shape[2]
    batch_devices, head_devices = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
    if batch % batch_devices:
        raise ValueError(f"batch {batch} is not divisible by mesh axis {batch_axis!r} of size {batch_devices}")
    if kv_heads % head_devices:
        raise ValueError(f"kv heads ({kv_heads}) are not divisible by mesh axis {head_axis!r} of size "
                         f"{head_devices}; each device must hold whole GQA groups")


def _specs(batch_axis, head_axis):
    rows = P(batch_axis, None, head_axis, None)  # [B, T, H, D]
    per_head = P(batch_axis, head_axis, None)  # [B, H, ...]
    return rows, per_head, P(head_axis)


def sale_attention(q, k, v, tau, config: SaleConfig, *, mesh: Mesh, batch_axis: str | None = "data",
                   head_axis: str | None = "model", return_lse: bool = False, return_layout: bool = False):
    """`sale_jax.sale_attention` with batch on `batch_axis` and heads on `head_axis` of `mesh`."""
    checks.check_qkv(q, k, v)
    tau = checks.check_tau(tau, q.shape[2])
    check_shardable(q, k, mesh, batch_axis, head_axis)
    rows, per_head, heads = _specs(batch_axis, head_axis)
    out_specs = (rows,) + ((per_head,) if return_lse else ())
    out_specs += (_sale_layout_spec(per_head, q, k, config, mesh, batch_axis, head_axis),) if return_layout else ()
    local = functools.partial(api.sale_attention, config=config, return_lse=return_lse, return_layout=return_layout)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, heads),
                            out_specs=out_specs if len(out_specs) > 1 else out_specs[0], check_vma=False)
    return sharded(q, k, v, tau)


def select_blocks(q, k, tau, config: SaleConfig, *, mesh: Mesh, batch_axis: str | None = "data",
                  head_axis: str | None = "model") -> BlockLayout:
    """`sale_jax.select_blocks` with batch and heads sharded; the layout comes back sharded the same way."""
    checks.check_qkv(q, k, k)
    tau = checks.check_tau(tau, q.shape[2])
    check_shardable(q, k, mesh, batch_axis, head_axis)
    rows, per_head, heads = _specs(batch_axis, head_axis)
    local = functools.partial(api.select_blocks, config=config)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, heads),
                         out_specs=_block_layout_spec(per_head, q, k, config), check_vma=False)(q, k, tau)


def block_sparse_attention(q, k, v, layout: BlockLayout, config: SaleConfig, *, mesh: Mesh,
                           batch_axis: str | None = "data", head_axis: str | None = "model", return_lse: bool = False):
    """`sale_jax.block_sparse_attention` with batch and heads (and the layout's rows) sharded."""
    checks.check_qkv(q, k, v)
    checks.check_layout(layout, q.shape[0], q.shape[2], api._grid_for(q, k, config))
    check_shardable(q, k, mesh, batch_axis, head_axis)
    rows, per_head, _ = _specs(batch_axis, head_axis)
    local = functools.partial(api.block_sparse_attention, config=config, return_lse=return_lse)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, _block_layout_spec(per_head, q, k, config)),
                         out_specs=(rows, per_head) if return_lse else rows, check_vma=False)(q, k, v, layout)


def dense_attention(q, k, v, *, mesh: Mesh, batch_axis: str | None = "data", head_axis: str | None = "model",
                    scale: float | None = None):
    """`sale_jax.dense_attention` with batch and heads sharded (cuDNN or our kernel per device)."""
    checks.check_qkv(q, k, v)
    check_shardable(q, k, mesh, batch_axis, head_axis)
    rows, _, _ = _specs(batch_axis, head_axis)
    local = functools.partial(api.dense_attention, scale=scale)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)(q, k, v)


def _block_layout_spec(per_head: P, q, k, config: SaleConfig) -> BlockLayout:
    """Partition specs shaped like one layout of these inputs (its static grid must match the real one's)."""
    return BlockLayout(indices=per_head, counts=per_head, grid=api._grid_for(q, k, config))


def _sale_layout_spec(per_head: P, q, k, config: SaleConfig, mesh: Mesh, batch_axis, head_axis):
    """Partition specs shaped like the layout each device's call returns (its static grids must match the real
    ones', which follow the device's share of batch and heads)."""
    batch, q_len, q_heads, head_dim = q.shape
    local_q = jax.ShapeDtypeStruct((batch // _axis_size(mesh, batch_axis), q_len,
                                    q_heads // _axis_size(mesh, head_axis), head_dim), q.dtype)
    grids = api.layout_grids(local_q, k, config)
    specs = tuple(BlockLayout(indices=per_head, counts=per_head, grid=grid) for grid in grids)
    return specs[0] if len(specs) == 1 else ChunkedLayout(specs)
