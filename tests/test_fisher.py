"""The diagonal Fisher (core.fisher); the allocation weighted by it is in test_bit_budget.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpfq_jax.core.fisher import fisher_diagonal, fisher_error


def test_fisher_diagonal_equals_the_per_batch_gradients_squared(rng):
    """Least squares 1/2 mean((x W - y)^2) has gradient x^T (x W - y) / n per batch: the
    Fisher is the mean over batches of its square, leaf by leaf (a dict of two leaves)."""
    w = rng.normal(size=(5, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    batches = [(rng.normal(size=(4, 5)), rng.normal(size=(4, 3))) for _ in range(6)]
    batches = [(x.astype(np.float32), y.astype(np.float32)) for x, y in batches]

    def loss(p, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, axis=-1))

    got = fisher_diagonal(loss, {"w": w, "b": b}, batches)
    gw, gb = [], []
    for x, y in batches:
        r = (x.astype(np.float64) @ w + b - y) / len(x)
        gw.append((x.T @ r) ** 2)
        gb.append(r.sum(0) ** 2)
    np.testing.assert_allclose(got["w"], np.mean(gw, 0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["b"], np.mean(gb, 0), rtol=1e-4, atol=1e-7)
    assert got["w"].dtype == jnp.float32 and got["w"].shape == w.shape


def test_fisher_diagonal_bad_input():
    loss = lambda p, x: jnp.sum(p["w"] * x)  # noqa: E731
    with pytest.raises(ValueError, match="at least one batch"):
        fisher_diagonal(loss, {"w": jnp.ones(3)}, [])
    with pytest.raises(ValueError, match=r"not finite at \['w'\]"):
        fisher_diagonal(loss, {"w": jnp.ones(3)}, [jnp.array([1.0, jnp.inf, 0.0])])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_fisher_error_is_half_the_weighted_squared_error(seed, scale):
    r = np.random.default_rng(seed)
    f, w, q = r.random((4, 6)), r.normal(size=(4, 6)), r.normal(size=(4, 6))
    expect = 0.5 * sum(f[i, j] * (q[i, j] - w[i, j]) ** 2 for i in range(4) for j in range(6))
    assert fisher_error(f, w, q) == pytest.approx(expect, rel=1e-12)
    assert fisher_error(scale * f, w, q) == pytest.approx(scale * expect, rel=1e-12)
    assert fisher_error(f, w, w) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        fisher_error(f[:, :5], w, q)
