"""NaN / Inf anywhere raise ValueError naming where (argument, batch and sample, layer);
values far outside float32's range are either quantized exactly as the rescaled values or
rejected with a clear message, never turned silently into zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _faultkit import (
    CALIB,
    check,
    error_cases,
    expect_error,
    fault,
    linen_variables,
    normal,
    poke,
    qp,
)

import gpfq_jax as gq
from gpfq_jax.core import StatsAccumulator

W = normal((16, 8), seed=2)
X = normal((48, 16), seed=3)
Q = gq.quantize_layer
NAN, INF = float("nan"), float("inf")


def _nan_kernel_variables():
    v = linen_variables()
    kernel = poke(np.asarray(v["params"]["Dense_1"]["kernel"]), (2, 1), NAN)
    return {"params": {**v["params"], "Dense_1": {**v["params"]["Dense_1"], "kernel": kernel}}}


def _streamed(batches):
    return lambda: iter(batches)


NAN_INF = error_cases(
    ("w-nan", lambda: Q(poke(W, (3, 2), NAN), X), ValueError, r"^w contains NaN or Inf"),
    ("w-inf", lambda: Q(poke(W, (0, 0), INF), X), ValueError, r"^w contains NaN or Inf"),
    ("w-minus-inf", lambda: Q(poke(W, (5, 7), -INF), X), ValueError, r"^w contains NaN or Inf"),
    ("x-nan", lambda: Q(W, poke(X, (7, 1), NAN)), ValueError, r"^x contains NaN or Inf"),
    ("x-inf", lambda: Q(W, poke(X, (0, 15), INF)), ValueError, r"^x contains NaN or Inf"),
    ("x_quant-nan", lambda: Q(W, X, poke(X, (9, 9), NAN)), ValueError,
     r"^x_quant contains NaN or Inf"),
    ("x_quant-inf", lambda: Q(W, X, poke(X, (47, 0), -INF)), ValueError,
     r"^x_quant contains NaN or Inf"),
    ("w-overflows-float32", lambda: Q(W * np.float32(3e38), X), ValueError,
     r"^w contains NaN or Inf"),
    ("stats-nan", lambda: gq.quantize_from_stats(
        W, StatsAccumulator(16).update(poke(X, (3, 3), NAN)).result()), ValueError,
     r"statistics \(hess\) contains NaN or Inf"),
    ("stats-overflow-in-later-batch", lambda: gq.quantize_from_stats(
        W, StatsAccumulator(16).update(X).update(X * np.float32(1e30)).result()), ValueError,
     r"statistics \(hess\) contains NaN or Inf"),
    ("calib-nan", lambda: qp(calib=poke(CALIB, (13, 2), NAN), batch_size=8), ValueError,
     r"calibration data contains NaN or Inf: 1 sample\(s\) of batch 1, first at sample 13"),
    ("calib-inf", lambda: qp(calib=poke(CALIB, (30, 0), INF), batch_size=8), ValueError,
     r"NaN or Inf: 1 sample\(s\) of batch 3, first at sample 30"),
    ("calib-minus-inf-two-samples",
     lambda: qp(calib=poke(poke(CALIB, (2, 0), -INF), (5, 1), NAN)), ValueError,
     r"NaN or Inf: 2 sample\(s\) of batch 0, first at sample 2"),
    ("calib-nan-later-list-batch", lambda: qp(calib=[CALIB[:8], poke(CALIB[8:16], (5, 5), NAN)]),
     ValueError, r"NaN or Inf: 1 sample\(s\) of batch 1, first at sample 13"),
    ("calib-nan-streamed-batch",
     lambda: qp(calib=_streamed([CALIB[:8], CALIB[8:16], poke(CALIB[16:24], (0, 0), NAN)])),
     ValueError, r"NaN or Inf: 1 sample\(s\) of batch 2 \(pass 1 of calib\(\)\), first at "
     r"sample 16"),
    ("model-nan-kernel", lambda: qp(variables=_nan_kernel_variables()), ValueError,
     r"layer 'Dense_1': kernel contains NaN or Inf"),
    ("calib-float64-overflows-float32", lambda: qp(calib=CALIB.astype(np.float64) * 1e50),
     ValueError, r"calibration batch 0 holds values up to 2\.\d+e\+50, beyond float32's range"),
    ("model-nan-kernel-hint", lambda: qp(variables=_nan_kernel_variables()), ValueError,
     r"layer 'Dense_1': kernel contains NaN or Inf$"),
)  # fmt: skip


@fault("magnitudes")
@pytest.mark.parametrize("call, exc, pattern", NAN_INF)
def test_nan_inf(call, exc, pattern):
    expect_error(call, exc, pattern)


# ---------------------------------------------------------------- beyond float32's range
#
# The library promises that a kernel or inputs far outside float32's range are multiplied by
# one exact power of two (codes and relative errors unchanged). Values below float32's normal
# range (subnormal, or float64 values that underflow float32) must get the same treatment, or
# a clear error; they must never be flushed to zero silently (which gives rel_error 0.0).


def _same_as_rescaled(w: np.ndarray, x: np.ndarray, w_ref: np.ndarray, x_ref: np.ndarray):
    """quantize_layer(w, x) must equal quantize_layer(w_ref, x_ref) (w_ref, x_ref: the same
    values times exact powers of two), or raise a ValueError that says what is wrong."""
    ref = Q(w_ref, x_ref)
    try:
        got = Q(w, x)
    except ValueError as e:
        if any(k in str(e) for k in ("subnormal", "underflow", "too small", "float32 range")):
            return
        raise
    check(got.rel_error != 0.0, f"rel_error is exactly 0.0 (reference {ref.rel_error})")
    agree = float(np.mean(np.asarray(got.codes) == np.asarray(ref.codes)))
    check(agree == 1.0, f"only {agree:.1%} of the codes of the rescaled problem")
    check(np.isclose(got.rel_error, ref.rel_error, rtol=1e-5),
          f"rel_error {got.rel_error} vs {ref.rel_error}")  # fmt: skip


def _subnormal(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(a * 2^-k in float32, possibly subnormal; those exact values times 2^k, normal)."""
    small = (a.astype(np.float64) * 2.0**-k).astype(np.float32)
    return small, (small.astype(np.float64) * 2.0**k).astype(np.float32)


