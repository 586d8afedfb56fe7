"""SALE attention alone on a synthetic long sequence with LLM-like attention, against dense attention.

    python -m experiments.attention_demo                   # 8K tokens on whatever JAX sees (reference backend on CPU)
    python -m experiments.attention_demo --seq_len=32768 --backend=reference --output=/tmp/demo.json

Prints the sequence length, the density of kept blocks (per head and overall), the error of SALE's output
against dense attention, and wall-clock times (median of --repeats after a compile-and-warm-up call).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import sale_jax
from experiments.timing import median_seconds
from sale_jax import workloads

_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Tokens (queries = keys, causal).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads (GQA).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"],
                           "Input dtype; auto = bfloat16 on GPU, float32 elsewhere (CPUs have no fast bf16 dots).")
_TAU = flags.DEFINE_float("tau", sale_jax.DEFAULT_TAU, "Threshold for every head (0 = dense).")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "reference", "pallas"], "SALE backend.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after warm-up (median reported).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSON file for the results.")


def main(argv):
    del argv
    config = sale_jax.SaleConfig(backend=_BACKEND.value, dense_below=0)
    dtype = _DTYPE.value
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    work = workloads.llm_like_qkv(_SEED.value, _BATCH.value, _SEQ_LEN.value, _Q_HEADS.value, _KV_HEADS.value,
                                  _HEAD_DIM.value, dtype=jnp.dtype(dtype))
    q, k, v = work.q, work.k, work.v
    tau = jnp.full((_Q_HEADS.value,), _TAU.value, jnp.float32)

    out, layout = sale_jax.sale_attention(q, k, v, tau, config, return_layout=True)
    dense = sale_jax.dense_attention(q, k, v)
    diff = out.astype(jnp.float32) - dense.astype(jnp.float32)
    rows = _BATCH.value * _SEQ_LEN.value * _Q_HEADS.value
    mask = np.asarray(layout.to_mask())
    needles_kept = mask[np.arange(_BATCH.value)[:, None, None], np.arange(_Q_HEADS.value)[None, :, None],
                        np.asarray(work.needle_rows) // config.block_q, np.asarray(work.needle_keys) // config.block_k]

    sale_seconds = median_seconds(lambda: sale_jax.sale_attention(q, k, v, tau, config), _REPEATS.value, warmup=1)
    dense_seconds = median_seconds(lambda: sale_jax.dense_attention(q, k, v), _REPEATS.value, warmup=1)
    results = {
        "device": jax.devices()[0].device_kind,
        "backend": config.resolved_backend(),
        "shape": {"batch": _BATCH.value, "seq_len": _SEQ_LEN.value, "q_heads": _Q_HEADS.value,
                  "kv_heads": _KV_HEADS.value, "head_dim": _HEAD_DIM.value, "dtype": dtype},
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
    print(f"device {results['device']} | backend {results['backend']} | {dtype} | B={_BATCH.value} "
          f"Hq={_Q_HEADS.value} Hkv={_KV_HEADS.value} D={_HEAD_DIM.value}")
    print(f"sequence length       {_SEQ_LEN.value}")
    print(f"tau                   {_TAU.value}")
    print(f"kept-block density    {results['density']:.3f}  (per head {results['density_per_head']})")
    print(f"needle recall         {results['needle_recall']:.3f}")
    print(f"error vs dense        max |d| {results['max_abs_error']:.4f}, L1/row {results['l1_error_per_row']:.4f}, "
          f"relative L2 {results['relative_l2_error']:.4f}")
    print(f"time (median of {_REPEATS.value})   SALE {sale_seconds * 1e3:.1f} ms, dense {dense_seconds * 1e3:.1f} ms")
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
