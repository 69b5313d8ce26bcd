"""Mixed precision under a bits-per-weight budget: the knapsack solver against brute force,
and ``allocate_bits`` / ``quantize_params(budget_bits=)`` on tiny Linen and NNX models."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
from gpfq_jax.core.bit_budget import brute_force_budget, budget_units, cost_unit, solve_budget
from gpfq_jax.core.fisher import fisher_diagonal, fisher_error

# ----------------------------------------------------------------------------- the solver


@st.composite
def instances(draw):
    """(errors (L, K), integer costs (L, K), integer budget) with L <= 6, K <= 4."""
    n_layers, n_opts = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    errors = rng.random((n_layers, n_opts)) * rng.choice([1e-3, 1.0, 10.0])
    if draw(st.booleans()):  # ties
        errors = np.round(errors, 1)
    costs = rng.integers(0, 40, (n_layers, n_opts))
    lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
    budget = draw(st.integers(lo - 3, hi + 3))
    return errors, costs, budget


@settings(max_examples=150, deadline=None)
@given(instances())
def test_solver_equals_brute_force(inst):
    errors, costs, budget = inst
    ref = brute_force_budget(errors, costs, budget)
    if ref is None:
        with pytest.raises(ValueError, match="infeasible"):
            solve_budget(errors, costs, budget)
        return
    sol = solve_budget(errors, costs, budget)
    assert sol.exact
    assert sol.cost <= budget
    rows = np.arange(len(errors))
    assert sol.cost == costs[rows, list(sol.choice)].sum()
    assert math.isclose(sol.objective, ref.objective, rel_tol=1e-12, abs_tol=1e-15)


def test_solver_six_layers_four_candidates_bit_costs(rng):
    """The shape of a real allocation: bit widths (2, 3, 4, 8) of layers of different sizes,
    costs n * b + 32 * n_out, errors falling with the bits; every budget on a grid."""
    sizes = [(16, 32), (32, 32), (32, 64), (64, 32), (32, 16), (16, 8)]
    bits = np.array([2, 3, 4, 8])
    costs = np.array([n * o * bits + 32 * o for n, o in sizes])
    errors = np.array([rng.random() * 4.0**-bits for _ in sizes])
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    for budget in np.linspace(lo, hi, 25).astype(int):
        sol, ref = (
            solve_budget(errors, costs, int(budget)),
            brute_force_budget(errors, costs, budget),
        )
        assert sol.exact and sol.cost <= budget
        assert math.isclose(sol.objective, ref.objective, rel_tol=1e-12)


def test_coarse_unit_stays_within_budget_and_is_monotone(rng):
    """With fewer cells than the exact range needs, costs round up: never over budget, never
    better than the optimum, and a larger budget never gives a larger objective."""
    errors, costs = rng.random((6, 4)), rng.integers(100, 10_000, (6, 4))
    assert not cost_unit(costs, max_cells=50)[1]
    lo, hi = int(costs.min(1).sum()), int(costs.max(1).sum())
    last = math.inf
    for budget in range(lo, hi + 1, (hi - lo) // 40):
        sol = solve_budget(errors, costs, budget, max_cells=50)
        ref = brute_force_budget(errors, costs, budget)
        assert not sol.exact and sol.cost <= budget
        assert sol.objective >= ref.objective - 1e-12
        assert sol.objective <= last + 1e-12
        last = sol.objective


def test_budget_units_exact():
    assert budget_units(2.5, 4) == 10
    assert budget_units(0.1, 10) == 1  # Fraction(0.1) * 10 is just above 1
    assert budget_units(3.0, 7) == 21
    assert budget_units(4.125, 4096 * 4096) == 4.125 * 4096 * 4096
    for total, weights in ((13_669, 5_307), (10**9 + 7, 3 * 10**8 + 1), (2, 3)):
        assert budget_units(total / weights, weights) == total  # a reported average is met
        assert budget_units(np.nextafter(total / weights, 0), weights) == total - 1


@pytest.mark.parametrize(
    "errors, costs, budget, match",
    [
        ([[0.1, np.nan]], [[1, 2]], 5, "finite"),
        ([[0.1, -1.0]], [[1, 2]], 5, "finite"),
        ([[0.1, 0.2]], [[1, 2, 3]], 5, "same shape"),
        ([[0.1, 0.2]], [[1.0, 2.0]], 5, "integers"),
        ([[0.1, 0.2]], [[1, -2]], 5, ">= 0"),
        (np.zeros((0, 2)), np.zeros((0, 2), int), 5, "non-empty"),
        ([[0.1, 0.2]], [[3, 4]], 2, "infeasible budget 2: the cheapest options cost 3"),
        ([[0.1, 0.2]], [[3, 4]], 2.5, "integer"),
    ],
)
def test_solver_bad_input(errors, costs, budget, match):
    with pytest.raises(ValueError, match=match):
        solve_budget(errors, costs, budget)


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def mlp():
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 64))
    model = MLP()
    return model, model.init(jax.random.PRNGKey(1), x[:1]), x


def _kw(**kw):
    return {"progress": False, "batch_size": 32, **kw}


def _codes(res):
    return {r.name: np.asarray(r.codes) for r in res.layers}


def _size_bits_per_weight(res, variables):
    rep = gq.size_report(res, variables)
    params = sum(lay["params"] for lay in rep["layers"])
    return 8 * (rep["codes_bytes"] + rep["scales_bytes"]) / params


@pytest.mark.parametrize(
    "spec, budget, cands",
    [(gq.QuantSpec(), 3.3, (2, 3, 4, 8)), (gq.QuantSpec(grid="asym", group_size=32), 4.6, (3, 4))],
)
def test_mlp_allocation_then_plain_run(mlp, spec, budget, cands):
    """Within budget, counted as size_report counts it; the budgeted run's codes equal a plain
    run with the chosen bits as rules; allocate_bits agrees with the run's report."""
    model, variables, x = mlp
    kw = _kw(budget_candidates=cands)
    alloc = gq.allocate_bits(model, variables, x, spec, budget_bits=budget, **kw)
    assert alloc.bits_per_weight <= budget and alloc.exact
    assert alloc.min_bits_per_weight <= alloc.bits_per_weight
    assert len(set(alloc.bits.values())) > 1  # a mixed choice at this budget
    res = gq.quantize_params(model, variables, x, spec, budget_bits=budget, **kw)
    assert res.bit_allocation.bits == alloc.bits
    assert res.bit_allocation.total_error == pytest.approx(alloc.total_error, rel=1e-6)
    assert {r.name: r.spec.bits for r in res.layers} == alloc.bits
    assert _size_bits_per_weight(res, variables) == pytest.approx(alloc.bits_per_weight, 1e-12)
    hand = [gq.Rule(f"^{re.escape(n)}$", bits=b) for n, b in alloc.bits.items()]
    plain = gq.quantize_params(model, variables, x, spec, rules=hand, **_kw())
    for name, codes in _codes(res).items():
        np.testing.assert_array_equal(codes, _codes(plain)[name], err_msg=name)
    row = alloc.summary()[0]
    assert tuple(row["errors"]) == cands and row["bits"] in row["errors"]


