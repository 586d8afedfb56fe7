"""SALE attention alone on a synthetic long sequence with LLM-like attention, against dense attention.

    python -m experiments.tools.attention_demo            # 8K tokens on whatever JAX sees (reference backend on CPU)
    python -m experiments.tools.attention_demo --seq_len=32768 --backend=reference --output=/tmp/demo.json

Prints the sequence length, the density of kept blocks (per head and overall), the error of SALE's output
against dense attention, and wall-clock times (median of --repeats after a compile-and-warm-up call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import sale_jax
from experiments.lib import flags as common, results, workloads
from experiments.lib.timing import median_seconds

_SEQ_LEN = common.define_seq_len(8192, "Tokens (queries = keys, causal).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = common.HeadFlags.define(q_heads=8, kv_heads=2, head_dim=128)
_DTYPE = common.define_dtype("auto")
_SALE = common.SaleFlags.define(backend="auto")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for every head (0 = dense).")
_REPEATS = common.define_repeats(3)
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_OUTPUT = common.define_output(required=False)


def main(argv):
    del argv
    config = _SALE.config(dense_below=0)
    dtype = common.resolve_dtype(_DTYPE.value).name
    q_heads, kv_heads, head_dim = _HEADS.values()
    work = workloads.llm_like_qkv(_SEED.value, _BATCH.value, _SEQ_LEN.value, q_heads, kv_heads, head_dim,
                                  dtype=dtype)
    q, k, v = work.q, work.k, work.v
    tau = jnp.full((q_heads,), _TAU.value, jnp.float32)

    out, layout = sale_jax.sale_attention(q, k, v, tau, config, return_layout=True)
    dense = sale_jax.dense_attention(q, k, v)
    diff = out.astype(jnp.float32) - dense.astype(jnp.float32)
    rows = _BATCH.value * _SEQ_LEN.value * q_heads
    mask = np.asarray(layout.to_mask())
    needles_kept = mask[np.arange(_BATCH.value)[:, None, None], np.arange(q_heads)[None, :, None],
                        np.asarray(work.needle_rows) // config.block_q, np.asarray(work.needle_keys) // config.block_k]

    sale_seconds = median_seconds(lambda: sale_jax.sale_attention(q, k, v, tau, config), _REPEATS.value, warmup=1)
    dense_seconds = median_seconds(lambda: sale_jax.dense_attention(q, k, v), _REPEATS.value, warmup=1)
    summary = {
        "backend": config.resolved_backend(),
        "shape": {"batch": _BATCH.value, "seq_len": _SEQ_LEN.value, "q_heads": q_heads, "kv_heads": kv_heads,
                  "head_dim": head_dim, "dtype": dtype},
        "tau": _TAU.value,
        "density": float(layout.density()),
        "density_per_head": [round(float(d), 4) for d in layout.density_per_head()],
        "needle_recall": float(needles_kept.mean()),
        "max_abs_error": float(jnp.abs(diff).max()),
        "l1_error_per_row": float(jnp.abs(diff).sum() / rows),
        "relative_l2_error": float(jnp.linalg.norm(diff) / jnp.linalg.norm(dense.astype(jnp.float32))),
        "sale_seconds_median": sale_seconds,
        "dense_seconds_median": dense_seconds,
        "repeats": _REPEATS.value,
    }
    print(f"device {jax.devices()[0].device_kind} | backend {summary['backend']} | {dtype} | B={_BATCH.value} "
          f"Hq={q_heads} Hkv={kv_heads} D={head_dim}")
    print(f"sequence length       {_SEQ_LEN.value}")
    print(f"tau                   {_TAU.value}")
    print(f"kept-block density    {summary['density']:.3f}  (per head {summary['density_per_head']})")
    print(f"needle recall         {summary['needle_recall']:.3f}")
    print(f"error vs dense        max |d| {summary['max_abs_error']:.4f}, L1/row {summary['l1_error_per_row']:.4f}, "
          f"relative L2 {summary['relative_l2_error']:.4f}")
    print(f"time (median of {_REPEATS.value})   SALE {sale_seconds * 1e3:.1f} ms, dense {dense_seconds * 1e3:.1f} ms")
    if _OUTPUT.value:
        results.write(_OUTPUT.value, summary, config)


if __name__ == "__main__":
    app.run(main)
