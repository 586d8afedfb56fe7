"""Re-saves a Hugging Face Llama checkpoint in another dtype, optionally in shards (e.g. to commit a trained model).

    python -m experiments.export_checkpoint --checkpoint=build/retrieval_run \
        --output_dir=experiments/results/retrieval_model --dtype=bfloat16 --max_shard_mb=10
"""

from __future__ import annotations

import os

from absl import app, flags

from models import checkpoint

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Folder to read.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Weights' dtype.")
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 0.0, "Shard above this many MB (10^6 bytes); 0: one file.",
                                   lower_bound=0.0)


def main(argv):
    del argv
    if os.path.abspath(_CHECKPOINT.value) == os.path.abspath(_OUTPUT_DIR.value):
        raise ValueError("--output_dir must differ from --checkpoint")
    model = checkpoint.load_llama(_CHECKPOINT.value, dtype=_DTYPE.value)
    checkpoint.save_llama(model, _OUTPUT_DIR.value, max_shard_bytes=int(_MAX_SHARD_MB.value * 1e6) or None)
    for path in checkpoint.checkpoint_files(_OUTPUT_DIR.value):
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
    app.run(main)
