"""Bad dtypes: non-float weights and complex data raise TypeError naming the dtype; integer
calibration inputs and half-precision weights are accepted and give the right answer."""

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
    qp,
    same_tree,
)

import gpfq_jax as gq
from gpfq_jax.core import StatsAccumulator

W = normal((6, 4), seed=2)
X = normal((20, 6), seed=3)
Q = gq.quantize_layer
C64 = np.complex64


def _int_params():
    return jax.tree.map(lambda a: jnp.round(a * 10).astype(jnp.int32), linen_variables())


def _complex_stats_result():
    """quantize_from_stats on statistics of complex inputs (x * (1 + 1j))."""
    acc = StatsAccumulator(6).update(jnp.asarray(X.astype(C64) * (1 + 1j)))
    return gq.quantize_from_stats(W, acc.result())


def _int_stats_dtype_result():
    """StatsAccumulator(dtype=int32): statistics truncated to integers."""
    return gq.quantize_from_stats(W, StatsAccumulator(6, dtype=jnp.int32).update(X).result())


CASES = error_cases(
    ("w-int32", lambda: Q(W.astype(np.int32), X), TypeError, r"w dtype int32 is not a floating"),
    ("w-int8", lambda: Q(W.astype(np.int8), X), TypeError, r"w dtype int8 is not a floating"),
    ("w-uint8", lambda: Q(W.astype(np.uint8), X), TypeError, r"w dtype uint8 is not a floating"),
    ("w-bool", lambda: Q(W > 0, X), TypeError, r"w dtype bool is not a floating"),
    ("w-complex64", lambda: Q(W.astype(C64), X), TypeError, r"w dtype complex64 is not a floating"),
    ("kernel-int-from-stats", lambda: gq.quantize_from_stats(W.astype(np.int16),
     gq.stats_from_data(X)), TypeError, r"kernel dtype int16 is not a floating type"),
    ("model-int-params", lambda: qp(variables=_int_params()), TypeError,
     r"layer 'Dense_0': kernel dtype int32 is not a floating type"),
    ("calib-complex-array", lambda: qp(calib=CALIB.astype(C64)), TypeError,
     r"calibration batch 0 has dtype complex64; expected real numbers"),
    ("calib-complex-later-batch", lambda: qp(calib=[CALIB[:8], CALIB[8:16].astype(C64)]),
     TypeError, r"calibration batch 1 has dtype complex64"),
    ("calib-complex-streamed",
     lambda: qp(calib=lambda: iter([CALIB[:8], CALIB[8:16].astype(C64)])), TypeError,
     r"calibration batch 1 \(pass 1 of calib\(\)\) has dtype complex64"),
    ("calib-bool", lambda: qp(calib=CALIB > 0), TypeError,
     r"calibration batch 0 has dtype bool; expected real numbers"),
    ("calib-object-array", lambda: qp(calib=np.array([[None] * 6] * 4)), TypeError,
     r"calibration batch 0 has dtype object"),
    ("calib-list-of-lists", lambda: qp(calib=[CALIB[:8].tolist()]), TypeError,
     r"calibration batch 0 must be an array with a batch axis, got list"),
    ("x-complex64", lambda: Q(W, X.astype(C64)), TypeError,
     r"^x has dtype complex64; layer inputs must be real"),
    ("accumulator-complex-update", _complex_stats_result, TypeError,
     r"^x has dtype complex64; layer inputs must be real"),
    ("stats_from_data-complex", lambda: gq.stats_from_data(X.astype(C64) * (1 + 1j)), TypeError,
     r"^x has dtype complex64; layer inputs must be real"),
    ("accumulator-int-dtype", _int_stats_dtype_result, ValueError,
     r"statistics dtype must be float32 or float64, got int32"),
)  # fmt: skip


@fault("dtypes")
@pytest.mark.parametrize("call, exc, pattern", CASES)
def test_bad_dtypes(call, exc, pattern):
    expect_error(call, exc, pattern)


@fault("dtypes", "result")
@pytest.mark.parametrize("int_dtype", [np.int32, np.int16, np.uint8])
def test_int_calibration_inputs_accepted(int_dtype):
    """Integer calibration inputs (e.g. raw pixels) give exactly the float inputs' result."""
    values = np.abs(np.round(CALIB * 20))
    got = qp(calib=values.astype(int_dtype))
    ref = qp(calib=values.astype(np.float32))
    check(same_tree(got.variables, ref.variables), f"{int_dtype.__name__} calibration differs")


@fault("dtypes", "result")
@pytest.mark.parametrize("int_dtype", [np.int32, np.uint8])
def test_int_layer_inputs_accepted(int_dtype):
    x = np.abs(np.round(X * 20))
    got, ref = Q(W, x.astype(int_dtype)), Q(W, x.astype(np.float32))
    check(np.array_equal(got.codes, ref.codes), "codes differ from the float inputs'")
    check(got.rel_error == ref.rel_error, f"rel_error {got.rel_error} != {ref.rel_error}")


@fault("dtypes", "result")
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_weights_keep_their_dtype(dtype):
    """Half-precision kernels are quantized (the same codes as the float32 copy of the same
    values) and the dequantized kernel keeps the kernel's dtype."""
    w = jnp.asarray(W, dtype)
    got, ref = Q(w, X), Q(np.asarray(w, np.float32), X)
    check(got.q.dtype == dtype, f"q dtype {got.q.dtype}, expected {dtype}")
    check(np.array_equal(got.codes, ref.codes), "codes differ from the float32 copy's")
    check(np.isfinite(got.rel_error) and got.rel_error > 0, f"rel_error {got.rel_error}")
