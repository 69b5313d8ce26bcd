"""The GPFQ recurrence: data form == Gram form == blocked Gram form, code for code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import numpy_gpfq
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
from gpfq_jax.core.alphabets import make_alphabet, round_to_codes


def _problem(rng, m, n, n_out, noise=0.1, dtype=np.float64):
    x = np.maximum(rng.normal(size=(m, n)), 0) + 0.1 * rng.normal(size=(m, n))
    xq = x + noise * rng.normal(size=(m, n))
    w = rng.normal(size=(n, n_out)) / np.sqrt(n)
    return (jnp.asarray(w, dtype), jnp.asarray(x, dtype), jnp.asarray(xq, dtype))


def _all_forms(w, x, xq, delta, alphabet, block_size, **kw):
    stats = gq.stats_from_data(x, xq, x.dtype)
    data = gq.gpfq_data_form(w, x, xq, delta, alphabet, **kw)
    gram = gq.gpfq_gram_form(
        w, stats.hess[0], stats.cross[0], delta, alphabet, block_size=w.shape[0], **kw
    )
    blocked = gq.gpfq_gram_form(
        w, stats.hess[0], stats.cross[0], delta, alphabet, block_size=block_size, **kw
    )
    return np.asarray(data), np.asarray(gram), np.asarray(blocked)


@pytest.mark.parametrize("grid", ["int", "int_full", "zzs", "ls"])
@pytest.mark.parametrize("bits", ["ternary", 2, 4])
def test_data_gram_blocked_agree(x64, rng, grid, bits):
    w, x, xq = _problem(rng, 60, 37, 9)
    alphabet = make_alphabet(bits, grid)
    delta = gq.step_size(w, gq.QuantSpec(bits=bits, grid=grid, per_channel=True))
    data, gram, blocked = _all_forms(w, x, xq, delta, alphabet, block_size=8)
    np.testing.assert_array_equal(data, gram)
    np.testing.assert_array_equal(data, blocked)
    np.testing.assert_array_equal(data, numpy_gpfq(w, x, xq, np.asarray(delta), alphabet))


@pytest.mark.slow  # > 10 s on 2 CPU cores
@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 30),
    n_out=st.integers(1, 6),
    block=st.integers(1, 33),
    seed=st.integers(0, 2**31 - 1),
)
def test_forms_agree_any_shape(m, n, n_out, block, seed):
    with jax.enable_x64(True):
        w, x, xq = _problem(np.random.default_rng(seed), m, n, n_out)
        alphabet = make_alphabet(3, "int")
        delta = gq.step_size(w, gq.QuantSpec(bits=3))
        data, gram, blocked = _all_forms(w, x, xq, delta, alphabet, block_size=block)
        np.testing.assert_array_equal(data, gram)
        np.testing.assert_array_equal(data, blocked)
        assert np.all((data >= alphabet.kmin) & (data <= alphabet.kmax))
        assert np.all(data == np.round(data))


@pytest.mark.parametrize("sparsity", ["l1", "l0"])
def test_sparsity_variants_agree(x64, rng, sparsity):
    w, x, xq = _problem(rng, 50, 24, 5)
    alphabet = make_alphabet(4, "int")
    delta = gq.step_size(w, gq.QuantSpec(bits=4))
    lam = 0.5 * float(jnp.median(jnp.abs(x.T @ x)))
    data, gram, blocked = _all_forms(
        w, x, xq, delta, alphabet, block_size=5, sparsity=sparsity, lam=lam
    )
    np.testing.assert_array_equal(data, gram)
    np.testing.assert_array_equal(data, blocked)
    np.testing.assert_array_equal(
        data, numpy_gpfq(w, x, xq, np.asarray(delta), alphabet, sparsity=sparsity, lam=lam)
    )
    dense = np.asarray(gq.gpfq_data_form(w, x, xq, delta, alphabet))
    assert (data == 0).sum() > (dense == 0).sum()  # thresholding makes codes sparser


def test_stochastic_rounding_agrees_and_is_unbiased(x64, rng):
    w, x, xq = _problem(rng, 50, 20, 6)
    alphabet = make_alphabet(3, "int")
    delta = gq.step_size(w, gq.QuantSpec(bits=3))
    u = jax.random.uniform(jax.random.PRNGKey(int(rng.integers(1 << 30))), w.shape, w.dtype)
    data, gram, blocked = _all_forms(w, x, xq, delta, alphabet, block_size=7, uniform=u)
    np.testing.assert_array_equal(data, gram)
    np.testing.assert_array_equal(data, blocked)
    np.testing.assert_array_equal(
        data, numpy_gpfq(w, x, xq, np.asarray(delta), alphabet, uniform=np.asarray(u))
    )
    # Unbiased: averaging stochastic rounding of a fixed value over many draws recovers it.
    v = jnp.full((20000,), 0.3)
    draws = round_to_codes(v, 1.0, alphabet, jax.random.uniform(jax.random.PRNGKey(1), v.shape))
    assert abs(float(draws.mean()) - 0.3) < 0.02


def test_zero_input_column_gives_zero_argument(x64, rng):
    w, x, xq = _problem(rng, 30, 10, 4)
    x = x.at[:, 3].set(0.0)
    xq = xq.at[:, 3].set(0.0)
    alphabet = make_alphabet(4, "int")
    delta = gq.step_size(w, gq.QuantSpec(bits=4))
    data, gram, blocked = _all_forms(w, x, xq, delta, alphabet, block_size=4)
    np.testing.assert_array_equal(data, gram)
    np.testing.assert_array_equal(data, blocked)
    assert np.all(data[3] == 0)  # ||X~_t|| = 0 -> argument 0 -> the zero level
    assert np.all(np.isfinite(data))


def test_permuting_neurons_permutes_codes(rng):
    w, x, xq = _problem(rng, 80, 30, 12, dtype=np.float32)
    perm = rng.permutation(12)
    r = gq.quantize_layer(w, x, xq, spec=gq.QuantSpec(bits=3))
    rp = gq.quantize_layer(w[:, perm], x, xq, spec=gq.QuantSpec(bits=3))
    np.testing.assert_array_equal(np.asarray(r.codes)[:, perm], np.asarray(rp.codes))
    np.testing.assert_allclose(np.asarray(r.scale)[perm], np.asarray(rp.scale))


def test_fp32_forms_mostly_agree(rng):
    """In float32 the forms differ only by rounding near-ties (rare)."""
    w, x, xq = _problem(rng, 400, 64, 32, dtype=np.float32)
    alphabet = make_alphabet(4, "int")
    delta = gq.step_size(w, gq.QuantSpec(bits=4))
    data, gram, blocked = _all_forms(w, x, xq, delta, alphabet, block_size=16)
    assert (data == gram).mean() > 0.97
    assert (data == blocked).mean() > 0.97


@pytest.mark.parametrize("bits", ["ternary", 2, 3, 4])
@pytest.mark.parametrize("correlated", [False, True])
def test_gpfq_beats_rtn_on_gaussian_layer(rng, bits, correlated):
    """m >> N with Gaussian inputs: GPFQ's relative error is below round-to-nearest's.

    With i.i.d. columns (nearly orthogonal when m >> N) there is little to correct and the
    gain is small (about 1%); with correlated Gaussian features it is large (about 17%).
    """
    m, n, n_out = 2000, 128, 64
    x = rng.normal(size=(m, n))
    if correlated:
        x = x @ (rng.normal(size=(n, n)) / np.sqrt(n)) + 0.5 * rng.normal(size=(m, 1))
    x = jnp.asarray(x, jnp.float32)
    w = jnp.asarray(rng.normal(size=(n, n_out)) / np.sqrt(n), jnp.float32)
    spec = gq.QuantSpec(bits=bits, scale="search")  # each method at its best step
    g = gq.quantize_layer(w, x, spec=spec, method="gpfq")
    r = gq.quantize_layer(w, x, spec=spec, method="rtn")
    assert g.rel_error < (0.9 if correlated else 1.0) * r.rel_error, (g.rel_error, r.rel_error)
