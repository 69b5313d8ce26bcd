"""Act-order GPFQ: features walked in descending order of diag(H), codes in kernel order.

Reference: the plain algorithm run on explicitly permuted weights and statistics (per channel,
where the steps do not depend on the order), or on explicitly permuted per-row steps and zero
points (groups: each weight keeps its contiguous group's step), all in float64.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpfq_jax as gq
from gpfq_jax.core import expand_groups, steps_and_zero_points
from gpfq_jax.core.alphabets import QuantSpec


@pytest.fixture
def problem(x64, rng):
    """(W (16, 5), X, X~ (64, 16)) with feature energies far from sorted."""
    n, m, out = 16, 64, 5
    energy = rng.permutation(np.linspace(0.2, 3.0, n))
    x = rng.standard_normal((m, n)) * energy
    xq = x + 0.1 * rng.standard_normal((m, n))
    w = rng.standard_normal((n, out)) / 4
    return w, x, xq


def _perm(xq: np.ndarray) -> np.ndarray:
    return np.argsort(-np.sum(xq * xq, axis=0), kind="stable")


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=3, grid="int", scale="max"),
        QuantSpec(bits=3, grid="int", scale="search"),
        QuantSpec(bits=2, grid="asym", scale="search"),
    ],
    ids=["int-max", "int-search", "asym-search"],
)
def test_per_channel_equals_plain_on_permuted_problem(problem, spec):
    w, x, xq = problem
    perm = _perm(xq)
    assert not np.array_equal(perm, np.arange(len(perm)))
    stats = gq.stats_from_data(jnp.asarray(x), jnp.asarray(xq), dtype=jnp.float64)
    act = gq.quantize_from_stats(jnp.asarray(w), stats, spec, "gpfq", act_order=True)
    stats_p = gq.stats_from_data(jnp.asarray(x[:, perm]), jnp.asarray(xq[:, perm]), jnp.float64)
    plain_p = gq.quantize_from_stats(jnp.asarray(w[perm]), stats_p, spec, "gpfq")
    np.testing.assert_array_equal(np.asarray(act.codes)[perm], np.asarray(plain_p.codes))
    np.testing.assert_allclose(act.rel_error, plain_p.rel_error, rtol=1e-10)
    plain = gq.quantize_from_stats(jnp.asarray(w), stats, spec, "gpfq")
    assert not np.array_equal(np.asarray(plain.codes), np.asarray(act.codes))


@pytest.mark.parametrize("grid", ["int", "asym"])
def test_groups_keep_their_contiguous_steps(problem, grid):
    w, x, xq = problem
    spec = QuantSpec(bits=3, grid=grid, scale="max", group_size=4)
    perm = _perm(xq)
    stats = gq.stats_from_data(jnp.asarray(x), jnp.asarray(xq), dtype=jnp.float64)
    act = gq.quantize_from_stats(jnp.asarray(w), stats, spec, "gpfq", act_order=True)
    delta, zero = steps_and_zero_points(jnp.asarray(w), spec, 1.0)
    rows = lambda a: None if a is None else np.asarray(expand_groups(a, 16, 4))[perm]  # noqa: E731
    h, g = np.asarray(stats.hess[0]), np.asarray(stats.cross[0])
    ref = gq.gpfq_gram_form(
        jnp.asarray(w[perm]), jnp.asarray(h[perm][:, perm]), jnp.asarray(g[perm][:, perm]),
        jnp.asarray(rows(delta)), spec.alphabet,
        zero_point=None if zero is None else jnp.asarray(rows(zero)),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(act.codes)[perm], np.asarray(ref))
    np.testing.assert_allclose(np.asarray(act.step), np.asarray(delta))


def test_driver_passes_act_order_to_gpfq(x64, rng):
    model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(3)])
    x = rng.standard_normal((96, 10)) * rng.permutation(np.linspace(0.1, 3, 10))
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    spec = QuantSpec(bits=3, grid="int", scale="max")
    runs = [
        gq.quantize_params(model, variables, x, spec, "gpfq", act_order=a, progress=False)
        for a in (False, True)
    ]
    assert not np.array_equal(runs[0].layers[0].codes, runs[1].layers[0].codes)
    assert all(np.isfinite(r.rel_error) for res in runs for r in res.layers)
