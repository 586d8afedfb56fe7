"""The training library (experiments/lib/training): a tiny Llama learns a mixture of two toy tasks, a run stopped and
resumed trains bit for bit what an uninterrupted one does, a step's rows drawn from its seed alone in any process,
the curriculum's replay and placement draws, the look-back probe's loss against numpy, and the errors for bad
configurations. The tasks' interface and mixtures are tests/test_tasks.py's.

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
from experiments.lib.tasks import common, registry
from experiments.lib.tasks.aggregation import Aggregation
from experiments.lib.tasks.single_needle import SingleNeedle
from experiments.lib.training import curriculum, loop, run_directory, step
from experiments.lib.training.lookback_probe import LookbackProbe
from experiments.lib.training.optimizer import OptimizerConfig, make_optimizer
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
    name = "marked_answer"
    has_depth = False

    def min_length(self) -> int:
        return 1 + len(self.marker) + len(self.answer)

    def draw(self, rng, length, depth=None):
        common.check_draw(self, rng, length, depth)
        tail = np.frombuffer(self.marker + self.answer, np.uint8)
        tokens = rng.integers(ord("a"), ord("z") + 1, length, dtype=np.int32)
        tokens[length - len(tail):] = tail
        filler_mask = np.zeros(length, np.float32)
        filler_mask[:length - len(tail) - 1] = 1
        return common.Example(tokens, np.array([[length - len(self.answer), length]], np.int32), filler_mask,
                              self.name, None, {})


TOY_MIXTURE = registry.Mixture((MarkedAnswer(b"=", b"ok"), MarkedAnswer(b"?", b"yes")), (1.0, 3.0))


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


def test_a_steps_rows_come_from_its_seed_alone_in_any_process(rng):
    """Row i of step s is what the task draws from the i-th child of (seed, 0, s) at the step's planned length and
    depth, whichever process builds it: a resumed run, and the processes that build batches ahead, draw the same."""
    seed = int(rng.integers(1000))
    mixture = registry.Mixture((SingleNeedle(2, 1), Aggregation(num_answers=1, num_words=4)), (1.0, 1.0))
    plans = curriculum.Curriculum(((64, 2), (96, 2)), 256, replay_fraction=0.5, placed_fraction=0.5)
    recipe = _recipe(seed, task=mixture, curriculum=plans)
    with batch_prefetch.BatchPrefetcher(common.batch, recipe.batch_arguments, 4, workers=1) as prefetched:
        built = [prefetched.get(step_index) for step_index in range(4)]
    for step_index, batch in enumerate(built):
        plan = plans.plan(step_index, seed)
        assert batch.tokens.shape == (plan.batch_size, plan.length) and batch.tokens.dtype == np.int32
        rows = np.random.SeedSequence((seed, 0, step_index)).spawn(plan.batch_size)
        for row, tokens, loss_mask, filler_mask in zip(rows, batch.tokens, batch.loss_mask, batch.filler_mask):
            want = mixture.draw(np.random.default_rng(row), plan.length, plan.depth)
            np.testing.assert_array_equal(tokens, want.tokens)
            np.testing.assert_array_equal(loss_mask, want.loss_mask)
            np.testing.assert_array_equal(filler_mask, want.filler_mask)
    assert not np.array_equal(built[0].tokens, built[1].tokens)


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


@pytest.mark.parametrize("make,error,message", [
    (lambda: curriculum.Curriculum((), 256), ValueError, "no stages"),
    (lambda: curriculum.Curriculum(((256, 0),), 256), ValueError, "steps >= 1"),
    (lambda: curriculum.Curriculum(((256, 5),), 0), ValueError, "tokens_per_step"),
    (lambda: curriculum.Curriculum(((256, 5),), 256, replay_fraction=1.5), ValueError, "replay_fraction"),
    (lambda: curriculum.parse_stages(["256"]), ValueError, "LENGTH:STEPS"),
    (lambda: OptimizerConfig(learning_rate=0.0), ValueError, "learning_rate"),
    (lambda: OptimizerConfig(betas=(0.9, 1.0)), ValueError, "betas"),
    (lambda: step.LossConfig(lookback_tokens=-1), ValueError, "lookback_tokens"),
    (lambda: _recipe(0, task="single needle"), TypeError, "'single needle' is not a task: a task has name"),
    (lambda: _recipe(0, curriculum=curriculum.Curriculum(((3, 16),), 256)), ValueError,
     r"curriculum: length 3 is too short for Mixture\(tasks=\(MarkedAnswer\(marker=b'=', .*\): need >= 5"),
    (lambda: _recipe(0, curriculum=curriculum.Curriculum(((32, 16),), 256, placed_fraction=0.5)), ValueError,
     "placed_fraction 0.5 puts answers at a depth, but mixture has none"),
    (lambda: _recipe(0, optimizer=OptimizerConfig(warmup_steps=16)), ValueError,
     r"warmup_steps \(16\) must be below the run's 16 steps"),
    (lambda: _recipe(0, compute_dtype="float16"), ValueError, "compute_dtype"),
])
def test_bad_configurations_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()
