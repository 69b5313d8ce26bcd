"""The diagonal Fisher (core.fisher) and the bit allocation weighted by it (budget_fisher)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
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


# ----------------------------------------------------------------------- the allocation


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


CANDIDATES = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def mlp():
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 64))
    labels = jax.random.randint(jax.random.PRNGKey(2), (96,), 0, 10)
    model = MLP()
    variables = model.init(jax.random.PRNGKey(1), x[:1])

    def loss(params, batch):
        xb, yb = batch
        logits = model.apply({"params": params}, xb)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, yb[:, None], -1)[:, 0])  # fmt: skip

    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, 96, 8)]
    return model, variables, x, fisher_diagonal(loss, variables["params"], batches)


def _kw(**kw):
    return {"progress": False, "batch_size": 32, "budget_candidates": CANDIDATES, **kw}


def test_fisher_allocation_errors_are_the_fisher_estimates_of_float_stats_codes(mlp):
    """Reference: each layer's float inputs computed by hand, its statistics from the whole
    data (X~ = X), quantized at every candidate; the error of each is 1/2 sum F (Q - W)^2."""
    model, variables, x, fisher = mlp
    alloc = gq.allocate_bits(model, variables, x, budget_bits=3.3, budget_fisher=fisher, **_kw())
    assert alloc.objective == "fisher" and alloc.bits_per_weight <= 3.3
    p = variables["params"]
    inputs = [x]
    for name in ("Dense_0", "Dense_1"):
        inputs.append(jax.nn.relu(inputs[-1] @ p[name]["kernel"] + p[name]["bias"]))
    for a, name, h in zip(alloc.layers, ("Dense_0", "Dense_1", "Dense_2"), inputs):
        assert a.name == name
        stats = gq.stats_from_data(h)
        kernel = p[name]["kernel"]
        for bits, err in zip(a.candidates, a.errors):
            q = gq.quantize_from_stats(kernel, stats, gq.QuantSpec(bits=bits)).q
            expect = fisher_error(fisher[name]["kernel"], kernel, q)
            assert err == pytest.approx(expect, rel=1e-3, abs=1e-12), (name, bits)
        assert list(a.errors) == sorted(a.errors, reverse=True)  # more bits, less loss
    res = gq.quantize_params(model, variables, x, budget_bits=3.3, budget_fisher=fisher, **_kw())
    assert res.bit_allocation.bits == alloc.bits and res.bit_allocation.objective == "fisher"
    assert alloc.with_budget(9.0).objective == "fisher"


def test_fisher_gives_the_bits_to_the_layer_the_loss_is_sensitive_to(mlp):
    """The same statistics, one layer's Fisher multiplied by 1e6: that layer gets the widest
    candidate, which 5.5 bits per weight afford for one of the two wide layers only (8 + 0.5
    bits of steps on 3072 weights, the rest at 2), and which layer gets it follows the Fisher."""
    model, variables, x, fisher = mlp
    chosen = {}
    for heavy in ("Dense_0", "Dense_1"):
        f = jax.tree.map(lambda a: a, fisher)
        f[heavy] = {**f[heavy], "kernel": f[heavy]["kernel"] * 1e6}
        alloc = gq.allocate_bits(model, variables, x, budget_bits=5.5, budget_fisher=f, **_kw())
        chosen[heavy] = alloc.bits
        assert alloc.bits[heavy] == 8, alloc.bits
    assert chosen["Dense_0"] != chosen["Dense_1"]
    plain = gq.allocate_bits(model, variables, x, budget_bits=5.5, **_kw())
    assert plain.objective == "output"


def test_fisher_bad_input_names_the_layer(mlp):
    model, variables, x, fisher = mlp

    def alloc(f):
        return gq.allocate_bits(model, variables, x, budget_bits=3.3, budget_fisher=f, **_kw())

    missing = {k: v for k, v in fisher.items() if k != "Dense_1"}
    with pytest.raises(ValueError, match="layer 'Dense_1': budget_fisher has no entry at "
                                         "'Dense_1/kernel'"):  # fmt: skip
        alloc(missing)
    for bad, match in ((fisher["Dense_1"]["kernel"][:, :5], "has shape"),
                       (-fisher["Dense_1"]["kernel"], "finite and >= 0"),
                       (fisher["Dense_1"]["kernel"] * jnp.nan, "finite and >= 0")):  # fmt: skip
        with pytest.raises(ValueError, match=f"layer 'Dense_1'.*{match}"):
            alloc({**fisher, "Dense_1": {**fisher["Dense_1"], "kernel": bad}})
    with pytest.raises(ValueError, match="nested mapping"):
        alloc([1.0])
    with pytest.raises(ValueError, match="needs budget_bits"):
        gq.quantize_params(model, variables, x, budget_fisher=fisher, progress=False)
    skipped = gq.allocate_bits(model, variables, x, rules=[gq.Rule("Dense_1", skip=True)],
                               budget_bits=3.3, budget_fisher=missing, **_kw())  # fmt: skip
    assert [a.name for a in skipped.layers] == ["Dense_0", "Dense_2"]
