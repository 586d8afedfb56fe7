"""Every experiment script runs end to end at tiny sizes on a CPU and writes its results with their provenance.

Without a GPU the Pallas kernels run in interpret mode (--interpret), so the GPU-only scripts run too; on a GPU
they run natively. Smoke runs share Python
processes, which compile the same programs once: `python tests/test_experiments.py OUTPUT_DIR MODULE...` runs the
named scripts one after another, each as `python -m` would, with only its own flags defined. Two such processes
(the scripts on synthetic attention inputs, the others) and the main job's own command, `python -m
experiments.demo`, run side by side; each test then reads what its script wrote.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
import traceback

import jax
import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
# One shape for every script on synthetic attention inputs (compiled once: the workload generator, the passes),
# which the Mosaic GPU kernels take too (bf16, head_dim 64).
ATTENTION_SHAPE = ("--q_heads=2", "--kv_heads=1", "--head_dim=64", "--dtype=bfloat16")
KERNELS = () if jax.default_backend() == "gpu" else ("--interpret",)
# The retrieval model's smoke runs train and load LlamaConfig.tiny's shapes (its initializers compile once).
TINY_LLAMA = ("--hidden_size=64", "--intermediate_size=128", "--num_heads=4", "--num_kv_heads=2", "--head_dim=16")
# Per entry point, its flags (`{out}`: the run's output folder; `{checkpoint}`: a tiny random Llama) and the file
# whose provenance and keys are checked.
SMOKE_RUNS = {
    "experiments.benchmarks.attention": (
        (*ATTENTION_SHAPE, *KERNELS, "--backend=triton", "--lengths=256", "--taus=0.1", "--densities=0.9",
         "--repeats=1", "--output={out}/attention.json"), "attention.json"),
    "experiments.benchmarks.triton_passes": (
        (*ATTENTION_SHAPE, *KERNELS, "--backend=triton", "--lengths=256", "--densities=0.5", "--repeats=1",
         "--output={out}/triton_passes.json"), "triton_passes.json"),
    "experiments.benchmarks.kernel_sweep": (
        (*ATTENTION_SHAPE, *KERNELS, "--lengths=256", "--selection=128:4:2", "--attention=4:2",
         "--mosaic_attention=128:2", "--densities=0.5", "--repeats=1", "--output={out}/kernel_sweep.json"),
        "kernel_sweep.json"),
    "experiments.benchmarks.estimate_kernel": (
        (*ATTENTION_SHAPE[:3], *KERNELS, "--lengths=256", "--block_q=64",
         "--sink_tokens=32", "--local_tokens=64", "--variants=kernel,no_dots,pipeline_only", "--repeats=1",
         "--output={out}/estimate_kernel.json"), "estimate_kernel.json"),
    "experiments.benchmarks.selection_passes": (
        (*ATTENTION_SHAPE, *KERNELS, "--lengths=512", "--block_q=64", "--sink_tokens=32", "--local_tokens=64",
         "--repeats=1", "--output={out}/selection_passes.json"), "selection_passes.json"),
    "experiments.benchmarks.model": (  # a family other than Llama, from its transformers fixture
        (f"--checkpoint={REPOSITORY / 'tests' / 'fixtures' / 'tiny_qwen2'}", "--seq_len=128", "--backend=reference",
         "--repeats=1", "--warmup=1", "--output={out}/model.json"), "model.json"),
    "experiments.benchmarks.long_context": (
        (*ATTENTION_SHAPE, "--backend=reference", "--lengths=512", "--block_q=64", "--query_chunk=256",
         "--bisection_steps=2", "--repeats=1", "--output={out}/long_context.json"), "long_context.json"),
    "experiments.accuracy.validate_gpu": (
        (*ATTENTION_SHAPE, *KERNELS, "--backend=triton", "--lengths=256", "--output={out}/validate_gpu.json"),
        "validate_gpu.json"),
    "experiments.accuracy.frontier": (
        (*ATTENTION_SHAPE, "--backend=reference", "--seq_len=256", "--taus=0.1", "--thetas=0.4",
         "--budget_densities=0.3", "--topk_fractions=0.3", "--xattention_thresholds=0.9", "--strides=8",
         "--output={out}/frontier.json"),
        "frontier.json"),
    "experiments.accuracy.estimate_candidates": (
        (*ATTENTION_SHAPE, "--seq_len=256", "--taus=0.1", "--ranks=16", "--strengths=1",
         "--output={out}/estimate_candidates.json"),
        "estimate_candidates.json"),
    "experiments.accuracy.retrieval_eval": (
        ("--checkpoint={checkpoint}", "--backend=reference", "--lengths=128", "--depths=0,1", "--sequences=2",
         "--num_records=2", "--num_queries=1", "--calibration_samples=1", "--calibration_length=128",
         "--uniform_taus=0.1", "--output={out}/retrieval_eval.json"), "retrieval_eval.json"),
    "experiments.retrieval.train": (
        ("--output_dir={out}", *TINY_LLAMA, "--num_layers=1", "--curriculum=64:2", "--tokens_per_step=128",
         "--num_records=2", "--num_queries=1", "--warmup_steps=1", "--data_workers=0", "--eval_lengths=64",
         "--eval_sequences=2"),
        "eval.json"),
    "experiments.retrieval.export_checkpoint": (
        ("--checkpoint={checkpoint}", "--output_dir={out}", "--dtype=bfloat16"), "provenance.json"),
    "experiments.tools.attention_demo": (
        (*ATTENTION_SHAPE, "--backend=reference", "--seq_len=256", "--repeats=1",
         "--output={out}/attention_demo.json"), "attention_demo.json"),
    "experiments.tools.calibrate": (
        (*ATTENTION_SHAPE, "--backend=reference", "--seq_len=256", "--num_layers=1", "--num_samples=1",
         "--output={out}/thresholds.json"), "thresholds.json"),
}
# What each script's output must hold besides its provenance (calibrate writes a thresholds file, which records
# its own provenance: model, theta and SaleConfig).
EXPECTED_KEYS = {
    "experiments.benchmarks.attention": {"lengths", "computation_kernel", "dense_baseline", "files"},
    "experiments.benchmarks.triton_passes": {"lengths", "dense_baseline", "tau"},
    "experiments.benchmarks.kernel_sweep": {"ms"},
    "experiments.benchmarks.estimate_kernel": {"lengths", "launch", "codes"},
    "experiments.benchmarks.selection_passes": {"lengths", "dense_baseline", "target_density"},
    "experiments.benchmarks.model": {"prefill_ms", "per_layer", "prefill_memory_bytes"},
    "experiments.benchmarks.long_context": {"lengths", "dense_baseline", "shape"},
    "experiments.accuracy.validate_gpu": {"rows", "tau", "shape"},
    "experiments.accuracy.frontier": {"points", "shape", "files"},
    "experiments.accuracy.estimate_candidates": {"points", "adversarial", "certified", "shape", "files"},
    "experiments.accuracy.retrieval_eval": {"cells", "thresholds", "files"},
    "experiments.retrieval.train": {"step", "results"},
    "experiments.retrieval.export_checkpoint": {"source", "dtype", "files"},
    "experiments.tools.attention_demo": {"density", "needle_recall", "relative_l2_error"},
    "experiments.tools.calibrate": {"format", "tau", "config"},
}
DEMO_ARGV = ("--seq_len=512", "--new_tokens=2", "--repeats=1", "--backend=reference")
PROVENANCE_KEYS = {"commit", "dirty", "command", "device", "jax_version", "sale_config", "recorded"}


def entry_points() -> set[str]:
    """Every module under experiments/ that runs as a script (it calls `app.run(main)`)."""
    found = set()
    for path in (REPOSITORY / "experiments").rglob("*.py"):
        if "app.run(main)" in path.read_text():
            found.add(".".join(path.relative_to(REPOSITORY).with_suffix("").parts))
    return found


def _run_in_this_process(module_name: str, argv: list[str]) -> None:
    """Runs `module_name`'s main as `python -m module_name *argv` would; afterwards its flags and the module are
    dropped, so that the next script can define flags of the same names."""
    from absl import flags

    known = set(flags.FLAGS)
    module = importlib.import_module(module_name)
    saved_argv = sys.argv
    sys.argv = [module.__file__, *argv]  # what `python -m` sets; the result writer reads the command from it
    try:
        flags.FLAGS(sys.argv)
        module.main(sys.argv[:1])
    finally:
        sys.argv = saved_argv
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - known:
            delattr(flags.FLAGS, name)
        del sys.modules[module_name]


def _tiny_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    from flax import nnx

    from models import checkpoint, llama
    from models.config import LlamaConfig

    checkpoint.save_llama(llama.Llama(LlamaConfig.tiny(), nnx.Rngs(0)), folder)
    return folder


def _register_pallas_options() -> None:
    """Pallas' first interpret-mode call imports modules that add an option to JAX's tracing context, which changes
    every later jit cache key. Made here, before the first smoke run, it lets the runs share compiled programs."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=True)(jnp.zeros((8, 128)))