def test_mlp_larger_budget_never_larger_error(mlp):
    """One measurement, re-solved at growing budgets (``with_budget``): within each budget,
    the summed error never grows, and the largest budget gives 8 bits everywhere."""
    model, variables, x = mlp
    alloc = gq.allocate_bits(model, variables, x, budget_bits=3.0, **_kw())
    last, totals = math.inf, []
    for budget in np.linspace(alloc.min_bits_per_weight, 9.0, 40):
        a = alloc.with_budget(float(budget))
        assert a.bits_per_weight <= budget and a.exact
        assert a.total_error <= last + 1e-12
        last = a.total_error
        totals.append(a.total_error)
    assert totals[-1] < totals[0]
    assert set(a.bits.values()) == {8}  # 9 bits per weight affords 8 bits everywhere
    assert set(alloc.with_budget(alloc.min_bits_per_weight).bits.values()) == {2}
    assert alloc.with_budget(3.0).bits == alloc.bits
    with pytest.raises(ValueError, match="minimum achievable"):
        alloc.with_budget(alloc.min_bits_per_weight * 0.999)


def test_mlp_skip_rules_and_method_rules_are_kept(mlp):
    """A skipped layer stays float and out of the budget; a method rule survives the
    allocation's per-layer rules."""
    model, variables, x = mlp
    rules = [gq.Rule("Dense_2", skip=True), gq.Rule("Dense_0", method="rtn")]
    res = gq.quantize_params(model, variables, x, rules=rules, budget_bits=3.0, **_kw())
    assert [a.name for a in res.bit_allocation.layers] == ["Dense_0", "Dense_1"]
    assert res.skipped == ["Dense_2"] and res["Dense_0"].method == "rtn"
    assert res["Dense_1"].method == "gpfq"


