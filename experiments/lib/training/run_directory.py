"""A training run's folder. It holds:

- config.json and model.safetensors: the model, a Hugging Face checkpoint (`models.checkpoint.load_llama`, with
  dtype="float32" for the float32 weights);
- optimizer_state.safetensors and, with a look-back probe, lookback_probe.safetensors: the rest of the training
  state (`models.checkpoint.save_state`);
- train_state.json: the steps done, the curriculum position and the flags that define the run; written last, it
  names the files it was saved with;
- train_log.jsonl: one line per step.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from experiments.lib import results
from experiments.lib.training.step import Trainee
from models import checkpoint, llama

STATE_FILE = "train_state.json"
LOG_FILE = "train_log.jsonl"
OPTIMIZER_FILE = "optimizer_state.safetensors"
PROBE_FILE = "lookback_probe.safetensors"
PARAM_DTYPE = "float32"


def save(output_dir: str, trainee: Trainee, optimizer: nnx.Optimizer, train_state: dict) -> None:
    """The model, the probe and the optimizer state, then train_state.json (last: it says what was saved)."""
    checkpoint.save_llama(trainee.model, output_dir)
    written = [os.path.join(output_dir, "config.json"), *checkpoint.checkpoint_files(output_dir),
               os.path.join(output_dir, OPTIMIZER_FILE), os.path.join(output_dir, LOG_FILE)]
    if trainee.probe is not None:
        checkpoint.save_state(trainee.probe, os.path.join(output_dir, PROBE_FILE))
        written.append(os.path.join(output_dir, PROBE_FILE))
    checkpoint.save_state(optimizer, os.path.join(output_dir, OPTIMIZER_FILE))
    results.write(os.path.join(output_dir, STATE_FILE), train_state, None, files=written)


def start(output_dir: str) -> None:
    """Makes the folder of a fresh run, with an empty log; a folder that holds a run is refused."""
    if os.path.exists(os.path.join(output_dir, STATE_FILE)):
        raise ValueError(f"{output_dir} already holds a run: resume it, or give another output folder")
    os.makedirs(output_dir, exist_ok=True)
    open(os.path.join(output_dir, LOG_FILE), "w").close()


def saved_model(output_dir: str, run_flags: dict) -> tuple[llama.Llama, int]:
    """The saved model (float32) and the steps done, after checking that the saved run has these flags; the log
    loses the lines of steps trained after that save."""
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{output_dir} holds no run to resume (no {STATE_FILE})")
    with open(path) as f:
        saved = json.load(f)
    changed = {name: (saved["flags"].get(name), value) for name, value in run_flags.items()
               if saved["flags"].get(name) != value}
    if changed:
        raise ValueError(f"{output_dir} holds a run with other flags (saved, given): {changed}")
    _truncate_log(os.path.join(output_dir, LOG_FILE), saved["step"])
    return checkpoint.load_llama(output_dir, dtype=PARAM_DTYPE), saved["step"]


def restore(output_dir: str, trainee: Trainee, optimizer: nnx.Optimizer) -> None:
    """Sets the probe and the optimizer state in place from the folder's last save."""
    if trainee.probe is not None:
        checkpoint.restore_state(trainee.probe, os.path.join(output_dir, PROBE_FILE))
    checkpoint.restore_state(optimizer, os.path.join(output_dir, OPTIMIZER_FILE))


def _truncate_log(path: str, step: int) -> None:
    """Drops log lines past the save that a run resumes from (steps it trained after saving, then lost)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)
