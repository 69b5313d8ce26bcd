"""Group-wise steps (``QuantSpec(group_size=...)``) and the asymmetric grid (``grid="asym"``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import numpy_gpfq
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
from gpfq_jax.core import (
    accumulate,
    bits_per_weight,
    expand_groups,
    init_stats,
    steps_and_zero_points,
)
from gpfq_jax.core.alphabets import make_alphabet


def _problem(rng, m, n, n_out, noise=0.1, dtype=np.float64):
    x = np.maximum(rng.normal(size=(m, n)), 0) + 0.1 * rng.normal(size=(m, n))
    xq = x + noise * rng.normal(size=(m, n))
    w = rng.normal(size=(n, n_out)) / np.sqrt(n) + 0.02  # a little asymmetry
    return (jnp.asarray(w, dtype), jnp.asarray(x, dtype), jnp.asarray(xq, dtype))


def _rows(spec, w):
    """Per-feature-row steps and zero points (N, N_out) of ``spec`` for ``w``."""
    delta, zero = steps_and_zero_points(w, spec)
    n = w.shape[0]
    delta = jnp.broadcast_to(expand_groups(delta, n, spec.group_size), w.shape)
    if zero is not None:
        zero = jnp.broadcast_to(expand_groups(zero, n, spec.group_size), w.shape)
    return delta, zero


def numpy_gptq(w, h, delta, zero, alphabet, damp=0.01, act_order=False):
    """GPTQ column by column (Frantar et al. 2022, Alg. 1, B = 1), steps per (row, neuron)
    fixed in the original order (static groups)."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    delta = np.asarray(delta, np.float64)
    zero = np.zeros_like(w) if zero is None else np.asarray(zero, np.float64)
    n = w.shape[0]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h, delta, zero = w[perm], h[perm][:, perm], delta[perm], zero[perm]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros_like(w)
    for i in range(n):
        s = w[i] / delta[i] - alphabet.offset + zero[i]
        codes[i] = np.clip(np.round(s), alphabet.kmin, alphabet.kmax)
        err = (w[i] - delta[i] * (codes[i] - zero[i] + alphabet.offset)) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    return codes[np.argsort(perm)]


# ---------------------------------------------------------------- spec and storage


