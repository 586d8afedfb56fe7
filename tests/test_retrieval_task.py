"""The key-value retrieval data (seeded, exact in length, well formed, answers and loss mask right, depth honoured)
and its training script (a few real steps of a tiny model, the look-back probe's loss against numpy, and a save +
resume that continues exactly, with batches built in worker processes or not)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from safetensors.numpy import load_file

from experiments.lib import retrieval_task
from experiments.retrieval import train as train_retrieval

TINY_RUN = ("--hidden_size=64", "--intermediate_size=128", "--num_layers=2", "--num_heads=2", "--num_kv_heads=1",
            "--head_dim=32", "--curriculum=128:3,160:2", "--tokens_per_step=512", "--num_records=4",
            "--num_queries=2", "--warmup_steps=2", "--save_every=2", "--data_workers=0")
# The probe's loss is checked against numpy in f32, so matmuls run in full f32 on a GPU too.
pytestmark = pytest.mark.usefixtures("exact_f32_matmuls")


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


def _train(output_dir, *extra_flags):
    flags.FLAGS(["train_retrieval", f"--output_dir={output_dir}", *TINY_RUN, *extra_flags])
    try:
        train_retrieval.main([])
    finally:
        flags.FLAGS.unparse_flags()


def _log(output_dir):
    with open(output_dir / "train_log.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason=(
    "bit-for-bit resumption needs deterministic training: on a GPU the cuDNN attention backward and scatter-adds "
    "reduce in varying order, and XLA's --xla_gpu_deterministic_ops fails to compile this train step (jax 0.11.2)"))
def test_training_runs_and_resumes_exactly(tmp_path, rng):
    seed_value = int(rng.integers(1000))
    seed = f"--seed={seed_value}"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _train(straight, seed, "--data_workers=2")  # the same batches, built by worker processes
    _train(interrupted, seed, "--time_limit_s=1e-9")  # stops (and saves) after its first step
    assert json.loads((interrupted / "train_state.json").read_text())["step"] == 1
    _train(interrupted, seed, "--resume")
    replayed = tmp_path / "replayed"
    _train(replayed, seed, "--replay_fraction=1")  # every step of the second stage at the first's length

    log = _log(straight)
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5]
    # The default --replay_fraction sends some second-stage steps back to 128, drawn from the seed and step.
    replay = flags.FLAGS["replay_fraction"].default
    schedule = [train_retrieval.length_at([(128, 3), (160, 2)], step, replay, seed_value) for step in range(5)]
    assert schedule[:3] == [128] * 3 and set(schedule[3:]) <= {128, 160}
    assert [entry["length"] for entry in log] == schedule
    assert [entry["length"] for entry in _log(replayed)] == [128] * 5
    assert all(np.isfinite(entry["loss"]) for entry in log)
    assert [entry["loss"] for entry in _log(interrupted)] == [entry["loss"] for entry in log]
    state = json.loads((interrupted / "train_state.json").read_text())
    assert (state["step"], state["stage"], state["length"]) == (5, 1, 160)
    for name, load in (("model.safetensors", load_file), ("optimizer_state.npz", np.load),
                       ("lookback_probe.npz", np.load)):
        want, got = load(straight / name), load(interrupted / name)
        assert set(want) == set(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")


def test_training_with_a_filler_loss(tmp_path):
    _train(tmp_path, "--filler=words", "--filler_loss_weight=0.5")
    log = _log(tmp_path)
    assert len(log) == 5 and all(np.isfinite(entry["loss"]) and np.isfinite(entry["filler_loss"]) for entry in log)
    # Next-byte loss on filler starts near ln 256 (an untrained model) and is not the answer loss.
    assert all(entry["filler_loss"] != entry["loss"] for entry in log) and log[0]["filler_loss"] > 3


def test_replay_trains_some_steps_at_earlier_lengths_the_same_on_every_call():
    curriculum = [(128, 50), (256, 50), (512, 400)]
    lengths = [train_retrieval.length_at(curriculum, step, 0.25, seed=7) for step in range(500)]
    assert lengths == [train_retrieval.length_at(curriculum, step, 0.25, seed=7) for step in range(500)]
    assert lengths[:50] == [128] * 50  # nothing earlier to replay in the first stage
    assert set(lengths[50:100]) == {128, 256}
    last = np.array(lengths[100:])
    assert set(last) == {128, 256, 512}
    assert 0.18 < np.mean(last != 512) < 0.32  # a quarter replayed, split between the two earlier stages
    assert [train_retrieval.length_at(curriculum, step, 0.0, seed=7) for step in range(500)] == (
        [128] * 50 + [256] * 50 + [512] * 400)


def test_placement_puts_some_steps_queried_records_together_at_a_depth_the_same_on_every_call():
    depths = [train_retrieval.depth_at(step, 0.4, seed=3) for step in range(2000)]
    assert depths == [train_retrieval.depth_at(step, 0.4, seed=3) for step in range(2000)]
    placed = np.array([depth for depth in depths if depth is not None])
    assert 0.35 < len(placed) / len(depths) < 0.45
    assert np.all((placed >= 0) & (placed <= 1))
    at_ends = np.isin(placed, (0.0, 1.0))
    assert 0.4 < np.mean(at_ends) < 0.6 and 0.4 < np.mean(placed[at_ends]) < 0.6  # half at the ends, both ends
    assert len(set(placed[~at_ends])) == np.sum(~at_ends)  # the rest drawn from a continuum
    assert all(train_retrieval.depth_at(step, 0.0, seed=3) is None for step in range(100))


def test_training_without_the_lookback_probe(tmp_path):
    _train(tmp_path, "--lookback_tokens=0", "--placed_fraction=0.5")
    log = _log(tmp_path)
    assert len(log) == 5 and all(entry["lookback_loss"] == 0 for entry in log)
    assert not (tmp_path / "lookback_probe.npz").exists()


def test_lookback_probe_loss_matches_numpy(rng):
    batch, length, hidden, vocab, back = 2, 9, 16, 7, 3
    probe = train_retrieval.LookbackProbe(hidden, vocab, back, nnx.Rngs(int(rng.integers(1000))))
    probe.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, hidden), jnp.float32)
    residual = rng.standard_normal((batch, length, hidden)).astype(np.float32)
    tokens = rng.integers(0, vocab, (batch, length))
    got = float(probe.loss(jnp.asarray(residual), jnp.asarray(tokens)))

    x = residual.astype(np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.asarray(probe.norm.weight[...])
    logits = (normed @ np.asarray(probe.readout.kernel[...], np.float64)).reshape(batch, length, back, vocab)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.mean([np.mean([-log_probs[b, t, j - 1, tokens[b, t - j]] for b in range(batch)
                             for t in range(j, length)]) for j in range(1, back + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("extra_flags,message", [
    (("--curriculum=64:5",), "too short"),
    (("--curriculum=128",), "LENGTH:STEPS"),
    (("--eval_lengths=80",), "too short"),
    (("--warmup_steps=10",), "warmup_steps"),
])
def test_bad_flags_are_refused(tmp_path, extra_flags, message):
    with pytest.raises(ValueError, match=message):
        _train(tmp_path, *extra_flags)


def test_resume_refuses_other_flags_and_a_fresh_run_refuses_a_used_folder(tmp_path):
    _train(tmp_path, "--curriculum=128:2", "--warmup_steps=1")
    with pytest.raises(ValueError, match="already holds a run"):
        _train(tmp_path, "--curriculum=128:2", "--warmup_steps=1")
    with pytest.raises(ValueError, match="other flags"):
        _train(tmp_path, "--curriculum=128:2", "--warmup_steps=1", "--learning_rate=0.5", "--resume")