def _float64(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(a * 2^k in float64, beyond float32's range; a in float32)."""
    return a.astype(np.float64) * 2.0**k, a


@fault("magnitudes", "result")
@pytest.mark.parametrize(
    "which, k",
    [
        pytest.param("w", 133, id="w-subnormal-2^-133"),
        pytest.param("w", 140, id="w-subnormal-2^-140"),
        pytest.param("x", 135, id="x-subnormal-2^-135"),
        pytest.param("x", 144, id="x-subnormal-2^-144"),
    ],
)
def test_subnormal_values_not_flushed(which, k):
    if which == "w":
        w, w_ref = _subnormal(W, k)
        _same_as_rescaled(w, X, w_ref, X)
    else:
        x, x_ref = _subnormal(X, k)
        _same_as_rescaled(W, x, W, x_ref)


@fault("magnitudes", "result")
@pytest.mark.parametrize(
    "which, k",
    [
        pytest.param("w", 170, id="w-float64-2^170"),
        pytest.param("w", -170, id="w-float64-2^-170"),
        pytest.param("x", 170, id="x-float64-2^170"),
        pytest.param("x", -170, id="x-float64-2^-170"),
    ],
)
def test_float64_beyond_float32_range(which, k):
    if which == "w":
        w, w_ref = _float64(W, k)
        _same_as_rescaled(w, X, w_ref, X)
    else:
        x, x_ref = _float64(X, k)
        _same_as_rescaled(W, x, W, x_ref)


@fault("magnitudes", "result")
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _subnormal(CALIB, 140), id="calib-subnormal-float32"),
        pytest.param(lambda: _float64(CALIB, -170), id="calib-float64-2^-170"),
    ],
)
def test_tiny_calibration_data_not_flushed(make):
    calib, ref_calib = make()
    ref = qp(calib=ref_calib)
    try:
        got = qp(calib=calib)
    except ValueError as e:
        check("batch 0" in str(e), f"the error does not name the batch: {e}")
        return
    for a, b in zip(got.layers, ref.layers):
        check(a.rel_error != 0.0, f"{a.name}: rel_error exactly 0.0 (reference {b.rel_error})")
        check(np.array_equal(a.codes, b.codes), f"{a.name}: codes differ from the rescaled data's")


@fault("magnitudes", "result")
@pytest.mark.parametrize("scale", [1e30, 1e-30, 3e37, 1e-33])
def test_calibration_far_from_unit_scale(scale):
    """Calibration inputs scaled by a huge or tiny factor quantize every layer with the same
    codes (a ReLU MLP without biases is positively homogeneous). Every scaled input stays a
    normal float32 (|CALIB| >= 1e-3, so 1e-33 * |CALIB| > 2^-126)."""
    import flax.linen as nn

    class NoBias(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, use_bias=False)(nn.relu(nn.Dense(8, use_bias=False)(x)))

    model = NoBias()
    v = model.init(jax.random.PRNGKey(0), CALIB[:1])
    ref = qp(model, v, CALIB)
    got = qp(model, v, (CALIB * jnp.float32(scale)).astype(np.float32))
    for a, b in zip(got.layers, ref.layers):
        check(np.array_equal(a.codes, b.codes), f"{a.name}: codes differ at scale {scale}")
        check(np.isclose(a.rel_error, b.rel_error, rtol=1e-4),
              f"{a.name}: rel_error {a.rel_error} vs {b.rel_error}")  # fmt: skip
