"""The public functions: validate the inputs, resolve the call's plan once (`sale_jax.plan`), and run under jit with
`tau` traced."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sale_jax import checks
from sale_jax.backends import KERNEL_MODULES
from sale_jax.config import SaleConfig
from sale_jax.plan import CallPlan, plan_call
from sale_jax.layout import BlockGrid, BlockLayout, ChunkedLayout
from sale_jax.ops import smoothing_means
from sale_jax.reference import block_sparse_attention_reference, select_blocks_reference

_DEFAULT_CONFIG = SaleConfig()


def _grid_for(q, k, config: SaleConfig) -> BlockGrid:
    return BlockGrid(q.shape[1], k.shape[1], config.block_q, config.block_k)


def select_blocks(q: jax.Array, k: jax.Array, tau: jax.Array, config: SaleConfig = _DEFAULT_CONFIG) -> BlockLayout:
    """Selection pass: the kept key blocks of every (batch, q head, q block).

    Args:
      q: `[B, T, Hq, D]` queries, the last `T` positions of the `S` keys.
      k: `[B, S, Hkv, D]` keys.
      tau: f32 `[Hq]` relative-score thresholds; 0 keeps every visible block of that head, inf (`STREAMING`) only
        its sink and local blocks, and its estimate does not run.
      config: block sizes, regions, quantization and backend.
    """
    checks.check_qkv(q, k, k)
    tau = checks.check_tau(tau, q.shape[2])
    return _select_blocks(q, k, tau, config, plan_call(q, k, config))


@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _select_blocks(q, k, tau, config: SaleConfig, plan: CallPlan, means=None) -> BlockLayout:
    if plan.backend in KERNEL_MODULES:
        return KERNEL_MODULES[plan.backend].select_blocks(q, k, tau, config, plan.tuning, means)
    return select_blocks_reference(q, k, tau, config, means)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: BlockLayout,
                           config: SaleConfig = _DEFAULT_CONFIG, return_lse: bool = False):
    """Computation pass: exact causal attention restricted to the kept blocks of `layout`.

    Returns `[B, T, Hq, D]` in the input dtype, and with `return_lse` also the natural log-sum-exp f32 `[B, Hq, T]`.
    """
    checks.check_qkv(q, k, v)
    checks.check_layout(layout, q.shape[0], q.shape[2], _grid_for(q, k, config))
    return _block_sparse_attention(q, k, v, layout, config, plan_call(q, k, config), return_lse)


@functools.partial(jax.jit, static_argnames=("config", "plan", "return_lse"))
def _block_sparse_attention(q, k, v, layout, config: SaleConfig, plan: CallPlan, return_lse: bool):
    if plan.backend in KERNEL_MODULES:
        out, lse = KERNEL_MODULES[plan.backend].block_sparse_attention(q, k, v, layout, config, plan.tuning)
    else:
        out, lse = block_sparse_attention_reference(q, k, v, layout, config.softmax_scale(q.shape[-1]))
    return (out, lse) if return_lse else out


def sale_attention(q: jax.Array, k: jax.Array, v: jax.Array, tau: jax.Array, config: SaleConfig = _DEFAULT_CONFIG,
                   return_lse: bool = False, return_layout: bool = False):
    """SALE attention: selection then block-sparse attention. Key sequences shorter than `config.dense_below`
    (by default the crossover of the backend the call runs, from the device's tuning table) run dense attention
    instead (their layout, when asked for, keeps every visible block).

    Queries longer than `config.resolved_query_chunk` run in chunks, each over the keys up to its end; the result
    equals an unchunked call's.

    Returns the output `[B, T, Hq, D]`, followed by the log-sum-exp `[B, Hq, T]` if `return_lse` and, if
    `return_layout`, the `BlockLayout` (a `ChunkedLayout` of one per chunk for a call in query chunks).
    """
    checks.check_qkv(q, k, v)
    tau = checks.check_tau(tau, q.shape[2])
    return _sale_attention(q, k, v, tau, config, plan_call(q, k, config), return_lse, return_layout)


def layout_grids(q, k, config: SaleConfig) -> list[BlockGrid]:
    """The grid of each layout `sale_attention(q, k, ...)` returns: the call's, or one per query chunk (shapes
    suffice: `q` and `k` may be `jax.ShapeDtypeStruct`s)."""
    query_offset = k.shape[1] - q.shape[1]
    return [BlockGrid(stop - start, query_offset + stop, config.block_q, config.block_k)
            for start, stop in plan_call(q, k, config).query_chunks]


@functools.partial(jax.jit, static_argnames=("config", "plan", "return_lse", "return_layout"))
def _sale_attention(q, k, v, tau, config: SaleConfig, plan: CallPlan, return_lse: bool, return_layout: bool):
    grid = _grid_for(q, k, config)
    if plan.dense:
        layout = BlockLayout.all_visible(q.shape[0], q.shape[2], grid)
        if return_lse:
            out, lse = _block_sparse_attention(q, k, v, layout, config, plan, True)
        else:
            out, lse = _dense_attention(q, k, v, config.scale, None), None
    elif len(plan.query_chunks) > 1:
        out, lse, layout = _chunked_sale_attention(q, k, v, tau, config, plan)
    else:
        layout = _select_blocks(q, k, tau, config, plan)
        out, lse = _block_sparse_attention(q, k, v, layout, config, plan, True)
    results = (out,) + ((lse,) if return_lse else ()) + ((layout,) if return_layout else ())
    return results[0] if len(results) == 1 else results


def _chunked_sale_attention(q, k, v, tau, config: SaleConfig, plan: CallPlan):
    """SALE over consecutive query chunks, each against the keys up to its last row. The whole call's smoothing
    means quantize every chunk, and chunks start on q-block boundaries, so each row meets the codes, thresholds
    and blocks it would unchunked. Returns the output, the log-sum-exp and the `ChunkedLayout`."""
    means = smoothing_means(q, k)
    query_offset = k.shape[1] - q.shape[1]
    outs, lses, layouts = [], [], []
    for start, stop in plan.query_chunks:
        q_chunk, k_chunk, v_chunk = q[:, start:stop], k[:, :query_offset + stop], v[:, :query_offset + stop]
        layout = _select_blocks(q_chunk, k_chunk, tau, config, plan, means)
        out, lse = _block_sparse_attention(q_chunk, k_chunk, v_chunk, layout, config, plan, True)
        outs.append(out)
        lses.append(lse)
        layouts.append(layout)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=2), ChunkedLayout(tuple(layouts))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None = None,
                    implementation: str | None = None) -> jax.Array:
    """Causal attention with queries at the end of the keys. GQA needs no repeat of K/V.

    By default: cuDNN flash attention on GPU for bf16/fp16 with `T == S`; our Pallas flash kernel over every
    visible block on GPU for `T < S` where its shape limits allow (cuDNN has no bottom-right causal mask here, and
    XLA would materialize the `[T, S]` scores); XLA elsewhere. `implementation` ("cudnn" or "xla") forces
    `jax.nn.dot_product_attention`'s.
    """
    checks.check_qkv(q, k, v)
    return _dense_attention(q, k, v, scale, implementation)


@functools.partial(jax.jit, static_argnames=("scale", "implementation"))
def _dense_attention(q, k, v, scale: float | None, implementation: str | None):
    q_len, kv_len = q.shape[1], k.shape[1]
    on_gpu_half = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    if implementation is None and on_gpu_half:
        config = SaleConfig(backend="triton", scale=scale)
        if q_len == kv_len:
            implementation = "cudnn"
        elif KERNEL_MODULES["triton"].unsupported(q, k, config) is None:
            layout = BlockLayout.all_visible(q.shape[0], q.shape[2], _grid_for(q, k, config))
            return _block_sparse_attention(q, k, v, layout, config, plan_call(q, k, config), False)
    # f32 inputs get f32 dots (XLA's GPU default would be TF32).
    with jax.default_matmul_precision("highest" if q.dtype == jnp.float32 else "default"):
        if q_len == kv_len:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=implementation)
        # Queries sit at the end of the keys: bottom-right-aligned causal mask.
        mask = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + (kv_len - q_len)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], scale=scale,
                                            implementation=implementation)
