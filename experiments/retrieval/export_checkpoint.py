r"""Re-saves a Hugging Face checkpoint of a supported family in another dtype, optionally in shards (e.g. to commit
a trained model).

    python -m experiments.retrieval.export_checkpoint --checkpoint=build/run \
        --output_dir=experiments/results/retrieval_training/h200/checkpoint --dtype=bfloat16

Beside the checkpoint's files it writes provenance.json: the command, commit and device that exported it, and the
folder it was read from.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments.lib import flags as common, results
from models import checkpoint

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Folder to read.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder to write.", required=True)
_DTYPE = common.define_dtype("bfloat16", "The weights' dtype.")
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 0.0, "Shard above this many MB (10^6 bytes); 0: one file.",
                                   lower_bound=0.0)
PROVENANCE_FILE = "provenance.json"


def main(argv):
    del argv
    if os.path.abspath(_CHECKPOINT.value) == os.path.abspath(_OUTPUT_DIR.value):
        raise ValueError("--output_dir must differ from --checkpoint")
    dtype = common.resolve_dtype(_DTYPE.value).name
    model = checkpoint.load_llama(_CHECKPOINT.value, dtype=dtype)
    checkpoint.save_llama(model, _OUTPUT_DIR.value, max_shard_bytes=int(_MAX_SHARD_MB.value * 1e6) or None)
    weights = checkpoint.checkpoint_files(_OUTPUT_DIR.value)
    for path in weights:
        print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")
    results.write(os.path.join(_OUTPUT_DIR.value, PROVENANCE_FILE), {"source": _CHECKPOINT.value, "dtype": dtype},
                  None, files=[os.path.join(_OUTPUT_DIR.value, "config.json"), *weights])


if __name__ == "__main__":
    app.run(main)
