"""Calibrates per-layer, per-head SALE thresholds and writes them to a thresholds file.

    python -m experiments.calibrate --output=/tmp/thresholds.json              # synthetic LLM-like layers
    python -m experiments.calibrate --output=t.json --seq_len=65536 --num_layers=32 --q_heads=32 --kv_heads=8

Until the Llama model can feed its own captured (q, k, v), each layer of each sample is an independent draw of
`sale_jax.workloads.llm_like_qkv`; one layer at a time is in memory, so long sequences stay within bounds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

import sale_jax
from sale_jax import calibration, workloads

_OUTPUT = flags.DEFINE_string("output", None, "Thresholds file to write (JSON).", required=True)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2, "Calibration samples.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Layers.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens per sample.")
_Q_HEADS = flags.DEFINE_integer("q_heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float16", "float32"],
                           "Input dtype; auto = bfloat16 on GPU, float32 elsewhere.")
_THETA = flags.DEFINE_float("theta", calibration.DEFAULT_THETA, "Per-row L1 error bound.")
_TAU0 = flags.DEFINE_float("tau0", sale_jax.DEFAULT_TAU, "Starting threshold.")
_TAU_MIN = flags.DEFINE_float("tau_min", calibration.DEFAULT_TAU_MIN, "Below this a head becomes dense.")
_BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "reference", "pallas"], "SALE backend (as at inference).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")


def synthetic_layer_samples(dtype):
    """Per sample, a generator over layers of fresh LLM-like (q, k, v)."""
    def layers(sample):
        for layer in range(_NUM_LAYERS.value):
            work = workloads.llm_like_qkv(_SEED.value * 1_000_003 + sample * 1009 + layer, 1, _SEQ_LEN.value,
                                          _Q_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, dtype=dtype)
            yield work.q, work.k, work.v

    return [layers(sample) for sample in range(_NUM_SAMPLES.value)]


def main(argv):
    del argv
    dtype = _DTYPE.value
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    config = sale_jax.SaleConfig(backend=_BACKEND.value)
    thresholds = sale_jax.calibrate(
        synthetic_layer_samples(jnp.dtype(dtype)), _NUM_LAYERS.value, _Q_HEADS.value, config, theta=_THETA.value,
        tau0=_TAU0.value, tau_min=_TAU_MIN.value, model_name=f"synthetic-llm-like-{_SEQ_LEN.value}")
    thresholds.save(_OUTPUT.value)
    print(f"wrote {_OUTPUT.value}: tau [{thresholds.num_layers}, {thresholds.num_q_heads}], "
          f"{int((thresholds.tau == 0).sum())} dense heads")


if __name__ == "__main__":
    app.run(main)
