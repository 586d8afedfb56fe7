"""The task suite (experiments/lib/tasks): every task seeded and exact in length; each answer recomputed from its
prompt's bytes by a brute-force solver written here (records looked up, chains followed, words counted); depth
placing the needles; multi-key's distractors one letter off; aggregation's counts without ties; the single-needle
task equal to the retrieval task; the mixture; masks, scoring and batches; examples of the wrong shape, what is not a
task and bad arguments refused."""

import collections
import dataclasses
import re

import numpy as np
import pytest

from experiments.lib import retrieval_task
from experiments.lib.tasks import common, registry
from experiments.lib.tasks.aggregation import Aggregation
from experiments.lib.tasks.multi_key import MultiKey
from experiments.lib.tasks.multi_query import MultiQuery
from experiments.lib.tasks.multi_value import MultiValue
from experiments.lib.tasks.single_needle import SingleNeedle
from experiments.lib.tasks.variable_tracking import VariableTracking

NAMES = sorted(registry.TASKS)
RECORD = r"#([A-Z]{2}):(\d{4})#"
STATEMENT = r"#([A-Z]{2}|\d{2})>([A-Z]{2})#"


def random_task(rng, name):
    """The task `name` with parameters drawn from their accepted ranges."""
    filler = str(rng.choice(common.FILLERS))
    if name == "single_needle":
        num_records = int(rng.integers(1, 20))
        return SingleNeedle(num_records, int(rng.integers(1, num_records + 1)), filler)
    if name == "multi_key":
        num_queries = int(rng.integers(1, 5))
        return MultiKey(num_queries, int(rng.integers(1, 51 - 2 * num_queries)), filler)
    if name == "multi_value":
        return MultiValue(int(rng.integers(2, 8)), int(rng.integers(0, 8)), filler)
    if name == "multi_query":
        num_records = int(rng.integers(2, 20))
        return MultiQuery(num_records, int(rng.integers(2, num_records + 1)), filler)
    if name == "variable_tracking":
        return VariableTracking(int(rng.integers(2, 5)), int(rng.integers(1, 6)), filler)
    return Aggregation(int(rng.integers(1, 6)), int(rng.integers(7, 30)), float(rng.uniform(0.5, 1.5)))


def random_draw(rng, name, longest=3000):
    task = random_task(rng, name)
    length = task.min_length() + int(rng.integers(0, longest))
    depth = None if not task.has_depth or rng.integers(3) == 0 else float(rng.choice([0.0, 1.0, rng.uniform()]))
    return task, length, depth


def text(tokens) -> str:
    return np.asarray(tokens, np.uint8).tobytes().decode("ascii")


def solve(task, prompt: str) -> str:
    """The next answer of `prompt` (the tokens before an answer), from its bytes alone: the context is everything
    before the first `?`, the line being answered everything after the last one."""
    context, line = prompt[:prompt.index("?")], prompt[prompt.rindex("?") + 1:]
    asked, answered = line.split(":")
    asked, index = asked.split(","), answered.count(",")
    if isinstance(task, Aggregation):
        assert re.fullmatch(r" *([A-Z]{3} )+", context)
        ranked = collections.Counter(context.split()).most_common()
        counts = [count for _, count in ranked]
        # The answer is unambiguous: the counts fall strictly over the asked words and the next one.
        assert all(counts[r] > counts[r + 1] for r in range(int(asked[0])))
        return ranked[index][0]
    pattern = STATEMENT if isinstance(task, VariableTracking) else RECORD
    assert re.fullmatch(r"[a-z ]*", re.sub(pattern, "", context)), "filler holds only lowercase letters and spaces"
    if isinstance(task, VariableTracking):
        assigned = dict(re.findall(STATEMENT, context))
        assert len(assigned) == len(re.findall(STATEMENT, context)), "every source is assigned onwards once"
        item = asked[0]
        for _ in range(index + 1):
            item = assigned[item]
        return item
    values = collections.defaultdict(list)
    for key, value in re.findall(RECORD, context):
        values[key].append(value)
    if isinstance(task, MultiValue):
        assert len(values[asked[0]]) == task.num_values
        return values[asked[0]][index]
    key = asked[index]
    assert len(values[key]) == 1, f"key {key} has one record"
    return values[key][0]