def test_mlp_budget_errors(mlp):
    model, variables, x = mlp

    def alloc(budget=3.0, **kw):
        return gq.allocate_bits(model, variables, x, budget_bits=budget, **_kw(**kw))

    # Steps (float32, one per output channel) push the 2-bit choice above 2 bits per weight.
    with pytest.raises(ValueError, match=r"infeasible: the minimum achievable is 2\.57547 bits"):
        alloc(2.0)
    with pytest.raises(ValueError, match="codes alone take 3.0000"):
        alloc(2.5, budget_candidates=(3, 4))
    for bad in (float("nan"), float("inf"), 0, -1.0, "3", True):
        with pytest.raises(ValueError, match="budget_bits"):
            alloc(bad)
    for bad, match in (((), "empty"), (("ternary",), "ternary"), ((1, 2), "2..8"),
                       ((2, 9), "2..8"), ((2, 2), "duplicates"), (4, "sequence")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            alloc(budget_candidates=bad)
    for rule in (gq.Rule("Dense_0", bits=8), gq.Rule("Dense_1", spec={"bits": 8}),
                 gq.Rule("Dense_1", spec=gq.QuantSpec(bits=4))):  # fmt: skip
        with pytest.raises(ValueError, match="fixes the bit width"):
            alloc(rules=[rule])
        with pytest.raises(ValueError, match="fixes the bit width"):
            gq.quantize_params(model, variables, x, rules=[rule], budget_bits=3.0, **_kw())
    with pytest.raises(ValueError, match="layer 'Dense_0'.*ternary"):
        gq.allocate_bits(model, variables, x, gq.QuantSpec(bits="ternary"), budget_bits=3.0,
                         **_kw())  # fmt: skip
    with pytest.raises(ValueError, match="every layer is skipped"):
        alloc(rules=[gq.Rule("Dense", skip=True)])


def test_nnx_transformer_budgeted_run_equals_plain_run():
    """A tiny NNX transformer (shared q/k/v and gate/up statistics, DenseGeneral, Einsum,
    blocks run by the frontier): the budgeted run's codes equal a plain run with its bits.
    Width 8: a float32 step per channel costs 2 to 4 bits per weight, so the candidates
    (2, 8) span about 6 to 12 bits per weight."""
    import _transformers as T
    from flax import nnx

    model = T.NnxStack(2, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, T.SEQ, T.IN))
    kw = _kw(batch_size=4)
    res = gq.quantize_params(model, None, x, budget_bits=8.0, budget_candidates=(2, 8), **kw)
    alloc = res.bit_allocation
    assert alloc.bits_per_weight <= 8.0 and res.driver.mode == "frontier"
    assert [a.name for a in alloc.layers] == T.nnx_layer_names(2)
    assert len(set(alloc.bits.values())) > 1
    plain = gq.quantize_params(model, None, x, rules=alloc.rules(), **kw)
    for name, codes in _codes(res).items():
        np.testing.assert_array_equal(codes, _codes(plain)[name], err_msg=name)
    assert _size_bits_per_weight(res, model) == pytest.approx(alloc.bits_per_weight, 1e-12)


