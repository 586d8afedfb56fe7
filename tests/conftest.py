"""Fresh random inputs each run; the seed is printed so a failure can be replayed with SALE_TEST_SEED=<seed>."""

import os
import secrets

# Four host devices on a CPU for the sharding tests (set before JAX starts; GPU devices are unaffected).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("SALE_TEST_SEED", secrets.randbits(32)))
    print(f"\n{request.node.name}: SALE_TEST_SEED={seed}")
    return np.random.default_rng(seed)
