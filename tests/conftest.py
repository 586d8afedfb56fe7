"""Fresh random inputs each run; the seed is printed so a failure can be replayed with SALE_TEST_SEED=<seed>.
Tests marked `gpu` run only where JAX's default backend is a GPU."""

import os
import secrets

# Four host devices on a CPU for the sharding tests (set before JAX starts; GPU devices are unaffected).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--randomised-only", action="store_true",
                     help="Run only the tests that draw from the seeded `rng` fixture (scripts/seed_sweep.py).")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--randomised-only"):
        fixed = [item for item in items if "rng" not in getattr(item, "fixturenames", ())]
        config.hook.pytest_deselected(items=fixed)
        items[:] = [item for item in items if "rng" in getattr(item, "fixturenames", ())]
    backend = jax.default_backend()
    if backend == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU (JAX's default backend is {backend})")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("SALE_TEST_SEED", secrets.randbits(32)))
    print(f"\n{request.node.name}: SALE_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def exact_f32_matmuls():
    """f32 matmuls in full f32: on a GPU JAX's default is TF32 (~1e-3 relative), too coarse for the f32 parity
    tests against Hugging Face and numpy. The kernels' own tests do not use it; they run in their input dtype."""
    with jax.default_matmul_precision("highest"):
        yield
