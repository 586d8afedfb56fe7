"""The synthetic workloads: reproducible, well-formed, and with needles that SALE must keep."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from experiments.lib import kv_prompts, workloads


def test_llm_like_qkv_shapes_seeds_and_needles(rng):
    seed = int(rng.integers(2**31))
    first = workloads.llm_like_qkv(seed, 2, 1500, 4, 2, 32, q_len=900, dtype=jnp.bfloat16, num_needles=3)
    again = workloads.llm_like_qkv(seed, 2, 1500, 4, 2, 32, q_len=900, dtype=jnp.bfloat16, num_needles=3)
    other = workloads.llm_like_qkv(seed + 1, 2, 1500, 4, 2, 32, q_len=900, dtype=jnp.bfloat16, num_needles=3)
    assert first.q.shape == (2, 900, 4, 32) and first.k.shape == first.v.shape == (2, 1500, 2, 32)
    assert first.q.dtype == jnp.bfloat16 and first.needle_rows.shape == (2, 4, 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.k, other.k)
    positions = np.asarray(first.needle_rows) + 600
    keys = np.asarray(first.needle_keys)
    far_gap = 1500 // 4
    assert np.all((keys >= 4) & (keys < positions - far_gap))  # past the 4 sink tokens, far from the row


def test_needles_carry_real_attention_mass_and_sale_keeps_them(rng):
    """A planted needle takes about half its row's dense attention; at the default threshold SALE keeps its block."""
    work = workloads.llm_like_qkv(int(rng.integers(2**31)), 1, 4096, 4, 2, 64, dtype=jnp.float32, num_needles=4)
    rows, keys = np.asarray(work.needle_rows[0]), np.asarray(work.needle_keys[0])
    q, k = np.asarray(work.q[0], np.float64), np.asarray(work.k[0], np.float64)
    for h in range(4):
        for row, key in zip(rows[h], keys[h]):
            scores = q[row, h] @ k[:row + 1, h // 2].T / 8.0
            weights = np.exp(scores - scores.max())
            assert weights[key] / weights.sum() > 0.3
    config = sale_jax.SaleConfig(dense_below=0, backend="reference")
    layout = sale_jax.select_blocks(work.q, work.k, jnp.full((4,), sale_jax.DEFAULT_TAU), config)
    mask = np.asarray(layout.to_mask())[0]
    heads = np.arange(4)[:, None]
    q_blocks, k_blocks = rows // config.block_q, keys // config.block_k
    assert np.all(mask[heads, q_blocks, k_blocks])
    # Most needles sit in middle blocks, where keeping them was the estimate's decision (a few land in the sink).
    always = layout.grid.regions(config.sink_tokens, config.local_tokens).always_kept
    assert np.mean(always[q_blocks, k_blocks]) < 0.5


def test_needles_of_one_kv_head_share_a_key_only_when_their_range_is_full(rng):
    """128 needles per KV head over ~3000 far keys: shared keys are all but certain before they are moved apart.
    A needle keeps a key an earlier needle of its KV head took only when every key of its range [4, row - 1024]
    (past the 4 sink keys, at least 1024 back) is taken by earlier needles, which a needle drawn near the first
    rows can meet."""
    work = workloads.llm_like_qkv(int(rng.integers(2**31)), 2, 4096, 8, 2, 32, dtype=jnp.float32, num_needles=32)
    keys = np.asarray(work.needle_keys).reshape(2, 2, -1)
    positions = np.asarray(work.needle_rows).reshape(keys.shape)
    assert np.all((keys >= 4) & (keys <= np.maximum(positions - 1024, 4)))
    for b, kv in np.ndindex(2, 2):
        for i, key in enumerate(keys[b, kv]):
            earlier = set(keys[b, kv, :i].tolist())
            if key in earlier:
                assert set(range(4, positions[b, kv, i] - 1024)) <= earlier, (b, kv, i)


@pytest.mark.parametrize("num_tokens", [400, 5000, 131072])
def test_json_kv_prompt_is_valid_json_with_the_answer_at_its_record(rng, num_tokens):
    depth = float(rng.uniform())
    prompt = kv_prompts.json_kv_prompt(int(rng.integers(2**31)), num_tokens, depth=depth)
    assert len(prompt.tokens) <= num_tokens and prompt.tokens.dtype == np.int32
    assert len(prompt.tokens) > num_tokens - 80  # the budget is filled to within one record
    text = prompt.text
    data = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert len(data) == prompt.num_records
    assert data[prompt.query_key.decode()] == prompt.answer.decode()
    record = text[prompt.record_start:prompt.record_start + 80]
    assert record.startswith(f'"{prompt.query_key.decode()}": "{prompt.answer.decode()}"')
    assert text.endswith(f'Key: "{prompt.query_key.decode()}"\nThe value associated with the specified key is: ')
    target = round(depth * (prompt.num_records - 1))
    assert prompt.record_start == text.index("{") + 1 + 80 * target


def test_json_kv_prompt_is_seeded_and_checks_its_arguments():
    a, b = kv_prompts.json_kv_prompt(3, 2000), kv_prompts.json_kv_prompt(3, 2000)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="no room"):
        kv_prompts.json_kv_prompt(0, 100)
    with pytest.raises(ValueError, match="depth"):
        kv_prompts.json_kv_prompt(0, 2000, depth=1.5)


def test_head_seed_fixes_the_heads_and_seed_the_sample():
    base = workloads.llm_like_qkv(1, 1, 600, 2, 1, 32, dtype=jnp.float32, num_needles=0, head_seed=7)
    same_heads = workloads.llm_like_qkv(2, 1, 600, 2, 1, 32, dtype=jnp.float32, num_needles=0, head_seed=7)
    other_heads = workloads.llm_like_qkv(1, 1, 600, 2, 1, 32, dtype=jnp.float32, num_needles=0, head_seed=8)
    assert not np.array_equal(base.q, same_heads.q)  # a new sample
    # The mean query (the head's fixed directions) is shared by samples of one head_seed, not across head seeds.
    mean = lambda w: np.asarray(w.q).mean(axis=1)
    assert np.abs(mean(base) - mean(same_heads)).max() < np.abs(mean(base) - mean(other_heads)).max() / 3