def run_smoke_runs(output: pathlib.Path, module_names: list[str]) -> None:
    """Runs these smoke runs one after another, each into `output/<module>/`, and writes there `status.txt`: "ok",
    or how it failed."""
    _register_pallas_options()
    checkpoint = output / f"tiny_checkpoint_{os.getpid()}"
    if any("--checkpoint={checkpoint}" in SMOKE_RUNS[name][0] for name in module_names):
        _tiny_checkpoint(checkpoint)
    for module_name in module_names:
        out = output / module_name
        out.mkdir()
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            argv = [arg.format(out=out, checkpoint=checkpoint) for arg in SMOKE_RUNS[module_name][0]]
            _run_in_this_process(module_name, argv)
            status = "ok"
        except BaseException:  # SystemExit included: a script that exits has failed its smoke run
            status = traceback.format_exc()
            print(status, file=sys.stderr, flush=True)
        (out / "status.txt").write_text(status)
        print(f"smoke run {module_name}: {time.perf_counter() - start:.1f} s ({time.process_time() - start_cpu:.1f} s "
              "of CPU)", file=sys.stderr, flush=True)


def _start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
    # Tiny inputs: compiling is nearly all of a smoke run's time, and XLA's CPU backend compiles faster without
    # its LLVM optimizations (what runs is the same computation).
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = " ".join([environment.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                         "--xla_llvm_disable_expensive_passes=true"]).strip()
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=f, stderr=subprocess.STDOUT,
                                text=True)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Starts the smoke runs in two processes (the scripts on synthetic attention inputs, which share their
    compiled programs; the others) and the demo's command beside them, so that two cores both work; waits for all
    three. Yields the output folder."""
    output = tmp_path_factory.mktemp("smoke_runs")
    synthetic = [name for name, (argv, _) in SMOKE_RUNS.items() if set(ATTENTION_SHAPE) <= set(argv)]
    groups = (synthetic, [name for name in SMOKE_RUNS if name not in synthetic])
    processes = [_start([sys.executable, __file__, str(output), *group], output / f"group_{index}.log")
                 for index, group in enumerate(groups)]
    demo_output = output / "experiments.demo" / "demo.json"
    demo_output.parent.mkdir()
    demo_argv = [*DEMO_ARGV, f"--output={demo_output}"]
    processes.append(_start([sys.executable, "-m", "experiments.demo", *demo_argv], demo_output.parent / "log.txt"))
    try:
        for process in processes:
            process.wait(timeout=900)
    finally:
        for process in processes:
            process.kill()
    (demo_output.parent / "status.txt").write_text(
        "ok" if processes[-1].returncode == 0 else (demo_output.parent / "log.txt").read_text()[-5000:])
    for index, group in enumerate(groups):
        if processes[index].returncode:
            log = (output / f"group_{index}.log").read_text()[-5000:]
            for name in group:
                if not (output / name / "status.txt").exists():
                    (output / name).mkdir(exist_ok=True)
                    (output / name / "status.txt").write_text(f"not finished: the smoke runs' process failed\n{log}")
    yield output


def _check_provenance(record: dict, module_name: str) -> None:
    provenance = record["provenance"]
    assert set(provenance) == PROVENANCE_KEYS, provenance
    assert provenance["command"].startswith(f"python -m {module_name} "), provenance["command"]
    assert provenance["recorded"] == "by the script" and provenance["device"] and provenance["jax_version"]
    assert provenance["commit"] == "unknown" or len(provenance["commit"]) == 40


def test_every_script_has_a_smoke_run():
    assert entry_points() == set(SMOKE_RUNS) | {"experiments.demo"}
    assert set(EXPECTED_KEYS) == set(SMOKE_RUNS)


def test_every_committed_result_records_its_provenance():
    """Each JSON under experiments/results has a provenance block, or is named (like every plot, log and
    checkpoint file) in the `files` of a JSON beside it that has one."""
    results = REPOSITORY / "experiments" / "results"
    named, unexplained = set(), []
    for path in results.rglob("*.json"):
        record = json.loads(path.read_text())
        if "provenance" in record:
            assert set(record["provenance"]) == PROVENANCE_KEYS, path
            named |= {path.parent / name for name in record.get("files", [])}
    for path in results.rglob("*"):
        if path.is_file() and path.suffix != ".md" and path not in named:
            record = json.loads(path.read_text()) if path.suffix == ".json" else {}
            if "provenance" not in record:
                unexplained.append(str(path.relative_to(results)))
    assert not unexplained, f"results without provenance: {unexplained}"


@pytest.mark.parametrize("module_name", sorted(SMOKE_RUNS))
def test_smoke_run(smoke_runs, module_name):
    out = smoke_runs / module_name
    status = (out / "status.txt").read_text()
    assert status == "ok", status
    record = json.loads((out / SMOKE_RUNS[module_name][1]).read_text())
    assert EXPECTED_KEYS[module_name] <= set(record), sorted(record)
    for name in record.get("files", []):
        assert (out / name).exists(), f"{module_name} names {name} beside its JSON, but did not write it"
    if module_name == "experiments.tools.calibrate":
        assert len(record["tau"]) == 1 and len(record["tau"][0]) == 2
        return
    _check_provenance(record, module_name)
    if module_name == "experiments.retrieval.train":
        _check_provenance(json.loads((out / "train_state.json").read_text()), module_name)
    if module_name == "experiments.accuracy.validate_gpu":
        assert all(row["selection_ok"] for row in record["rows"]), record["rows"]
    if module_name == "experiments.benchmarks.model":
        assert record["family"] == "qwen2" and len(record["per_layer"]) == record["layers"]
    if module_name == "experiments.benchmarks.estimate_kernel":
        assert record["lengths"]["256"]["check"]["values_ok"]
        assert set(record["lengths"]["256"]["variants"]) == {"kernel", "no_dots", "pipeline_only"}
    if module_name == "experiments.benchmarks.selection_passes":
        assert set(record["lengths"]["512"]["passes"]) == {"quantize", "row_thresholds", "estimate", "compact_hits"}


def test_demo_runs_as_a_command(smoke_runs):
    out = smoke_runs / "experiments.demo"
    status = (out / "status.txt").read_text()
    assert status == "ok", status
    record = json.loads((out / "demo.json").read_text())
    _check_provenance(record, "experiments.demo")
    assert record["provenance"]["command"] == shlex.join(
        ["python", "-m", "experiments.demo", *DEMO_ARGV, f"--output={out / 'demo.json'}"])
    assert record["provenance"]["sale_config"]["dense_below"] == 0
    # By default: the committed retrieval model answering fresh questions, dense and SALE side by side.
    assert {"density_per_layer", "dense_exact_match", "sale_exact_match", "questions"} <= set(record)
    assert len(record["questions"]) == len(record["true_answers"]) == len(record["sale_answers"]) == 2 * 4
    for method in ("dense", "sale"):
        matches = [got == want for got, want in zip(record[f"{method}_answers"], record["true_answers"])]
        assert record[f"{method}_exact_match"] == sum(matches) / len(matches)


if __name__ == "__main__":
    sys.path.insert(0, str(REPOSITORY))
    run_smoke_runs(pathlib.Path(sys.argv[1]), sys.argv[2:])