@pytest.mark.parametrize("bad", [True, 1.5, "4", np.float32(4.0)])
def test_group_size_type_errors(bad):
    with pytest.raises(TypeError, match="group_size"):
        gq.QuantSpec(group_size=bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_group_size_value_errors(bad):
    with pytest.raises(ValueError, match="group_size"):
        gq.QuantSpec(group_size=bad)


def test_group_size_accepts_numpy_int_and_round_trips():
    spec = gq.QuantSpec(group_size=np.int64(64), grid="asym")
    assert spec.group_size == 64 and type(spec.group_size) is int
    assert gq.QuantSpec(**spec.to_dict()) == spec


@pytest.mark.parametrize("scale", ["median", "mean_max"])
def test_asym_rejects_symmetric_rules(scale):
    with pytest.raises(ValueError, match="asym"):
        gq.QuantSpec(grid="asym", scale=scale)


def test_asym_alphabet():
    a = make_alphabet(4, "asym")
    assert (a.kmin, a.kmax, a.offset, a.levels, a.storage_bits) == (0, 15, 0.0, 16, 4)
    t = make_alphabet("ternary", "asym")
    assert (t.kmin, t.kmax, t.storage_bits) == (0, 2, 2)


def test_bits_per_weight():
    g128 = gq.QuantSpec(bits=4, group_size=128)
    assert bits_per_weight(g128, 4096) == 4.125
    # asym: the zero point is stored in the codes' width (4 bits) per group as well
    assert bits_per_weight(gq.QuantSpec(bits=4, grid="asym", group_size=128), 4096) == 4.15625
    # a shorter last group: 576 = 4 * 128 + 64 -> 5 groups per neuron
    assert bits_per_weight(g128, 576) == pytest.approx(4 + 5 * 16 / 576)
    assert bits_per_weight(gq.QuantSpec(bits=4), 4096) == 4 + 16 / 4096  # per channel
    assert bits_per_weight(gq.QuantSpec(bits=4, group_size=8192), 4096) == 4 + 16 / 4096
    assert bits_per_weight(g128, 4096, step_bits=32) == 4.25
    assert bits_per_weight(gq.QuantSpec(bits=4, grid="zzs"), 100, n_out=10) == 5 + 16 / 1000
    assert bits_per_weight(gq.QuantSpec(bits=4, grid="zzs"), 100) == 5  # per layer, n_out unknown
    with pytest.raises(ValueError):
        bits_per_weight(g128, 0)


# ---------------------------------------------------------------- steps


def test_shorter_last_group_steps_and_zero_points(rng):
    w = jnp.asarray(rng.normal(size=(10, 3)), jnp.float64 if jax.config.x64_enabled else None)
    wn = np.asarray(w)
    bounds = [(0, 4), (4, 8), (8, 10)]
    delta, zero = steps_and_zero_points(w, gq.QuantSpec(bits=4, group_size=4))
    assert delta.shape == (3, 3) and zero is None
    want = np.stack([np.abs(wn[s:e]).max(0) / 7 for s, e in bounds])
    np.testing.assert_allclose(np.asarray(delta), want, rtol=1e-6)
    delta, zero = steps_and_zero_points(w, gq.QuantSpec(bits=4, grid="asym", group_size=4))
    lo = np.stack([np.minimum(wn[s:e].min(0), 0) for s, e in bounds])
    hi = np.stack([np.maximum(wn[s:e].max(0), 0) for s, e in bounds])
    np.testing.assert_allclose(np.asarray(delta), (hi - lo) / 15, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(zero), np.clip(np.round(-lo / ((hi - lo) / 15)), 0, 15)
    )
    med = np.stack([np.median(np.abs(wn[s:e]), 0) for s, e in bounds])
    delta, _ = steps_and_zero_points(w, gq.QuantSpec(bits=3, grid="ls", group_size=4))
    np.testing.assert_allclose(np.asarray(delta), med / 3.5, rtol=1e-6)
    rows = np.asarray(expand_groups(delta, 10, 4))
    np.testing.assert_array_equal(rows, np.asarray(delta)[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]])


