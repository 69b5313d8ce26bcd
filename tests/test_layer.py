"""quantize_layer / quantize_from_stats: results, step search, and errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpfq_jax as gq
from gpfq_jax.core import init_stats


@pytest.fixture
def layer(rng):
    x = jnp.asarray(np.maximum(rng.normal(size=(300, 24)), 0), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, 10)) / 5, jnp.float32)
    return w, x


def test_result_fields(layer):
    w, x = layer
    r = gq.quantize_layer(w, x, spec=gq.QuantSpec(bits=4))
    assert r.q.shape == w.shape and r.codes.shape == w.shape and r.codes.dtype == jnp.int8
    assert r.scale.shape == (10,)
    np.testing.assert_allclose(r.q, r.codes * r.scale[None, :], rtol=1e-6)
    direct = jnp.linalg.norm(x @ w - x @ r.q) / jnp.linalg.norm(x @ w)
    assert r.rel_error == pytest.approx(float(direct), rel=1e-3)
    per_layer = gq.quantize_layer(w, x, spec=gq.QuantSpec(bits=4, per_channel=False))
    assert per_layer.scale.shape == ()
    zzs8 = gq.quantize_layer(w, x, spec=gq.QuantSpec(bits=8, grid="zzs"))
    assert zzs8.codes.dtype == jnp.int16  # codes -128..128


@pytest.mark.parametrize("method", ["gpfq", "rtn", "gptq", "qronos"])
def test_search_never_worse_than_default_step(layer, method):
    w, x = layer
    for per_channel in (True, False):
        base = gq.quantize_layer(
            w, x, spec=gq.QuantSpec(bits=3, per_channel=per_channel), method=method
        )
        spec = gq.QuantSpec(bits=3, scale="search", per_channel=per_channel)
        found = gq.quantize_layer(w, x, spec=spec, method=method)
        assert found.rel_error <= base.rel_error + 1e-6
        assert np.shape(found.c) == ((10,) if per_channel else ())


def test_stochastic_needs_key_and_is_seeded(layer):
    w, x = layer
    spec = gq.QuantSpec(bits=3, rounding="stochastic")
    with pytest.raises(ValueError, match="key"):
        gq.quantize_layer(w, x, spec=spec)
    a = gq.quantize_layer(w, x, spec=spec, key=jax.random.PRNGKey(0))
    b = gq.quantize_layer(w, x, spec=spec, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a.codes, b.codes)


def test_bad_input_errors(layer):
    w, x = layer
    with pytest.raises(ValueError, match=r"x must be \(m, 24\)"):
        gq.quantize_layer(w, x[:, :5])
    with pytest.raises(ValueError, match="x_quant shape"):
        gq.quantize_layer(w, x, x[:10])
    with pytest.raises(ValueError, match="w must be"):
        gq.quantize_layer(w[0], x)
    with pytest.raises(ValueError, match="x contains NaN"):
        gq.quantize_layer(w, x.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        gq.quantize_layer(w.at[0, 0].set(jnp.inf), x)
    with pytest.raises(ValueError, match="empty calibration"):
        gq.quantize_layer(w, x[:0])
    with pytest.raises(ValueError, match="unknown method"):
        gq.quantize_layer(w, x, method="awq")
    with pytest.raises(ValueError, match="empty statistics"):
        gq.quantize_from_stats(w, init_stats(24))
    with pytest.raises(ValueError, match="does not match statistics"):
        gq.quantize_from_stats(w[:20], gq.stats_from_data(x))


@pytest.mark.parametrize("method", ["gpfq", "gptq"])
def test_channelwise_search_equals_brute_force(layer, x64, method):
    """scale="search" per channel: each neuron gets the multiplier whose codes, computed by the
    plain per-step function and scored on the data, give it the smallest output error."""
    w, x = layer
    w, x = w.astype(jnp.float64), x.astype(jnp.float64)
    spec = gq.QuantSpec(bits=3, scale="search", search_grid=(0.5, 0.8, 1.0, 1.3, 2.0))
    found = gq.quantize_layer(w, x, spec=spec, method=method)
    h = x.T @ x
    best_err, best_q = None, None
    for mult in spec.search_grid:
        delta = gq.step_size(w, spec, spec.c * mult)
        if method == "gptq":
            codes = gq.gptq_codes(w, h, delta, spec.alphabet)
        else:
            codes = gq.gpfq_data_form(w, x, x, delta, spec.alphabet)
        q = gq.dequantize(codes, delta[None, :], spec.alphabet.offset)
        err = jnp.sum((x @ w - x @ q) ** 2, 0)
        if best_err is None:
            best_err, best_q = err, q
        else:
            better = err < best_err
            best_err, best_q = jnp.where(better, err, best_err), jnp.where(better, q, best_q)
    np.testing.assert_allclose(np.asarray(found.q), np.asarray(best_q), rtol=1e-9, atol=1e-12)
