"""Fresh random inputs each run; the seed is printed so a failure can be replayed with SALE_TEST_SEED=<seed>."""

import os
import secrets

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("SALE_TEST_SEED", secrets.randbits(32)))
    print(f"\n{request.node.name}: SALE_TEST_SEED={seed}")
    return np.random.default_rng(seed)
