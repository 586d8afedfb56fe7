"""Bad input (arrays, thresholds, configs, checkpoints) raises a ValueError/TypeError that names the problem and what
is accepted, where it enters: before any computation."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from models import checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
B, T, S, HQ, HKV, D = 1, 40, 48, 4, 2, 16
CONFIG = sale_jax.SaleConfig(dense_below=0, block_q=8, block_k=8, backend="reference")


def arrays(q_shape=(B, T, HQ, D), kv_shape=(B, S, HKV, D), dtype=jnp.float32, v_shape=None, k_dtype=None):
    q = jnp.ones(q_shape, dtype)
    k = jnp.ones(kv_shape, k_dtype or dtype)
    v = jnp.ones(v_shape or kv_shape, k_dtype or dtype)
    return q, k, v


TAU = jnp.full((HQ,), 0.01)

QKV_CASES = [
    ("rank 4", dict(q_shape=(T, HQ, D))),
    ("rank 4", dict(kv_shape=(B, S, HKV, D, 1))),
    ("batch sizes differ", dict(kv_shape=(B + 1, S, HKV, D))),
    ("head_dim differs", dict(kv_shape=(B, S, HKV, D * 2))),
    ("multiple of k/v heads", dict(q_shape=(B, T, 3, D))),
    ("exceeds key length", dict(q_shape=(B, S + 1, HQ, D))),
    ("same shape", dict(v_shape=(B, S + 1, HKV, D))),
    ("dtype int32", dict(dtype=jnp.int32)),
    ("share one dtype", dict(k_dtype=jnp.bfloat16)),
]


@pytest.mark.parametrize("message,kwargs", QKV_CASES, ids=[c[0] + str(i) for i, c in enumerate(QKV_CASES)])
def test_bad_qkv(message, kwargs):
    q, k, v = arrays(**kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        sale_jax.sale_attention(q, k, v, TAU, CONFIG)
    with pytest.raises((ValueError, TypeError), match=message):
        sale_jax.dense_attention(q, k, v)


@pytest.mark.parametrize("tau,message", [
    (jnp.full((HQ + 1,), 0.01), "shape"),
    (jnp.full((1, HQ), 0.01), "shape"),
    (jnp.array([0.01, np.nan, 0.01, 0.01]), ">= 0"),
    (jnp.array([0.01, 0.01, -np.inf, 0.01]), ">= 0"),
    (jnp.array([0.01, -0.1, 0.01, 0.01]), ">= 0"),
    (jnp.ones((HQ,), jnp.int32), "float"),
])
def test_bad_tau(tau, message):
    q, k, v = arrays()
    with pytest.raises((ValueError, TypeError), match=message):
        sale_jax.sale_attention(q, k, v, tau, CONFIG)
    with pytest.raises((ValueError, TypeError), match=message):
        sale_jax.select_blocks(q, k, tau, CONFIG)


@pytest.mark.parametrize("fields,message", [
    (dict(block_q=48), "block_q must be a positive power of two"),
    (dict(block_k=0), "block_k must be a positive power of two"),
    (dict(block_k=True), "block_k must be a positive power of two"),
    (dict(local_tokens=0), "local_tokens"),
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(quant_granularity="per_channel"), "quant_granularity"),
    (dict(estimate="rank32"), r"estimate must be one of \('full', 'sparse_q'\)"),
    (dict(backend="cuda"), r"backend must be one of \('auto', 'reference', 'triton', 'mosaic_gpu'\)"),
    (dict(scale=-1.0), "scale"),
    (dict(dense_below=-5), "SaleConfig.dense_below must be None or an int >= 0, got -5"),
    (dict(query_chunk=0), "SaleConfig.query_chunk must be None or an int >= 1, got 0"),
    (dict(query_chunk=200), "query_chunk must be a multiple of block_q 128"),
    (dict(interpret="yes"), "SaleConfig.interpret must be a bool"),
    (dict(backend="triton", block_k=8), "SaleConfig: backend='triton' needs block_k >= 16, got 8"),
    (dict(backend="pallas", block_q=8), "SaleConfig: backend='triton' needs block_q >= 16, got 8"),
    (dict(backend="mosaic_gpu", block_q=32), r"SaleConfig: backend='mosaic_gpu' needs block_q in \(64, 128\)"),
    (dict(backend="mosaic_gpu", block_k=256), "SaleConfig: backend='mosaic_gpu' needs block_k <= 128, got 256"),
])
def test_bad_config(fields, message):
    with pytest.raises(ValueError, match=message):
        sale_jax.SaleConfig(**fields)


def test_auto_leaves_the_kernels_block_limits_to_the_call():
    assert sale_jax.SaleConfig(block_q=8, block_k=8).backend == "auto"  # the reference, off a GPU, takes them


def test_local_tokens_below_block_k_keep_the_blocks_their_window_touches():
    """local_tokens counts keys: a window shorter than block_k keeps whole blocks, the diagonal ones and the one
    holding key p_first - local_tokens + 1, so at block_k 32 every window of 2 to 33 keys keeps the same blocks."""
    config = sale_jax.SaleConfig(local_tokens=8)
    grid = sale_jax.BlockGrid(q_len=256, kv_len=256, block_q=config.block_q, block_k=config.block_k)

    def first_local_blocks(local_tokens):
        return tuple(grid.regions(config.sink_tokens, local_tokens).local_first_block.tolist())

    assert first_local_blocks(config.local_tokens) == (1, 3)  # q block 1 starts at key 128; keys 121..127: block 3
    assert {first_local_blocks(local_tokens) for local_tokens in range(2, 34)} == {(1, 3)}
    assert first_local_blocks(1) == (1, 4) and first_local_blocks(34) == (1, 2)


@pytest.mark.parametrize("alias, name", [("pallas", "triton"), ("pallas_mosaic", "mosaic_gpu")])
def test_old_backend_names_are_accepted_as_aliases(alias, name):
    assert sale_jax.SaleConfig(backend=alias).backend == name
    assert sale_jax.SaleConfig.from_dict({"backend": alias}) == sale_jax.SaleConfig(backend=name)


def test_layout_that_does_not_match_the_inputs():
    q, k, v = arrays()
    layout = sale_jax.select_blocks(q, k, TAU, CONFIG)
    other_config = sale_jax.SaleConfig(dense_below=0, block_q=16, block_k=8, backend="reference")
    with pytest.raises(ValueError, match="layout was made for"):
        sale_jax.block_sparse_attention(q, k, v, layout, other_config)
    with pytest.raises(ValueError, match="layout was made for"):
        sale_jax.block_sparse_attention(q[:, 8:], k, v, layout, CONFIG)
    q2, k2, v2 = arrays(q_shape=(2, T, HQ, D), kv_shape=(2, S, HKV, D))
    with pytest.raises(ValueError, match="layout arrays have shapes"):
        sale_jax.block_sparse_attention(q2, k2, v2, layout, CONFIG)
    with pytest.raises(TypeError, match="BlockLayout"):
        sale_jax.block_sparse_attention(q, k, v, layout.to_mask(), CONFIG)


@pytest.mark.parametrize("tau,error,message", [
    (jnp.full((1, 2), jnp.nan), ValueError, r"Thresholds: tau must be >= 0 or inf, never NaN .*got \[nan\]"),
    (jnp.full((1, 2), -0.1), ValueError, r"tau must be >= 0 .*got \[-0.1\]"),
    (jnp.full((1, 2), -jnp.inf), ValueError, r"tau must be >= 0 .*got \[-inf\]"),
    (jnp.full((2,), 0.1), ValueError, r"tau must be a non-empty \[num_layers, num_q_heads\] array, got shape \(2,\)"),
    (jnp.full((1, 2, HQ), 0.1), ValueError, r"\[num_layers, num_q_heads\] array, got shape \(1, 2, 4\)"),
    (jnp.zeros((0, HQ)), ValueError, r"non-empty .*got shape \(0, 4\)"),
    (jnp.zeros((1, HQ), jnp.int32), TypeError, "tau must be a float array, got dtype int32"),
])
def test_bad_thresholds(tau, error, message):
    with pytest.raises(error, match=message):
        sale_jax.Thresholds(tau)


def test_thresholds_check_shapes_under_jax_transforms_and_values_where_concrete():
    thresholds = sale_jax.Thresholds(jnp.asarray([[0.0, 0.01, np.inf]]))
    assert jax.jit(lambda t: t.layer(0))(thresholds).shape == (3,)
    assert jax.vmap(lambda x, t: x * t.layer(0), in_axes=(0, None))(jnp.ones(2), thresholds).shape == (2, 3)
    assert jax.eval_shape(lambda t: t, thresholds).tau.shape == (1, 3)
    assert jax.tree.map(lambda x: x.shape, thresholds).tau == (1, 3)
    assert jax.jit(lambda tau: sale_jax.Thresholds(tau).layer(0))(-jnp.ones((1, 3))).shape == (3,)  # traced values
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):
        jax.jit(lambda tau: sale_jax.Thresholds(tau))(jnp.ones(3))


def _checkpoint(tmp_path, family="llama", edit_config=None, sharded=False):
    """A copy of a tiny fixture checkpoint in tmp_path, its config.json edited by `edit_config(dict)`."""
    source = os.path.join(FIXTURES, f"tiny_{family}", "sharded" if sharded else "")
    target = tmp_path / family
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("sharded", "*.npz"))
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def _load_fails(directory, message, error=ValueError):
    with pytest.raises(error, match=message):
        checkpoint.load_llama(directory, dtype="float32")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_config_without_a_required_size(tmp_path, family):
    directory = _checkpoint(tmp_path, family, lambda config: config.pop("num_attention_heads"))
    _load_fails(directory, re.escape(f"{directory / 'config.json'}: no num_attention_heads; a {family} config.json "
                                     f"needs vocab_size, hidden_size, intermediate_size, num_hidden_layers, "
                                     f"num_attention_heads (each a positive int)"))


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=66, head_dim=None), "hidden_size 66 is not a multiple of num_attention_heads 4; without "
                                          "head_dim"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(num_hidden_layers="2"), "num_hidden_layers must be a positive int, got '2'"),
    (dict(intermediate_size=0), "intermediate_size must be a positive int, got 0"),
])
def test_config_with_inconsistent_sizes(tmp_path, changes, message):
    directory = _checkpoint(tmp_path, edit_config=lambda config: config.update(changes))
    _load_fails(directory, re.escape(f"{directory / 'config.json'}: {message}"))


def test_config_with_llama3_rope_scaling_lacking_a_field(tmp_path):
    directory = _checkpoint(tmp_path, edit_config=lambda config: config["rope_parameters"].pop("low_freq_factor"))
    _load_fails(directory, re.escape(f"{directory / 'config.json'}: llama3 rope scaling without low_freq_factor"))


def test_config_cut_short(tmp_path):
    directory = _checkpoint(tmp_path)
    (directory / "config.json").write_text((directory / "config.json").read_text()[:50])
    _load_fails(directory, re.escape(f"{directory / 'config.json'}: not valid JSON") + ".*download it again")


def test_weights_cut_short(tmp_path):
    directory = _checkpoint(tmp_path)
    weights = directory / "model.safetensors"
    contents = weights.read_bytes()
    weights.write_bytes(contents[:len(contents) // 2])
    _load_fails(directory, re.escape(f"{weights}: not a readable safetensors file (") + ".*"
                + re.escape(f"it holds {len(contents) // 2} bytes of the {len(contents)} its header describes; an "
                            f"interrupted download leaves a file like this: download it again"))


def test_weights_that_are_a_git_lfs_pointer(tmp_path):
    directory = _checkpoint(tmp_path)
    (directory / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    _load_fails(directory, re.escape(f"{directory / 'model.safetensors'}: not a readable safetensors file")
                + ".*it is a Git LFS pointer, not the weights")


def test_sharded_weights_missing_a_shard(tmp_path):
    directory = _checkpoint(tmp_path, sharded=True)
    os.remove(directory / "model-00003-of-00005.safetensors")
    _load_fails(directory, re.escape(f"{directory / 'model.safetensors.index.json'} names shards that {directory} "
                                     f"lacks: ['model-00003-of-00005.safetensors']"), FileNotFoundError)


def test_weights_of_another_size_than_the_config(tmp_path):
    directory = _checkpoint(tmp_path, edit_config=lambda config: config.update(intermediate_size=64))
    _load_fails(directory, re.escape(f"{directory / 'model.safetensors'}: model.layers.0.mlp.down_proj.weight has "
                                     f"shape (64, 128), but {directory}/config.json makes the model need (64, 64)"))


def test_thresholds_file_with_a_bad_config_names_the_file(tmp_path):
    path = tmp_path / "t.json"
    sale_jax.Thresholds.uniform(1, HQ, config=sale_jax.SaleConfig(backend="reference")).save(path)
    contents = json.loads(path.read_text())
    path.write_text(json.dumps({**contents, "config": {**contents["config"], "backend": "triton", "block_k": 8}}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: 'config': SaleConfig: backend='triton' "
                                                   f"needs block_k >= 16, got 8")):
        sale_jax.Thresholds.load(path)