def check_answers(task, example):
    """Each answer is what the solver finds in its prompt, and the answers end the lines they answer."""
    full = text(example.tokens)
    for (start, end), answer in zip(example.answer_spans, example.answers):
        assert answer.decode() == full[start:end] == solve(task, full[:start])
        assert full[end] in ",\n "
    assert full[example.answer_spans[-1, 1]:] in ("\n", " ")
    if isinstance(task, VariableTracking):  # every name of the chain is asked for: the last is assigned nowhere
        assert example.answers[-1].decode() not in dict(re.findall(STATEMENT, full))


@pytest.mark.parametrize("name", NAMES)
def test_answers_are_recomputed_from_the_prompt(rng, name):
    for _ in range(25):
        task, length, depth = random_draw(rng, name)
        example = task.draw(rng, length, depth)
        assert example.tokens.shape == example.filler_mask.shape == (length,)
        assert example.tokens.dtype == np.int32 and example.task == name and example.depth == depth
        check_answers(task, example)


@pytest.mark.parametrize("name", NAMES)
def test_draws_are_seeded_and_exact_in_length_to_128k(rng, name):
    task, _, depth = random_draw(rng, name)
    seed = int(rng.integers(2**31))
    for length in (task.min_length(), 131_072 + int(rng.integers(0, 100))):
        first = task.draw(np.random.default_rng(seed), length, depth)
        again = task.draw(np.random.default_rng(seed), length, depth)
        other = task.draw(np.random.default_rng(seed + 1), length, depth)
        assert len(first.tokens) == length
        np.testing.assert_array_equal(first.tokens, again.tokens)
        np.testing.assert_array_equal(first.answer_spans, again.answer_spans)
        assert not np.array_equal(first.tokens, other.tokens)
    check_answers(task, first)


def needle_starts(task, example) -> list[int]:
    """Where the records (statements) that the answers come from start, found in the bytes."""
    full = text(example.tokens)
    context = full[:full.index("?")]
    if isinstance(task, VariableTracking):
        starts, item = [], full[full.rindex("?") + 1:].split(":")[0]
        for answer in example.answers:
            starts.append(context.index(f"#{item}>{answer.decode()}#"))
            item = answer.decode()
        return sorted(starts)
    asked = ",".join(re.findall(r"\?([A-Z,]+):", full)).split(",")
    return sorted(match.start() for match in re.finditer(RECORD, context) if match.group(1) in asked)


@pytest.mark.parametrize("name", [name for name in NAMES if registry.TASKS[name].has_depth])
@pytest.mark.parametrize("depth", [0.0, 1.0, "uniform"])
def test_depth_places_the_needles_together(rng, name, depth):
    depth = float(rng.uniform()) if depth == "uniform" else depth
    task, length, _ = random_draw(rng, name)
    example = task.draw(rng, length, depth)
    context = text(example.tokens).index("?")
    starts = needle_starts(task, example)
    item = len(text(example.tokens)[starts[0]:].split("#")[1]) + 2
    assert starts == [starts[0] + item * i for i in range(len(starts))]
    assert starts[0] == round(depth * (context - item * len(starts)))
    assert sorted(example.metadata["needle_positions"]) == starts
    np.testing.assert_allclose(example.metadata["needle_depths"], example.metadata["needle_positions"] /
                               (context - item), rtol=1e-6)
    check_answers(task, example)


def test_scattered_needles_reach_both_ends_of_the_context(rng):
    """Without a depth, a needle lands anywhere: over many draws, in every tenth of the context."""
    task = MultiQuery(num_records=4, num_queries=2)
    depths = np.concatenate([task.draw(rng, 400).metadata["needle_depths"] for _ in range(200)])
    assert np.all((depths >= 0) & (depths <= 1))
    assert len(np.unique(np.floor(depths * 10).clip(max=9))) == 10


