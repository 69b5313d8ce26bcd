"""Shared test fixtures."""

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX types (exact code-for-code comparisons)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test run (seed printed on failure for reproduction)."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)
