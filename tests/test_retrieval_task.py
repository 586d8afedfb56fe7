"""The key-value retrieval data (seeded, exact in length, well formed, answers and loss mask right, depth honoured),
and its training script's recipe: its steps' rows are the generator's batches of the step's seed, the defaults are
the committed model's, and they draw the committed run's lengths step by step. The training library itself is
tests/test_training.py's, the single-needle task's interface tests/test_tasks.py's."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from absl import flags

from experiments.lib import retrieval_task
from experiments.lib.tasks import common
from experiments.lib.tasks.single_needle import SingleNeedle
from experiments.lib.training import curriculum, loop, step
from experiments.lib.training.optimizer import OptimizerConfig
from experiments.retrieval import train as train_retrieval

COMMITTED_RUN = pathlib.Path(__file__).resolve().parent.parent / "experiments/results/retrieval_training/h200"
TINY_RUN = ("--curriculum=128:3,160:2", "--tokens_per_step=512", "--num_records=4", "--num_queries=2",
            "--warmup_steps=2")


def _random_task(rng):
    num_records = int(rng.integers(1, 40))
    num_queries = int(rng.integers(1, num_records + 1))
    length = retrieval_task.min_length(num_records, num_queries) + int(rng.integers(0, 2000))
    return int(rng.integers(2**31)), length, num_records, num_queries


def _text(tokens) -> str:
    return np.asarray(tokens, np.uint8).tobytes().decode("ascii")


def test_sequences_are_seeded_and_exact_in_length(rng):
    seed, length, num_records, num_queries = _random_task(rng)
    first = retrieval_task.sequence(seed, length, num_records, num_queries)
    again = retrieval_task.sequence(seed, length, num_records, num_queries)
    other = retrieval_task.sequence(seed + 1, length, num_records, num_queries)
    assert first.tokens.shape == first.loss_mask.shape == (length,)
    assert first.tokens.dtype == np.int32 and first.loss_mask.dtype == np.float32
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)


@pytest.mark.parametrize("filler", retrieval_task.FILLERS)
def test_records_are_well_formed_with_unique_keys_in_filler(rng, filler):
    seed, length, num_records, num_queries = _random_task(rng)
    text = _text(retrieval_task.sequence(seed, length, num_records, num_queries, filler=filler).tokens)
    context_length = length - num_queries * retrieval_task.QUERY_LENGTH
    context, queries = text[:context_length], text[context_length:]
    keys = re.findall(r"#([A-Z]{2}):\d{4}#", context)
    assert len(keys) == num_records == len(set(keys))
    assert re.fullmatch(r"[a-z ]*", re.sub(r"#[A-Z]{2}:\d{4}#", "", context))
    assert re.fullmatch(r"(\?[A-Z]{2}:\d{4}[\n ])+", queries) and queries.count("?") == num_queries


def _check_answers(data, num_queries):
    text = _text(data.tokens)
    records = dict(re.findall(r"#([A-Z]{2}):(\d{4})#", text))
    queried_keys = set()
    for query, record, answer in zip(data.query_positions, data.record_positions, data.answers):
        query_key = text[query - 3:query - 1]
        assert text[query - 4] == "?" and text[record:record + 9] == f"#{query_key}:{answer.decode()}#"
        assert text[query:query + 4] == answer.decode() == records[query_key]
        queried_keys.add(query_key)
    assert len(queried_keys) == num_queries


def test_every_answer_is_its_records_digits(rng):
    seed, length, num_records, num_queries = _random_task(rng)
    _check_answers(retrieval_task.sequence(seed, length, num_records, num_queries), num_queries)


def test_loss_mask_marks_exactly_the_answer_digit_targets(rng):
    seed, length, num_records, num_queries = _random_task(rng)
    data = retrieval_task.sequence(seed, length, num_records, num_queries)
    targets = np.flatnonzero(data.loss_mask) + 1
    want = (data.query_positions[:, None] + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(targets, want)
    assert len(targets) == 4 * num_queries and data.loss_mask[-1] == 0
    assert all(chr(data.tokens[t]).isdigit() for t in targets)


@pytest.mark.parametrize("filler", retrieval_task.FILLERS)
def test_filler_mask_marks_exactly_the_filler_targets(rng, filler):
    seed, length, num_records, num_queries = _random_task(rng)
    data = retrieval_task.sequence(seed, length, num_records, num_queries, filler=filler)
    context_length = length - num_queries * retrieval_task.QUERY_LENGTH
    in_records = np.zeros(length, bool)
    for match in re.finditer(r"#[A-Z]{2}:\d{4}#", _text(data.tokens)):
        in_records[match.start():match.end()] = True
    want = np.zeros(length, bool)
    want[:context_length] = ~in_records[:context_length]
    np.testing.assert_array_equal(data.filler_mask[:-1] > 0, want[1:])
    assert data.filler_mask[-1] == 0


def test_word_filler_repeats_a_small_vocabulary(rng):
    seed, _, num_records, num_queries = _random_task(rng)
    data = retrieval_task.sequence(seed, 4096, min(num_records, 8), min(num_queries, 8), filler="words")
    context = _text(data.tokens)[:4096 - min(num_queries, 8) * retrieval_task.QUERY_LENGTH]
    # Whole words: between spaces, away from records and the context's ends.
    words = [word for chunk in re.split(r"#[A-Z]{2}:\d{4}#", context) for word in chunk.split(" ")[1:-1] if word]
    assert len(words) > 500 and 2 <= len(set(words)) <= retrieval_task.WORDS_PER_SEQUENCE
    assert all(re.fullmatch(r"[a-z]{2,7}", word) for word in words)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_depth_places_the_queried_records(rng, depth):
    seed, length, num_records, num_queries = _random_task(rng)
    depth = float(rng.uniform()) if depth is None else depth
    data = retrieval_task.sequence(seed, length, num_records, num_queries, depth=depth)
    context = length - num_queries * retrieval_task.QUERY_LENGTH
    # The queried records sit side by side; the block's first starts at `depth` of the room before its end.
    first = int(data.record_positions.min())
    assert first == round(depth * (context - num_queries * retrieval_task.RECORD_LENGTH))
    np.testing.assert_array_equal(np.sort(data.record_positions), first + 9 * np.arange(num_queries))
    np.testing.assert_allclose(data.record_depths, data.record_positions / (context - 9), rtol=1e-6)
    assert np.abs(data.record_depths - depth).max() <= num_queries * 9 / (context - 9) + 1e-6
    assert len(re.findall(r"#[A-Z]{2}:\d{4}#", _text(data.tokens[:context]))) == num_records
    _check_answers(data, num_queries)


def test_batch_stacks_distinct_seeded_sequences(rng):
    seed, length, num_records, num_queries = _random_task(rng)
    first = retrieval_task.batch(seed, 3, length, num_records, num_queries)
    again = retrieval_task.batch(seed, 3, length, num_records, num_queries)
    assert first.tokens.shape == first.loss_mask.shape == (3, length)
    assert first.query_positions.shape == (3, num_queries)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens[0], first.tokens[1])


@pytest.mark.parametrize("length,num_records,num_queries,depth,filler,message", [
    (100, 8, 4, None, "random", "too short"),
    (1000, 2, 3, None, "random", "num_queries"),
    (1000, 700, 1, None, "random", "num_records"),
    (1000, 4, 2, 1.5, "random", "depth"),
    (1000, 4, 2, None, "prose", "filler"),
])
def test_bad_arguments_are_refused(length, num_records, num_queries, depth, filler, message):
    with pytest.raises(ValueError, match=message):
        retrieval_task.sequence(0, length, num_records, num_queries, depth, filler)


@pytest.mark.parametrize("placed_fraction", [0.0, 1.0])
def test_a_training_steps_rows_are_the_generators_batch_of_its_seed(rng, placed_fraction):
    """Step s's rows are `retrieval_task.batch((seed, 0, s), ...)` at the step's length and depth: the training
    script's data order for a seed, that of the committed runs."""
    seed, length, num_records, num_queries = _random_task(rng)
    task = SingleNeedle(num_records, num_queries, str(rng.choice(retrieval_task.FILLERS)))
    plans = curriculum.Curriculum(((length, 10_000),), tokens_per_step=length * int(rng.integers(1, 4)),
                                  placed_fraction=placed_fraction)
    recipe = loop.Recipe(task, plans, OptimizerConfig(warmup_steps=1), seed=seed)
    step_index = int(rng.integers(10_000))
    plan = plans.plan(step_index, seed)
    assert (plan.depth is None) == (placed_fraction == 0)
    got = common.batch(*recipe.batch_arguments(step_index))
    want = retrieval_task.batch((seed, 0, step_index), plan.batch_size, length, num_records, num_queries,
                                plan.depth, task.filler)
    for field in ("tokens", "loss_mask", "filler_mask"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert task.min_length() == retrieval_task.min_length(num_records, num_queries)


@pytest.fixture
def parse_flags():
    """Parses a command line of the training script (its flags are reset afterwards)."""
    yield lambda *argv: flags.FLAGS(["train_retrieval", *argv])
    flags.FLAGS.unparse_flags()


def test_default_flags_are_the_committed_models_recipe(parse_flags):
    parse_flags("--output_dir=unused")
    saved = json.loads((COMMITTED_RUN / "train_state.json").read_text())["flags"]
    assert {name: flags.FLAGS[name].value for name in saved} == saved
    recipe = train_retrieval.recipe_from_flags()
    assert recipe == loop.Recipe(
        SingleNeedle(num_records=8, num_queries=4, filler="random"),
        curriculum.Curriculum(((256, 400), (1024, 300), (4096, 300), (16384, 300), (65536, 1100)),
                              tokens_per_step=131_072, replay_fraction=0.1, placed_fraction=0.25),
        OptimizerConfig(learning_rate=1e-3, warmup_steps=200, weight_decay=0.01, betas=(0.9, 0.95), clip_norm=1.0,
                        final_fraction=0.1),
        step.LossConfig(filler_loss_weight=0.0, lookback_tokens=3, lookback_loss_weight=1.0),
        compute_dtype="bfloat16" if jax.default_backend() == "gpu" else "float32", seed=0)
    # The committed run's 2,400 steps, with the replay's draws: every step's length and batch size.
    with open(COMMITTED_RUN / "train_log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [(entry["length"], entry["batch_size"]) for entry in log] == [
        recipe.curriculum.plan(step_index, seed=0)[:2] for step_index in range(recipe.curriculum.total_steps)]


@pytest.mark.parametrize("extra_flags,message", [
    (("--curriculum=64:5",), r"curriculum: length 64 is too short for SingleNeedle\(num_records=4, num_queries=2"),
    (("--curriculum=128",), "LENGTH:STEPS"),
    (("--eval_lengths=80",), "--eval_lengths: length 80 is too short"),
    (("--warmup_steps=10",), r"warmup_steps \(10\) must be below the run's 5 steps"),
    (("--num_records=1",), r"num_queries \(2\) <= num_records \(1\)"),
])
def test_bad_flags_are_refused_before_training(tmp_path, parse_flags, extra_flags, message):
    parse_flags(f"--output_dir={tmp_path / 'run'}", *TINY_RUN, *extra_flags)
    with pytest.raises(ValueError, match=message):
        train_retrieval.main([])
    assert not (tmp_path / "run").exists()