def test_multi_key_distractors_are_one_letter_off_a_needle(rng):
    for _ in range(20):
        task, length, depth = random_draw(rng, "multi_key")
        full = text(task.draw(rng, length, depth).tokens)
        context = full[:full.index("?")]
        asked = re.findall(r"\?([A-Z]{2}):", full)
        keys = [key for key, _ in re.findall(RECORD, context)]
        assert len(keys) == len(set(keys)) == task.num_queries * (1 + task.num_distractors)
        assert len(set(asked)) == task.num_queries and set(asked) <= set(keys)
        for key in set(keys) - set(asked):
            distances = [sum(a != b for a, b in zip(key, needle)) for needle in asked]
            assert 1 in distances
            if task.num_queries == 1:
                assert distances == [1]
        # Needles differ from one another in both letters: none is a distractor of another.
        assert all(a[0] != b[0] and a[1] != b[1] for a in asked for b in asked if a != b)


def test_multi_value_values_are_in_order_of_appearance_and_distinct(rng):
    for _ in range(10):
        task, length, depth = random_draw(rng, "multi_value")
        example = task.draw(rng, length, depth)
        answers = [answer.decode() for answer in example.answers]
        assert len(answers) == len(set(answers)) == task.num_values
        full = text(example.tokens)
        key = full[full.rindex("?") + 1:][:2]
        assert [m.group(2) for m in re.finditer(RECORD, full) if m.group(1) == key] == answers


def test_variable_tracking_chains_are_in_order_with_distinct_names(rng):
    for _ in range(10):
        task, length, depth = random_draw(rng, "variable_tracking")
        full = text(task.draw(rng, length, depth).tokens)
        statements = re.findall(STATEMENT, full[:full.index("?")])
        assert len(statements) == task.num_chains * (task.num_hops + 1)
        names = [name for _, name in statements]
        assert len(set(names)) == len(names)
        assigned = dict(statements)
        roots = [source for source, _ in statements if source.isdigit()]
        assert len(roots) == len(set(roots)) == task.num_chains
        for root in roots:  # a chain's statements appear in its order
            positions, item = [], root
            while item in assigned:
                positions.append(full.index(f"#{item}>{assigned[item]}#"))
                item = assigned[item]
            assert len(positions) == task.num_hops + 1 and positions == sorted(positions)


def test_aggregation_counts_fall_by_rank_and_grow_with_length(rng):
    task, length, _ = random_draw(rng, "aggregation", longest=20_000)
    example = task.draw(rng, length)
    counts = collections.Counter(text(example.tokens)[:text(example.tokens).index("?")].split())
    assert len(counts) == task.num_words
    np.testing.assert_array_equal(sorted(counts.values(), reverse=True)[:task.num_answers + 1],
                                  example.metadata["counts"])
    assert [counts[answer.decode()] for answer in example.answers] == list(example.metadata["counts"][:-1])
    longer = task.draw(rng, 4 * length)
    assert all(longer.metadata["counts"] >= 3 * example.metadata["counts"])


