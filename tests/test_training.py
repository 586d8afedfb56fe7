"""The training library (experiments/lib/training): a tiny Llama learns a mixture of two toy tasks, a run stopped and
resumed trains bit for bit what an uninterrupted one does, the curriculum's replay and placement draws, task
mixtures, the look-back probe's loss against numpy, and the errors for bad configurations.

Every run here has one model shape, length, batch and recipe, so the train step compiles once for the module.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from experiments.lib import batch_prefetch
from experiments.lib.training import curriculum, loop, run_directory, step, tasks
from experiments.lib.training.lookback_probe import LookbackProbe
from experiments.lib.training.optimizer import OptimizerConfig, make_optimizer
from experiments.retrieval.task import RetrievalTask
from models import checkpoint, llama
from models.config import LlamaConfig

# The probe's loss is checked against numpy in f32, so matmuls run in full f32 on a GPU too.
pytestmark = pytest.mark.usefixtures("exact_f32_matmuls")

MODEL = LlamaConfig.tiny(num_layers=1, rope_scaling=None)


@dataclasses.dataclass(frozen=True)
class MarkedAnswer:
    """Random lowercase filler, then `marker` and `answer`: the answer's first token follows from the marker alone
    and the rest from the tokens before them, so a tiny model learns it in a few steps."""
    marker: bytes
    answer: bytes

    def min_length(self) -> int:
        return 1 + len(self.marker) + len(self.answer)

    def draw(self, rng, length, depth):
        del depth  # nothing to place
        tail = np.frombuffer(self.marker + self.answer, np.uint8)
        tokens = rng.integers(ord("a"), ord("z") + 1, length)
        tokens[length - len(tail):] = tail
        loss_mask = np.zeros(length, np.float32)
        loss_mask[length - len(self.answer) - 1:length - 1] = 1
        filler_mask = np.zeros(length, np.float32)
        filler_mask[:length - len(tail) - 1] = 1
        return tasks.Example(tokens, loss_mask, filler_mask)


TOY_MIXTURE = tasks.TaskMixture((MarkedAnswer(b"=", b"ok"), MarkedAnswer(b"?", b"yes")), (1.0, 3.0))


def _recipe(seed: int, **changes) -> loop.Recipe:
    recipe = loop.Recipe(TOY_MIXTURE, curriculum.Curriculum(((32, 16),), tokens_per_step=256),
                         OptimizerConfig(learning_rate=1e-2, warmup_steps=2), step.LossConfig(0.5, 1, 1.0),
                         compute_dtype="float32", seed=seed)
    return dataclasses.replace(recipe, **changes)


def _train(recipe, output_dir, **options):
    return loop.train(recipe, str(output_dir), lambda: llama.Llama(MODEL, nnx.Rngs(recipe.seed)),
                      {"seed": recipe.seed}, **options)


def _log(output_dir):
    with open(output_dir / run_directory.LOG_FILE) as f:
        return [json.loads(line) for line in f]


def _timeless(log):
    return [{name: value for name, value in entry.items() if name != "seconds"} for entry in log]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason=(
    "bit-for-bit resumption needs deterministic training: on a GPU the cuDNN attention backward and scatter-adds "
    "reduce in varying order"))
def test_a_tiny_model_learns_a_task_mixture_and_resumes_bit_for_bit(tmp_path, rng):
    recipe = _recipe(int(rng.integers(1000)))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _train(recipe, straight, save_every=100).finished
    stopped = _train(recipe, interrupted, time_limit_s=1e-9)  # stops, and saves, after its first step
    assert (stopped.steps_done, stopped.finished) == (1, False)
    with open(interrupted / run_directory.LOG_FILE, "a") as log:  # a step trained after the save, then lost
        log.write(json.dumps({"step": 2, "loss": 0.0}) + "\n")
    assert _train(recipe, interrupted, resume=True).steps_done == 16

    log = _log(straight)
    assert [entry["step"] for entry in log] == list(range(1, 17))
    assert {(entry["length"], entry["batch_size"]) for entry in log} == {(32, 8)}
    # From about ln 256 to near 0. Telling the tasks apart shows in the first answer tokens: one guess for both
    # would be right on 3 rows in 4.
    assert log[0]["loss"] > 4 and max(entry["loss"] for entry in log[-3:]) < 0.1 * log[0]["loss"]
    assert log[-1]["accuracy"] > 0.9 and log[-1]["first_token_accuracy"] > 0.9
    assert all(entry["filler_loss"] > 0 and entry["lookback_loss"] > 0 for entry in log)

    assert _timeless(_log(interrupted)) == _timeless(log)
    for name in ("model.safetensors", run_directory.OPTIMIZER_FILE, run_directory.PROBE_FILE):
        want, got = load_file(straight / name), load_file(interrupted / name)
        assert set(want) == set(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    state = json.loads((interrupted / run_directory.STATE_FILE).read_text())
    assert (state["step"], state["stage"], state["length"], state["stage_step"]) == (16, 0, 32, 16)


def test_a_run_folder_is_neither_reused_nor_resumed_under_other_flags(tmp_path):
    run_directory.start(str(tmp_path))
    trainee = step.Trainee.create(llama.Llama(MODEL, nnx.Rngs(0)), step.LossConfig(), seed=0)
    run_directory.save(str(tmp_path), trainee, make_optimizer(trainee, OptimizerConfig(), 1000),
                       {"step": 3, "flags": {"seed": 0, "learning_rate": 1e-3}})
    with pytest.raises(ValueError, match="already holds a run"):
        run_directory.start(str(tmp_path))
    with pytest.raises(ValueError, match=r"other flags \(saved, given\).*learning_rate.*0.001, 0.5"):
        run_directory.saved_model(str(tmp_path), {"seed": 0, "learning_rate": 0.5})
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        run_directory.saved_model(str(tmp_path / "elsewhere"), {})
    model, steps_done = run_directory.saved_model(str(tmp_path), {"seed": 0, "learning_rate": 1e-3})
    assert steps_done == 3 and model.config == MODEL


def test_restoring_state_refuses_another_objects_file(tmp_path):
    path = tmp_path / "probe.safetensors"
    probe = LookbackProbe(16, 7, 2, nnx.Rngs(0))
    checkpoint.save_state(probe, path)
    restored = LookbackProbe(16, 7, 2, nnx.Rngs(1))
    checkpoint.restore_state(restored, path)
    for (name, want), (_, got) in zip(nnx.to_flat_state(nnx.state(probe)), nnx.to_flat_state(nnx.state(restored))):
        np.testing.assert_array_equal(got.get_value(), want.get_value(), err_msg=str(name))
    with pytest.raises(ValueError, match=r"readout/kernel is float32\[16, 14\], but this LookbackProbe holds "
                                         r"float32\[16, 21\] there"):
        checkpoint.restore_state(LookbackProbe(16, 7, 3, nnx.Rngs(0)), path)
    with pytest.raises(ValueError, match=r"not hold this Optimizer's state: missing \['step'\], unexpected "
                                         r"\['norm/weight', 'readout/kernel'\]"):
        checkpoint.restore_state(nnx.Optimizer(probe, optax.sgd(0.1), wrt=nnx.Param), path)


def test_a_mixture_draws_each_row_from_a_task_by_weight_the_same_on_every_call(rng):
    mixture = tasks.TaskMixture((MarkedAnswer(b"=", b"ok"), RetrievalTask(num_records=2, num_queries=1)), (1.0, 3.0))
    seed, depth = int(rng.integers(1000)), float(rng.uniform())
    batches = [mixture.batch(seed, step_index, 8, 64, depth) for step_index in range(200)]
    again = mixture.batch(seed, 7, 8, 64, depth)
    for field in tasks.Batch._fields:
        np.testing.assert_array_equal(getattr(again, field), getattr(batches[7], field))
    assert not np.array_equal(batches[0].tokens, batches[1].tokens)
    task_index = np.concatenate([batch.task_index for batch in batches])
    assert abs(np.mean(task_index == 0) - 0.25) < 0.06  # weights 1 : 3 over 1,600 rows
    # Row i is what its task draws from the i-th child of (seed, 0, step), whichever tasks the other rows drew.
    for step_index, batch in enumerate(batches[:10]):
        assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == batch.filler_mask.dtype == np.float32
        rows = np.random.SeedSequence((seed, 0, step_index)).spawn(8)
        for row, index, tokens, loss_mask in zip(rows, batch.task_index, batch.tokens, batch.loss_mask):
            want = mixture.tasks[index].draw(np.random.default_rng(row), 64, depth)
            np.testing.assert_array_equal(tokens, want.tokens)
            np.testing.assert_array_equal(loss_mask, want.loss_mask)


def test_batches_built_in_worker_processes_are_the_same(rng):
    mixture = tasks.TaskMixture.of(RetrievalTask(num_records=2, num_queries=1))
    plans = curriculum.Curriculum(((64, 2), (96, 2)), 256, replay_fraction=0.5, placed_fraction=0.5)
    seed = int(rng.integers(1000))

    def arguments(step_index):
        plan = plans.plan(step_index, seed)
        return mixture, seed, step_index, plan.batch_size, plan.length, plan.depth

    with batch_prefetch.BatchPrefetcher(tasks.draw_batch, arguments, 4, workers=1) as prefetched:
        built = [prefetched.get(step_index) for step_index in range(4)]
    for step_index, batch in enumerate(built):
        want = tasks.draw_batch(*arguments(step_index))
        for field in tasks.Batch._fields:
            np.testing.assert_array_equal(getattr(batch, field), getattr(want, field))


def test_replay_trains_some_steps_at_earlier_lengths_the_same_on_every_call(rng):
    seed = int(rng.integers(1000))
    plans = curriculum.Curriculum(((128, 50), (256, 50), (512, 400)), 1024, replay_fraction=0.25)
    lengths = [plans.length_at(step_index, seed) for step_index in range(500)]
    assert lengths == [plans.length_at(step_index, seed) for step_index in range(500)]
    assert lengths[:50] == [128] * 50  # nothing earlier to replay in the first stage
    assert set(lengths[50:100]) == {128, 256}
    last = np.array(lengths[100:])
    assert set(last) == {128, 256, 512}
    assert 0.18 < np.mean(last != 512) < 0.32  # a quarter replayed, split between the two earlier stages
    assert [plans.plan(step_index, seed).batch_size for step_index in range(500)] == [1024 // n for n in lengths]
    unreplayed = dataclasses.replace(plans, replay_fraction=0.0)
    assert [unreplayed.length_at(step_index, seed) for step_index in range(500)] == (
        [128] * 50 + [256] * 50 + [512] * 400)


def test_placement_puts_some_steps_answers_at_a_depth_the_same_on_every_call(rng):
    seed = int(rng.integers(1000))
    plans = curriculum.Curriculum(((128, 2000),), 128, placed_fraction=0.4)
    depths = [plans.depth_at(step_index, seed) for step_index in range(2000)]
    assert depths == [plans.depth_at(step_index, seed) for step_index in range(2000)]
    placed = np.array([depth for depth in depths if depth is not None])
    assert 0.35 < len(placed) / len(depths) < 0.45
    assert np.all((placed >= 0) & (placed <= 1))
    at_ends = np.isin(placed, (0.0, 1.0))
    assert 0.4 < np.mean(at_ends) < 0.6 and 0.4 < np.mean(placed[at_ends]) < 0.6  # half at the ends, both ends
    assert len(set(placed[~at_ends])) == np.sum(~at_ends)  # the rest drawn from a continuum
    unplaced = dataclasses.replace(plans, placed_fraction=0.0)
    assert all(unplaced.depth_at(step_index, seed) is None for step_index in range(100))


def test_stages_and_positions():
    plans = curriculum.Curriculum(curriculum.parse_stages(["256:3", "1024:2"]), tokens_per_step=2048)
    assert plans.stages == ((256, 3), (1024, 2)) and plans.total_steps == 5 and plans.lengths == (256, 1024)
    assert [plans.stage_at(step_index) for step_index in range(5)] == [(0, 256)] * 3 + [(1, 1024)] * 2
    assert [plans.plan(step_index, 0) for step_index in (0, 4)] == [(256, 8, None), (1024, 2, None)]
    assert plans.position(3) == {"stage": 0, "length": 256, "stage_step": 3}
    assert plans.position(4) == {"stage": 1, "length": 1024, "stage_step": 1}
    assert curriculum.batch_size_for(4096, 2048) == 1
    with pytest.raises(ValueError, match="outside the curriculum's 5 steps"):
        plans.stage_at(5)


def test_lookback_probe_loss_matches_numpy(rng):
    batch, length, hidden, vocab, back = 2, 9, 16, 7, 3
    probe = LookbackProbe(hidden, vocab, back, nnx.Rngs(int(rng.integers(1000))))
    probe.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, hidden), jnp.float32)
    residual = rng.standard_normal((batch, length, hidden)).astype(np.float32)
    tokens = rng.integers(0, vocab, (batch, length))
    got = float(nnx.jit(LookbackProbe.loss)(probe, jnp.asarray(residual), jnp.asarray(tokens)))

    x = residual.astype(np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.asarray(probe.norm.weight[...])
    logits = (normed @ np.asarray(probe.readout.kernel[...], np.float64)).reshape(batch, length, back, vocab)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.mean([np.mean([-log_probs[b, t, j - 1, tokens[b, t - j]] for b in range(batch)
                             for t in range(j, length)]) for j in range(1, back + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class BrokenTask:
    """Draws what a task must not: `fault` "length" (one token short) or "no_answer" (an empty loss mask)."""
    fault: str

    def min_length(self) -> int:
        return 4

    def draw(self, rng, length, depth):
        example = MarkedAnswer(b"=", b"ok").draw(rng, length, depth)
        if self.fault == "length":
            return tasks.Example(*(field[1:] for field in example))
        return example._replace(loss_mask=np.zeros(length, np.float32))


@pytest.mark.parametrize("make,error,message", [
    (lambda: curriculum.Curriculum((), 256), ValueError, "no stages"),
    (lambda: curriculum.Curriculum(((256, 0),), 256), ValueError, "steps >= 1"),
    (lambda: curriculum.Curriculum(((256, 5),), 0), ValueError, "tokens_per_step"),
    (lambda: curriculum.Curriculum(((256, 5),), 256, replay_fraction=1.5), ValueError, "replay_fraction"),
    (lambda: curriculum.parse_stages(["256"]), ValueError, "LENGTH:STEPS"),
    (lambda: tasks.TaskMixture((), ()), ValueError, "at least one task"),
    (lambda: tasks.TaskMixture(TOY_MIXTURE.tasks, (1.0,)), ValueError, "one weight per task"),
    (lambda: tasks.TaskMixture(TOY_MIXTURE.tasks, (1.0, 0.0)), ValueError, "weights must be finite and > 0"),
    (lambda: OptimizerConfig(learning_rate=0.0), ValueError, "learning_rate"),
    (lambda: OptimizerConfig(betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda: step.LossConfig(lookback_tokens=-1), ValueError, "lookback_tokens"),
    (lambda: _recipe(0, tasks="single needle"), TypeError, "'single needle' is not a task"),
    (lambda: _recipe(0, curriculum=curriculum.Curriculum(((3, 16),), 256)), ValueError,
     r"curriculum: length 3 is too short for MarkedAnswer\(marker=b'\?', answer=b'yes'\) \(it needs >= 5\)"),
    (lambda: _recipe(0, optimizer=OptimizerConfig(warmup_steps=16)), ValueError,
     r"warmup_steps \(16\) must be below the run's 16 steps"),
    (lambda: _recipe(0, compute_dtype="float16"), ValueError, "compute_dtype"),
    (lambda: tasks.TaskMixture.of(BrokenTask("length")).batch(0, 0, 2, 16, None), ValueError,
     r"drew tokens of shape \(15,\) for length 16"),
    (lambda: tasks.TaskMixture.of(BrokenTask("no_answer")).batch(0, 0, 2, 16, None), ValueError,
     "marks no answer token"),
    (lambda: RetrievalTask(num_records=2, num_queries=3), ValueError, "num_queries"),
])
def test_bad_configurations_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()