# ------------------------------------------------------------- the Fisher objective


@pytest.fixture(scope="module")
def mlp_fisher(mlp):
    """The MLP with the Fisher of a cross-entropy on random labels (12 batches of 8)."""
    model, variables, x = mlp
    labels = jax.random.randint(jax.random.PRNGKey(2), (96,), 0, 10)

    def loss(params, batch):
        xb, yb = batch
        logits = model.apply({"params": params}, xb)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, yb[:, None], -1)[:, 0])  # fmt: skip

    batches = [(x[i : i + 8], labels[i : i + 8]) for i in range(0, 96, 8)]
    return model, variables, x, fisher_diagonal(loss, variables["params"], batches)


def test_fisher_allocation_errors_are_the_fisher_estimates_of_float_stats_codes(mlp_fisher):
    """Reference: each layer's float inputs computed by hand, its statistics from the whole
    data (X~ = X), quantized at every candidate; the error of each is 1/2 sum F (Q - W)^2."""
    model, variables, x, fisher = mlp_fisher
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


def test_fisher_gives_the_bits_to_the_layer_the_loss_is_sensitive_to(mlp_fisher):
    """The same statistics, one layer's Fisher multiplied by 1e6: that layer gets the widest
    candidate, which 5.5 bits per weight afford for one of the two wide layers only (8 + 0.5
    bits of steps on 3072 weights, the rest at 2), and which layer gets it follows the Fisher."""
    model, variables, x, fisher = mlp_fisher
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


def test_fisher_bad_input_names_the_layer(mlp_fisher):
    model, variables, x, fisher = mlp_fisher

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
    with pytest.raises(ValueError, match="fold_batchnorm=True"):
        gq.allocate_bits(model, variables, x, budget_bits=3.3, budget_fisher=fisher,
                         fold_batchnorm=True, **_kw())  # fmt: skip
    with pytest.raises(ValueError, match="fold_batchnorm=True"):
        gq.quantize_params(model, variables, x, budget_bits=3.3, budget_fisher=fisher,
                           fold_batchnorm=True, **_kw())  # fmt: skip
    with pytest.raises(ValueError, match="needs budget_bits"):
        gq.quantize_params(model, variables, x, budget_fisher=fisher, progress=False)
    skipped = gq.allocate_bits(model, variables, x, rules=[gq.Rule("Dense_1", skip=True)],
                               budget_bits=3.3, budget_fisher=missing, **_kw())  # fmt: skip
    assert [a.name for a in skipped.layers] == ["Dense_0", "Dense_2"]


def test_nnx_fisher_is_read_from_the_models_pure_dict():
    """NNX: the Fisher shaped like ``nnx.to_pure_dict(nnx.state(model))`` is found at every
    layer's kernel (DenseGeneral / Einsum kernels of any rank); with F = 1 each candidate's
    error is 1/2 ||Q - W||^2, which falls as the width grows."""
    import _transformers as T
    from flax import nnx

    model = T.NnxStack(2, nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, T.SEQ, T.IN))
    ones = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    alloc = gq.allocate_bits(model, None, x, budget_bits=8.0, budget_candidates=(2, 8),
                             budget_fisher=ones, **_kw(batch_size=4))  # fmt: skip
    assert alloc.objective == "fisher" and [a.name for a in alloc.layers] == T.nnx_layer_names(2)
    for a in alloc.layers:
        assert a.errors[0] > a.errors[1] > 0, a.name