def test_single_needle_is_the_retrieval_task(rng):
    num_records = int(rng.integers(1, 12))
    num_queries = int(rng.integers(1, num_records + 1))
    task = SingleNeedle(num_records, num_queries, str(rng.choice(common.FILLERS)))
    length, seed = task.min_length() + int(rng.integers(0, 2000)), int(rng.integers(2**31))
    want = retrieval_task.batch(seed, 3, length, num_records, num_queries, 0.5, task.filler)
    got = common.batch(task, seed, 3, length, 0.5)
    for field in ("tokens", "loss_mask", "filler_mask"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.tasks == ("single_needle",) * 3


@pytest.mark.parametrize("name", NAMES)
def test_masks_mark_the_answer_and_filler_targets(rng, name):
    task, length, depth = random_draw(rng, name)
    example = task.draw(rng, length, depth)
    targets = np.flatnonzero(example.loss_mask) + 1
    np.testing.assert_array_equal(targets, np.concatenate([np.arange(s, e) for s, e in example.answer_spans]))
    full = text(example.tokens)
    is_filler = np.zeros(length, bool)
    if not isinstance(task, Aggregation):
        is_filler[:full.index("?")] = True
        for match in re.finditer(STATEMENT if isinstance(task, VariableTracking) else RECORD, full):
            is_filler[match.start():match.end()] = False
    np.testing.assert_array_equal(example.filler_mask[:-1] > 0, is_filler[1:])
    assert example.filler_mask[-1] == 0


def test_answer_hits_score_each_answer_by_its_teacher_forced_argmax(rng):
    task, length, depth = random_draw(rng, "multi_query")
    example = task.draw(rng, length, depth)
    predicted = np.roll(example.tokens, -1)  # a perfect model's argmax: the next token
    assert example.answer_hits(predicted).all()
    missed = int(rng.integers(len(example.answer_spans)))
    start, end = example.answer_spans[missed]
    predicted[int(rng.integers(start, end)) - 1] = ord("#")
    predicted[example.answer_spans[0, 0] - 2] = ord("#")  # a wrong guess outside the answers does not count
    np.testing.assert_array_equal(example.answer_hits(predicted), np.arange(len(example.answer_spans)) != missed)


def test_mixture_draws_tasks_by_weight_and_depth_where_it_applies(rng):
    mixture = registry.Mixture.of({"single_needle": 3, "aggregation": 1, "multi_key": 0})
    assert mixture.min_length() == max(registry.TASKS[n].min_length() for n in ("single_needle", "aggregation"))
    seed = int(rng.integers(2**31))
    examples = [mixture.draw(np.random.default_rng((seed, i)), mixture.min_length(), 0.0) for i in range(400)]
    drawn = collections.Counter(example.task for example in examples)
    assert set(drawn) == {"single_needle", "aggregation"} and 0.65 < drawn["single_needle"] / 400 < 0.85
    for example in examples:
        assert example.depth == (0.0 if example.task == "single_needle" else None)
        check_answers(registry.TASKS[example.task], example)
    again = mixture.draw(np.random.default_rng((seed, 7)), mixture.min_length(), 0.0)
    np.testing.assert_array_equal(again.tokens, examples[7].tokens)
    batch = common.batch(mixture, seed, 6, mixture.min_length() + 10)
    assert batch.tokens.shape == batch.loss_mask.shape == batch.filler_mask.shape == (6, mixture.min_length() + 10)
    assert len(batch.tasks) == 6 and set(batch.tasks) <= {"single_needle", "aggregation"}
    for row in range(6):
        example = mixture.draw(np.random.default_rng(np.random.SeedSequence(seed).spawn(6)[row]), batch.tokens.shape[1])
        np.testing.assert_array_equal(batch.tokens[row], example.tokens)
        np.testing.assert_array_equal(batch.loss_mask[row], example.loss_mask)
        np.testing.assert_array_equal(batch.answer_spans[row], example.answer_spans)
        assert batch.tasks[row] == example.task


@pytest.mark.parametrize("make,message", [
    (lambda: SingleNeedle(num_records=2, num_queries=3), "num_queries"),
    (lambda: SingleNeedle(filler="prose"), "filler"),
    (lambda: MultiKey(num_distractors=51), "num_distractors"),
    (lambda: MultiKey(num_queries=3, num_distractors=47), "num_distractors"),
    (lambda: MultiKey(num_queries=27), "num_queries"),
    (lambda: MultiValue(num_values=1), "num_values"),
    (lambda: MultiValue(num_others=-1), "num_others"),
    (lambda: MultiQuery(num_records=3, num_queries=4), "num_queries"),
    (lambda: MultiQuery(num_queries=1), "num_queries"),
    (lambda: VariableTracking(num_chains=1), "num_chains"),
    (lambda: VariableTracking(num_hops=0), "num_hops"),
    (lambda: VariableTracking(num_chains=100, num_hops=6), "num_hops"),
    (lambda: Aggregation(num_answers=10), "num_answers"),
    (lambda: Aggregation(num_words=3), "num_words"),
    (lambda: Aggregation(exponent=0.0), "exponent"),
    (lambda: registry.Mixture.of({"needle": 1}), "unknown tasks"),
    (lambda: registry.Mixture((SingleNeedle(),), (-1.0,)), "weights"),
    (lambda: registry.Mixture((SingleNeedle(),), (1.0, 2.0)), "one weight per task"),
    (lambda: registry.Mixture((SingleNeedle(), MultiKey()), (1.0, float("inf"))), "finite"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", NAMES)
def test_bad_draws_are_refused(name):
    task = registry.TASKS[name]
    with pytest.raises(ValueError, match="too short"):
        task.draw(np.random.default_rng(0), task.min_length() - 1)
    with pytest.raises(TypeError, match="Generator"):
        task.draw(0, task.min_length())
    with pytest.raises(ValueError, match="depth" if task.has_depth else "has no depth"):
        task.draw(np.random.default_rng(0), task.min_length(), 1.5 if task.has_depth else 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        common.batch(task, 0, 0, task.min_length())


def _made_example(**changes) -> common.Example:
    fields = dict(tokens=np.arange(8, dtype=np.int32), answer_spans=np.array([[2, 4], [5, 8]], np.int32),
                  filler_mask=np.zeros(8, np.float32), task="made", depth=None, metadata={})
    return common.Example(**{**fields, **changes})


@pytest.mark.parametrize("changes,message", [
    ({"tokens": np.zeros(8, np.float32)}, r"tokens of dtype float32 and shape \(8,\)"),
    ({"tokens": np.zeros((2, 4), np.int32)}, r"tokens of dtype int32 and shape \(2, 4\)"),
    ({"filler_mask": np.zeros(7, np.float32)}, r"a filler_mask of shape \(7,\)"),
    ({"answer_spans": np.zeros((0, 2), np.int32)}, r"answer_spans of shape \(0, 2\).*A >= 1"),
    ({"answer_spans": np.array([[0, 2]])}, r"answer_spans \[\[0, 2\]\]"),
    ({"answer_spans": np.array([[3, 3]])}, r"answer_spans \[\[3, 3\]\]"),
    ({"answer_spans": np.array([[5, 9]])}, r"answer_spans \[\[5, 9\]\].*within the 8 tokens"),
    ({"answer_spans": np.array([[5, 8], [2, 4]])}, r"answer_spans \[\[5, 8\], \[2, 4\]\].*in order"),
])
def test_examples_of_the_wrong_shape_are_refused(changes, message):
    np.testing.assert_array_equal(_made_example().loss_mask, [0, 1, 1, 0, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="made drew " + message):
        _made_example(**changes)


@dataclasses.dataclass(frozen=True)
class OneTokenShort:
    """A task that draws one token fewer than asked: the mistake a batch refuses."""
    name = "one_token_short"
    has_depth = False

    def min_length(self) -> int:
        return SingleNeedle().min_length() + 1

    def draw(self, rng, length, depth=None):
        return SingleNeedle().draw(rng, length - 1)


def test_what_is_not_a_task_or_draws_another_length_is_refused():
    assert all(isinstance(task, common.Task) for task in (*registry.TASKS.values(), registry.Mixture.of(
        {"multi_key": 1}), OneTokenShort()))
    with pytest.raises(TypeError, match="'multi_key' is not a task: a task has name, has_depth, min_length"):
        registry.Mixture(("multi_key",), (1.0,))
    with pytest.raises(ValueError, match=r"OneTokenShort\(\) drew 29 tokens for length 30"):
        common.batch(OneTokenShort(), 0, 2, 30)