@pytest.mark.parametrize("method", ["gpfq", "rtn", "gptq", "qronos"])
@pytest.mark.parametrize("grid", ["int", "asym", "ls"])
def test_one_group_is_per_channel(rng, method, grid):
    """group_size >= N (one group) gives exactly the per-channel codes, steps and q."""
    w, x, xq = _problem(rng, 120, 12, 5, dtype=np.float32)
    base = dict(bits=3, grid=grid, per_channel=True, scale="search")
    ref = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(**base), method=method)
    assert ref.group_size is None and ref.step.shape == (5,)
    for gs in (12, 50):
        got = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(**base, group_size=gs), method=method)
        assert got.step.shape == (1, 5)
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
        np.testing.assert_array_equal(np.asarray(got.step)[0], np.asarray(ref.step))
        np.testing.assert_array_equal(np.asarray(got.q), np.asarray(ref.q))
        np.testing.assert_array_equal(np.asarray(got.c), np.asarray(ref.c))
        if grid == "asym":
            np.testing.assert_array_equal(np.asarray(got.zero_point)[0], np.asarray(ref.zero_point))
        assert got.rel_error == ref.rel_error


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 13),
    n_out=st.integers(1, 4),
    group_size=st.integers(1, 15),
    grid=st.sampled_from(["int", "int_full", "ls", "asym"]),
    method=st.sampled_from(["gpfq", "rtn", "gptq", "qronos"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_codes_lie_on_each_groups_alphabet(n, n_out, group_size, grid, method, seed):
    rng = np.random.default_rng(seed)
    w, x, xq = _problem(rng, 30, n, n_out, dtype=np.float32)
    spec = gq.QuantSpec(bits=3, grid=grid, group_size=group_size, per_channel=True)
    r = gq.quantize_layer(w, x, xq, spec=spec, method=method)
    a = spec.alphabet
    codes = np.asarray(r.codes)
    assert codes.min() >= a.kmin and codes.max() <= a.kmax
    ng = -(-n // group_size)
    assert r.step.shape == (ng, n_out)
    step, zero = np.asarray(r.weight_step), r.weight_zero_point
    # each weight's step is its own group's: constant inside a group, the group's rule
    delta, zp = steps_and_zero_points(w, spec)
    for t in range(n):
        np.testing.assert_allclose(step[t], np.asarray(delta)[t // group_size], rtol=1e-6)
    assert (zero is None) == (grid != "asym")
    zero = 0.0 if zero is None else np.asarray(zero)
    if grid == "asym":
        assert np.all(zero == np.round(zero)) and zero.min() >= 0 and zero.max() <= a.kmax
    # q is on the group's levels, and is exactly step * (codes - zero + offset)
    np.testing.assert_array_equal(
        np.asarray(r.q),
        np.asarray(gq.dequantize(r.codes, r.weight_step, r.offset, zero_point=r.weight_zero_point)),
    )
    k = np.asarray(r.q) / step + zero - a.offset
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)


# ---------------------------------------------------------------- the recurrences


@pytest.mark.parametrize(
    "grid,bits,group_size",
    [("int", 3, 4), ("int", "ternary", 7), ("ls", 2, 5), ("asym", 3, None), ("asym", 4, 6)],
)
@pytest.mark.parametrize("stochastic", [False, True])
def test_data_and_gram_forms_agree(x64, rng, grid, bits, group_size, stochastic):
    """Float64: data form == Gram form (one block and blocks that straddle the groups) ==
    the numpy loops, code for code, with steps changing at each group boundary."""
    w, x, xq = _problem(rng, 60, 23, 6)
    spec = gq.QuantSpec(bits=bits, grid=grid, group_size=group_size)
    delta, zero = _rows(spec, w)
    a = spec.alphabet
    u = None
    if stochastic:
        u = jax.random.uniform(jax.random.PRNGKey(int(rng.integers(1 << 30))), w.shape, w.dtype)
    stats = gq.stats_from_data(x, xq, x.dtype)
    h, g = stats.hess[0], stats.cross[0]
    data = np.asarray(gq.gpfq_data_form(w, x, xq, delta, a, uniform=u, zero_point=zero))
    for block in (23, 5):
        gram = gq.gpfq_gram_form(w, h, g, delta, a, block_size=block, uniform=u, zero_point=zero)
        np.testing.assert_array_equal(data, np.asarray(gram))
    ref = numpy_gpfq(w, x, xq, delta, a, zero=zero, uniform=None if u is None else np.asarray(u))
    np.testing.assert_array_equal(data, ref)
    if group_size is not None:  # the steps really differ between groups
        assert len(np.unique(np.asarray(delta)[:, 0])) > 1


def test_per_neuron_steps_broadcast_like_rows(x64, rng):
    """delta (N_out,) and its broadcast (N, N_out) give the same codes in every method."""
    w, x, xq = _problem(rng, 40, 11, 4)
    spec = gq.QuantSpec(bits=3)
    d = gq.step_size(w, spec)
    rows = jnp.broadcast_to(d, w.shape)
    stats = gq.stats_from_data(x, xq, x.dtype)
    a = spec.alphabet
    for fn in (
        lambda dd: gq.gpfq_data_form(w, x, xq, dd, a),
        lambda dd: gq.gpfq_gram_form(w, stats.hess[0], stats.cross[0], dd, a, block_size=3),
        lambda dd: gq.gptq_codes(w, stats.hess[0], dd, a, act_order=True),
        lambda dd: gq.rtn_codes(w, dd, a),
    ):
        np.testing.assert_array_equal(np.asarray(fn(d)), np.asarray(fn(rows)))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid,bits,group_size", [("int", 3, 4), ("asym", 3, 5), ("asym", 4, None)])
def test_gptq_group_wise_equals_numpy_reference(x64, rng, act_order, grid, bits, group_size):
    m, n, n_out = 80, 14, 5
    x = rng.normal(size=(m, n)) @ rng.normal(size=(n, n)) / np.sqrt(n)
    x[:, 5] = 0.0  # a dead input
    w = jnp.asarray(rng.normal(size=(n, n_out)) + 0.3)
    h = x.T @ x
    spec = gq.QuantSpec(bits=bits, grid=grid, group_size=group_size)
    delta, zero = _rows(spec, w)
    ref = numpy_gptq(w, h, delta, zero, spec.alphabet, act_order=act_order)
    for block in (1, 4, n):
        got = gq.gptq_codes(
            w, jnp.asarray(h), delta, spec.alphabet, block_size=block, act_order=act_order,
            zero_point=zero,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), ref)


# ---------------------------------------------------------------- layer results


@pytest.mark.parametrize("grid", ["int", "asym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gpfq_beats_rtn_at_equal_group_size(rng, grid, bits):
    """Gaussian inputs, m >> N (fixed seed): GPFQ's output error is below RTN's, groups of 32."""
    m, n, n_out = 2000, 128, 32
    x = rng.normal(size=(m, n))
    x = jnp.asarray(x @ (rng.normal(size=(n, n)) / np.sqrt(n)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n, n_out)) / np.sqrt(n), jnp.float32)
    spec = gq.QuantSpec(bits=bits, grid=grid, group_size=32, scale="search")
    g = gq.quantize_layer(w, x, spec=spec, method="gpfq")
    r = gq.quantize_layer(w, x, spec=spec, method="rtn")
    assert g.rel_error < 0.9 * r.rel_error, (g.rel_error, r.rel_error)
    # groups help RTN too: finer steps than per channel
    rc = gq.quantize_layer(w, x, spec=gq.QuantSpec(bits=bits, grid=grid), method="rtn")
    assert r.rel_error < rc.rel_error


@pytest.mark.parametrize("group_size", [4, None])
@pytest.mark.parametrize("pow2", [True, False])
def test_asym_rtn_requantizes_asym_grid_weights(rng, group_size, pow2):
    """Weights already on a 4-bit asymmetric grid (both end codes used in every group) come
    back with the same codes and zero points; with power-of-two steps q is bit-exact."""
    n, n_out = 10, 6
    gs = n if group_size is None else group_size
    ng = -(-n // gs)
    codes = rng.integers(0, 16, size=(n, n_out))
    for s in range(0, n, gs):  # both ends of the range in every group
        codes[s], codes[s + 1] = 0, 15
    zero = rng.integers(0, 16, size=(ng, n_out)).astype(np.float32)
    if pow2:
        step = (2.0 ** rng.integers(-8, -2, size=(ng, n_out))).astype(np.float32)
    else:
        step = rng.uniform(0.01, 0.2, size=(ng, n_out)).astype(np.float32)
    rows = np.repeat(np.arange(ng), gs)[:n]
    w = jnp.asarray(step[rows] * (codes - zero[rows]), jnp.float32)
    x = jnp.asarray(rng.normal(size=(50, n)), jnp.float32)
    spec = gq.QuantSpec(bits=4, grid="asym", group_size=group_size)
    r = gq.quantize_layer(w, x, spec=spec, method="rtn")
    np.testing.assert_array_equal(np.asarray(r.codes), codes)
    np.testing.assert_array_equal(np.asarray(r.zero_point).reshape(ng, n_out), zero)
    if pow2:
        np.testing.assert_array_equal(np.asarray(r.step).reshape(ng, n_out), step)
        np.testing.assert_array_equal(np.asarray(r.q), np.asarray(w))
    else:
        np.testing.assert_allclose(np.asarray(r.step).reshape(ng, n_out), step, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(r.q), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_asym_per_layer_and_search(rng):
    w, x, xq = _problem(rng, 100, 16, 4, dtype=np.float32)
    r = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(bits=3, grid="asym", per_channel=False))
    assert r.step.shape == () and r.zero_point.shape == ()
    np.testing.assert_array_equal(
        np.asarray(r.q),
        np.asarray(gq.dequantize(r.codes, r.step, r.offset, zero_point=r.zero_point)),
    )
    s = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(bits=3, grid="asym", scale="search"))
    one = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(bits=3, grid="asym"))
    assert s.rel_error <= one.rel_error + 1e-7 and s.c.shape == (4,)
    # the zero point does not depend on the multiplier
    np.testing.assert_array_equal(np.asarray(s.zero_point), np.asarray(one.zero_point))


def test_group_search_per_layer_shares_one_multiplier(rng):
    w, x, xq = _problem(rng, 100, 16, 4, dtype=np.float32)
    spec = gq.QuantSpec(bits=3, group_size=6, per_channel=False, scale="search")
    r = gq.quantize_layer(w, x, xq, spec=spec)
    assert np.ndim(r.c) == 0 and r.step.shape == (3, 4)
    ch = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(bits=3, group_size=6, scale="search"))
    assert ch.c.shape == (4,) and ch.rel_error <= r.rel_error + 1e-7


@pytest.mark.parametrize("grid", ["int", "asym"])
def test_conv_kernel_groups_along_flattened_rows(rng, grid):
    """A conv kernel (kh, kw, cin, cout): groups run along the kh*kw*cin flattened rows."""
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    n = 36
    x = jnp.asarray(rng.normal(size=(200, n)), jnp.float32)
    stats = gq.stats_from_data(x, x, jnp.float32)
    spec = gq.QuantSpec(bits=4, grid=grid, group_size=16)
    r = gq.quantize_from_stats(kernel, stats, spec, "gpfq")
    assert r.codes.shape == kernel.shape and r.step.shape == (3, 5)
    assert r.weight_step.shape == kernel.shape
    dense = gq.quantize_from_stats(kernel.reshape(n, 5), stats, spec, "gpfq")
    np.testing.assert_array_equal(np.asarray(r.codes).reshape(n, 5), np.asarray(dense.codes))
    np.testing.assert_array_equal(np.asarray(r.step), np.asarray(dense.step))
    np.testing.assert_array_equal(np.asarray(r.q).reshape(n, 5), np.asarray(dense.q))


def test_conv_feature_groups_are_separate_problems(rng):
    """feature_group_count = 2: each conv group is its own (N, cout/2) problem with its own
    group-wise steps (N = kh*kw*cin/g rows, groups of 8 along them)."""
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 6)), jnp.float32)  # cin/g = 2, cout = 6
    n = 18
    rows = jnp.asarray(rng.normal(size=(150, 2, n)), jnp.float32)
    stats = accumulate(init_stats(n, 2, jnp.float32), rows, None)
    spec = gq.QuantSpec(bits=3, grid="asym", group_size=8)
    r = gq.quantize_from_stats(kernel, stats, spec, "gpfq")
    assert r.step.shape == (3, 6)
    mat = kernel.reshape(n, 6)
    for i in range(2):
        one = gq.stats_from_data(rows[:, i], rows[:, i], jnp.float32)
        d = gq.quantize_from_stats(mat[:, 3 * i : 3 * i + 3], one, spec, "gpfq")
        cols = slice(3 * i, 3 * i + 3)
        np.testing.assert_array_equal(np.asarray(r.codes).reshape(n, 6)[:, cols], d.codes)
        np.testing.assert_array_equal(np.asarray(r.zero_point)[:, cols], d.zero_point)
