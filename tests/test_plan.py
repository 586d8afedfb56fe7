"""The routing, in one place: the plan a call resolves (`sale_jax.plan.plan_call`) for every device kind, config
backend and shape the README's backend table names, and that the public entry points run what it says."""

import jax
import jax.numpy as jnp
import pytest

import sale_jax
from sale_jax import api, backends, config as config_module, plan, tuning

DEVICES = {"cpu": ("cpu", False), "gpu": ("gpu", False), "hopper": ("gpu", True)}


@pytest.fixture
def device(monkeypatch):
    """Makes the call's device look like one of DEVICES (JAX's default backend and whether it is sm_90)."""
    def use(kind):
        platform, hopper = DEVICES[kind]
        monkeypatch.setattr(config_module.jax, "default_backend", lambda: platform)
        monkeypatch.setattr(tuning, "on_hopper", lambda: hopper)
    return use


def shapes(head_dim=128, q_len=256, kv_len=256, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((1, q_len, 4, head_dim), dtype), jax.ShapeDtypeStruct((1, kv_len, 2, head_dim), dtype))


# (device, config fields, head_dim): the backend the call runs, or the error it raises.
ROUTES = [
    ("cpu", {}, 128, "reference"),
    ("cpu", {"backend": "triton"}, 128, "triton"),
    ("cpu", {"backend": "mosaic_gpu"}, 128, "mosaic_gpu"),
    ("gpu", {}, 128, "triton"),
    ("gpu", {}, 16, "head_dim to be a power of two >= 32"),
    ("hopper", {}, 128, "mosaic_gpu"),
    ("hopper", {}, 32, "triton"),  # outside the Mosaic GPU estimate's head dims: auto falls back
    ("hopper", {"block_q": 32}, 128, "triton"),  # outside its block_q
    ("hopper", {"block_k": 256}, 128, "triton"),  # wider than its tile
    ("hopper", {"block_q": 64}, 256, "mosaic_gpu"),
    ("hopper", {"backend": "mosaic_gpu"}, 32, "backend='mosaic_gpu' needs head_dim in"),  # explicit: kept, refused
    ("hopper", {"backend": "triton"}, 128, "triton"),
    ("hopper", {"backend": "reference"}, 128, "reference"),
    ("hopper", {"block_q": 8, "block_k": 8}, 128, "block_q >= 16"),  # auto: no kernel takes it
]


@pytest.mark.parametrize("kind, fields, head_dim, want", ROUTES)
def test_the_plan_runs_the_backend_the_readme_names(device, kind, fields, head_dim, want):
    device(kind)
    config = sale_jax.SaleConfig(**fields)
    q, k = shapes(head_dim)
    if want in config_module.BACKENDS:
        assert plan.plan_call(q, k, config).backend == want
    else:
        with pytest.raises(ValueError, match=want):
            plan.plan_call(q, k, config)


@pytest.mark.parametrize("kind, backend, table", [
    ("cpu", "reference", tuning.OTHER_DEVICES), ("cpu", "mosaic_gpu", tuning.HOPPER),
    ("gpu", "triton", tuning.OTHER_DEVICES), ("hopper", "triton", tuning.HOPPER),
    ("hopper", "mosaic_gpu", tuning.HOPPER)])
def test_the_plan_carries_the_devices_tuning_table(device, kind, backend, table):
    """The Mosaic GPU kernels exist for Hopper only, so `mosaic_gpu` always takes the Hopper table (interpret mode
    stands in for it elsewhere); the others take the device's."""
    device(kind)
    assert plan.plan_call(*shapes(), sale_jax.SaleConfig(backend=backend)).tuning == table


@pytest.mark.parametrize("kind, fields, kv_len, dense", [
    ("hopper", {}, 16384, False), ("hopper", {}, 8192, True),  # the H200's crossover at block_q 128
    ("hopper", {"block_q": 64}, 32768, True), ("gpu", {}, 32768, True), ("cpu", {}, 65536, False),
    ("cpu", {"dense_below": 0}, 256, False), ("hopper", {"dense_below": 1 << 20}, 16384, True)])
def test_the_plan_runs_dense_below_the_resolved_crossover(device, kind, fields, kv_len, dense):
    device(kind)
    call_plan = plan.plan_call(*shapes(q_len=128, kv_len=kv_len), sale_jax.SaleConfig(**fields))
    assert call_plan.dense == dense
    assert call_plan.query_chunks == ((0, 128),)


def test_the_plan_splits_long_queries_into_chunks_of_whole_q_blocks():
    config = sale_jax.SaleConfig(dense_below=0, query_chunk=256, backend="reference")
    assert plan.plan_call(*shapes(q_len=600, kv_len=1000), config).query_chunks == ((0, 256), (256, 512), (512, 600))
    dense = sale_jax.SaleConfig(dense_below=2000, query_chunk=256, backend="reference")
    assert plan.plan_call(*shapes(q_len=600, kv_len=1000), dense).query_chunks == ((0, 600),)


def test_every_kernel_backend_name_has_its_module():
    """config.KERNEL_BACKENDS names the kernel backends; backends.KERNEL_MODULES runs them: the two stay in step."""
    assert set(backends.KERNEL_MODULES) == set(config_module.KERNEL_BACKENDS)
    assert set(config_module.KERNEL_BACKENDS) <= set(config_module.BACKENDS)


def test_a_call_resolves_its_plan_once(monkeypatch):
    """The public entry point plans; the jitted passes below it (selection, computation, query chunks) take the plan
    and derive none of it again."""
    calls = []
    plan_call = plan.plan_call
    monkeypatch.setattr(api, "plan_call", lambda *args: calls.append(args) or plan_call(*args))
    config = sale_jax.SaleConfig(dense_below=0, query_chunk=32, block_q=16, block_k=16, backend="reference")
    q = jnp.ones((1, 64, 2, 16), jnp.float32)
    sale_jax.sale_attention(q, q, q, jnp.full((2,), 0.01), config)
    assert len(calls) == 1
