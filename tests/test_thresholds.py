"""Thresholds: construction, per-layer access, a file format that round-trips and rejects bad contents, and the
check that they run only under the block grid, regions, quantization and scale they were calibrated with."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sale_jax
from models import checkpoint, llama

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_llama")
CALIBRATED = sale_jax.SaleConfig(block_q=16, block_k=16, sink_tokens=16, local_tokens=16, backend="reference",
                                 dense_below=0)


def test_uniform_and_layer():
    thresholds = sale_jax.Thresholds.uniform(3, 8)
    assert thresholds.tau.shape == (3, 8) and thresholds.tau.dtype == jnp.float32
    np.testing.assert_array_equal(thresholds.layer(2), np.full(8, 0.008, np.float32))
    with pytest.raises(IndexError):
        thresholds.layer(3)
    with pytest.raises(ValueError, match=">= 0"):
        sale_jax.Thresholds.uniform(3, 8, value=-0.1)


def test_is_a_pytree_with_tau_as_its_only_leaf(rng):
    thresholds = sale_jax.Thresholds(jnp.asarray(rng.uniform(size=(2, 4)), jnp.float32), model_name="m",
                                    recipe={"name": "paper", "theta": 0.4})
    leaves, treedef = jax.tree_util.tree_flatten(thresholds)
    assert len(leaves) == 1
    doubled = jax.tree_util.tree_map(lambda t: 2 * t, thresholds)
    assert doubled.model_name == "m" and doubled.recipe_params == {"name": "paper", "theta": 0.4}
    np.testing.assert_allclose(doubled.tau, 2 * thresholds.tau)


def test_save_load_round_trip(rng, tmp_path):
    tau = rng.uniform(0, 0.01, size=(4, 6)).astype(np.float32)
    tau[1, 2] = 0.0
    tau[2, 3] = np.inf  # a streaming head
    config = sale_jax.SaleConfig(dense_below=0, block_q=128, local_tokens=256, backend="reference")
    recipe = {"name": "kl_budget", "kl_budget": 0.01, "score_tokens": 256, "cost": "first_order"}
    original = sale_jax.Thresholds(jnp.asarray(tau), model_name="llama-test", recipe=recipe, config=config)
    path = tmp_path / "thresholds.json"
    original.save(path)
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    loaded = sale_jax.Thresholds.load(path, num_layers=4, num_q_heads=6)
    np.testing.assert_array_equal(loaded.tau, tau)  # bit-exact
    assert (loaded.model_name, loaded.recipe_params, loaded.config) == ("llama-test", recipe, config)


def test_loads_version_1_files_as_the_paper_recipe(tmp_path):
    loaded = sale_jax.Thresholds.load(_write(tmp_path / "t.json"))
    assert loaded.recipe_params == {"name": "paper", "theta": 0.4}


def _write(path, **overrides):
    contents = {"format": "sale-jax-thresholds", "version": 1, "model_name": "m", "theta": 0.4, "config": None,
                "tau": [[0.008, 0.004], [0.0, 0.002]]}
    contents.update(overrides)
    path.write_text(json.dumps(contents))
    return path


@pytest.mark.parametrize("overrides,message", [
    (dict(format="something-else"), "not a thresholds file"),
    (dict(version=99), "version"),
    (dict(tau=[0.1, 0.2]), "shape"),
    (dict(tau=[[0.1, "x"]]), "array of numbers"),
    (dict(tau=[[0.1, -0.2]]), ">= 0"),
    (dict(tau=[[0.1, float("nan")]]), ">= 0"),
    (dict(tau=[[0.1, "-inf"]]), "array of numbers"),
    (dict(theta=-1), "theta"),
    (dict(version=2, recipe={"name": ["paper"]}), "recipe"),
    (dict(config={"block_q": 48}), "power of two"),
    (dict(config={"bogus": 1}), "unknown SaleConfig fields"),
])
def test_load_rejects_bad_contents(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        sale_jax.Thresholds.load(_write(tmp_path / "t.json", **overrides))


def test_load_rejects_mismatched_model_shape(tmp_path):
    path = _write(tmp_path / "t.json")
    with pytest.raises(ValueError, match="num_layers"):
        sale_jax.Thresholds.load(path, num_layers=3)
    with pytest.raises(ValueError, match="num_q_heads"):
        sale_jax.Thresholds.load(path, num_q_heads=8)


def test_load_rejects_non_json(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a thresholds file"):
        sale_jax.Thresholds.load(path)


def test_runs_under_its_calibration_config_whatever_the_backend_or_dense_below():
    thresholds = sale_jax.Thresholds.uniform(2, 4, config=CALIBRATED)
    thresholds.check_config(CALIBRATED)
    thresholds.check_config(dataclasses.replace(CALIBRATED, backend="pallas", interpret=True, dense_below=None))


def test_uniform_thresholds_without_a_config_run_under_any_config():
    sale_jax.Thresholds.uniform(2, 4).check_config(sale_jax.SaleConfig(block_q=64, scale=0.5))


@pytest.mark.parametrize("changes", [
    dict(block_q=32), dict(block_k=32), dict(sink_tokens=0), dict(local_tokens=64),
    dict(quant_granularity="per_block"), dict(estimate="sparse_q"), dict(scale=0.25),
    dict(block_q=32, local_tokens=64),
])
def test_another_selection_geometry_names_each_difference_and_the_remedy(changes):
    thresholds = sale_jax.Thresholds.uniform(2, 4, model_name="tiny", config=CALIBRATED)
    with pytest.raises(ValueError) as error:
        thresholds.check_config(dataclasses.replace(CALIBRATED, **changes))
    message = str(error.value)
    assert "thresholds of tiny were calibrated under another SaleConfig" in message and "Recalibrate" in message
    for name, requested in changes.items():
        assert f"{name}: calibrated {getattr(CALIBRATED, name)!r}, requested {requested!r}" in message
    assert message.count(", requested ") == len(changes)
    assert ", ".join(f"{name}={getattr(CALIBRATED, name)!r}" for name in changes) in message


def test_a_model_refuses_loaded_thresholds_made_for_other_blocks(tmp_path):
    sale_jax.Thresholds.uniform(2, 4, config=dataclasses.replace(CALIBRATED, block_q=32)).save(tmp_path / "t.json")
    loaded = sale_jax.Thresholds.load(tmp_path / "t.json", num_layers=2, num_q_heads=4)
    model = checkpoint.load_llama(FIXTURE, dtype="float32", attention="sale", sale=CALIBRATED)
    tokens = jnp.zeros((1, 64), jnp.int32)
    with pytest.raises(ValueError, match="block_q: calibrated 32, requested 16"):
        llama.prefill(model, tokens, jnp.asarray([64]), loaded)
    llama.prefill(model, tokens, jnp.asarray([64]), dataclasses.replace(loaded, config=CALIBRATED))
