"""Bad shapes: every one raises ValueError (or TypeError) naming the argument and the shapes."""

from __future__ import annotations

import numpy as np
import pytest
from _faultkit import CALIB, MLP, error_cases, expect_error, fault, nnx_model, normal, qp

import gpfq_jax as gq
from gpfq_jax.core import ConvGeometry, StatsAccumulator

W = normal((6, 4), seed=2)
X = normal((20, 6), seed=3)
Q = gq.quantize_layer
KCONV = normal((3, 3, 2, 4), seed=4)  # a (kh, kw, cin, cout) conv kernel: 18 features
IMAGES = normal((2, 5, 5, 2), seed=5)


def _conv_stats(groups: int = 1):
    geom = ConvGeometry.create(
        (3, 3, 2, 4), 1, "SAME", feature_group_count=groups, input_shape=(2, 5, 5, 2 * groups)
    )  # fmt: skip
    return StatsAccumulator(18, geom).update(normal((2, 5, 5, 2 * groups), seed=6)).result()


def _conv_acc():
    return StatsAccumulator(
        18, ConvGeometry.create((3, 3, 2, 4), 1, "SAME", input_shape=IMAGES.shape)
    )


CORE = error_cases(
    ("w-1d", lambda: Q(W[:, 0], X), ValueError, r"w must be \(N_in, N_out\).*\(6,\)"),
    ("w-3d", lambda: Q(W[None], X), ValueError, r"w must be .*\(1, 6, 4\)"),
    ("w-scalar", lambda: Q(np.float32(1.0), X), ValueError, r"w must be .*shape \(\)"),
    ("x-width", lambda: Q(W, X[:, :5]), ValueError, r"x must be \(m, 6\).*\(20, 5\)"),
    ("x-1d", lambda: Q(W, X[0]), ValueError, r"x must be \(m, 6\).*\(6,\)"),
    ("x-3d", lambda: Q(W, X[None]), ValueError, r"x must be \(m, 6\).*\(1, 20, 6\)"),
    ("x_quant-rows", lambda: Q(W, X, X[:10]), ValueError, r"x_quant shape \(10, 6\) differs"),
    ("x_quant-width", lambda: Q(W, X, X[:, :5]), ValueError, r"x_quant shape \(20, 5\)"),
    ("x-0-rows", lambda: Q(W, X[:0]), ValueError, r"empty calibration data: x has 0 rows"),
    ("stats-conv-kernel-wrong-cin",
     lambda: gq.quantize_from_stats(normal((3, 3, 3, 4)), _conv_stats()), ValueError,
     r"kernel shape \(3, 3, 3, 4\) does not match statistics of 1 group\(s\) of 18 features"),
    ("stats-grouped-cout-odd",
     lambda: gq.quantize_from_stats(normal((3, 3, 2, 5)), _conv_stats(2)), ValueError,
     r"kernel shape \(3, 3, 2, 5\) does not match statistics of 2 group"),
    ("stats-dense-vs-conv-kernel",
     lambda: gq.quantize_from_stats(KCONV, gq.stats_from_data(X)), ValueError,
     r"kernel shape \(3, 3, 2, 4\) does not match statistics of 1 group\(s\) of 6 features"),
    ("stats-kernel-1d", lambda: gq.quantize_from_stats(W[:, 0], gq.stats_from_data(X)),
     ValueError, r"kernel must have at least 2 dims.*\(6,\)"),
    ("stats-empty", lambda: gq.quantize_from_stats(W, StatsAccumulator(6).result()), ValueError,
     r"empty statistics"),
    ("accumulator-kernel-mismatch", lambda: StatsAccumulator(6, kernel=KCONV), ValueError,
     r"kernel shape \(3, 3, 2, 4\) does not match 1 group\(s\) of 6 input features"),
    ("accumulator-dense-width", lambda: StatsAccumulator(6).update(X[:, :5]), ValueError,
     r"Dense input has 5 features, layer expects 6"),
    ("accumulator-x_quant-shape", lambda: StatsAccumulator(6).update(X, X[:3]), ValueError,
     r"x \(20, 6\) and x_quant \(3, 6\) differ in shape"),
    ("accumulator-conv-channels", lambda: _conv_acc().update(normal((2, 5, 5, 3))), ValueError,
     r"conv input must be \(batch, \*spatial\[2\], 2\); got shape \(2, 5, 5, 3\)"),
    ("accumulator-conv-rank", lambda: _conv_acc().update(normal((5, 5, 2))), ValueError,
     r"conv input must be .*got shape \(5, 5, 2\)"),
    ("accumulator-stats-without-F-other-kernel",
     lambda: gq.quantize_from_stats(
         W, StatsAccumulator(6, kernel=np.ones((6, 2), np.float32)).update(X).result()),
     ValueError, r"output norms of this kernel \(\(g, n\) = \(1, 4\)\); got \(1, 2\)"),
    ("stats_from_data-x_quant-width", lambda: gq.stats_from_data(X, X[:, :5]), ValueError,
     r"^x_quant shape \(20, 5\) differs from x shape \(20, 6\)$"),
)  # fmt: skip


@fault("shapes")
@pytest.mark.parametrize("call, exc, pattern", CORE)
def test_core_shapes(call, exc, pattern):
    expect_error(call, exc, pattern)


MODEL = error_cases(
    ("calib-batches-differ-width", lambda: qp(calib=[CALIB[:8], CALIB[:8, :5]]), ValueError,
     r"calibration batch 1 has per-sample shape \(5,\), batch 0 has \(6,\)"),
    ("calib-batches-differ-rank", lambda: qp(calib=[CALIB[:8], CALIB[:8].reshape(8, 2, 3)]),
     ValueError, r"calibration batch 1 has per-sample shape \(2, 3\), batch 0 has \(6,\)"),
    ("calib-streamed-batches-differ",
     lambda: qp(calib=lambda: iter([CALIB[:8], CALIB[:8, :4]])), ValueError,
     r"calibration batch 1 \(pass 1 of calib\(\)\) has per-sample shape \(4,\)"),
    ("calib-scalar", lambda: qp(calib=np.float32(1.0)), ValueError,
     r"calibration data must have a leading batch axis, got a scalar"),
    ("calib-0d-batch-in-list", lambda: qp(calib=[np.float32(1.0)]), TypeError,
     r"calibration batch 0 must be an array with a batch axis"),
    ("calib-wrong-width", lambda: qp(calib=CALIB[:, :5]), ValueError,
     r"calibration inputs of shape \(32, 5\) do not fit the model: layer 'Dense_0' expects "
     r"inputs of shape \(\.\.\., 6\), got \(32, 5\)"),
    ("calib-missing-batch-axis", lambda: qp(calib=CALIB[0]), ValueError,
     r"calibration inputs of shape \(6,\) do not fit the model: layer 'Dense_0'"),
    ("nnx-calib-wrong-width", lambda: qp(nnx_model(), None, CALIB[:, :4]), ValueError,
     r"calibration inputs of shape \(32, 4\) do not fit the model: layer 'l1' expects"),
    ("linen-calib-images-for-mlp", lambda: qp(MLP(), calib=normal((4, 5, 5, 2))), ValueError,
     r"do not fit the model: layer 'Dense_0' expects inputs of shape \(\.\.\., 6\), got \(4, 50\)"),
)  # fmt: skip


@fault("shapes")
@pytest.mark.parametrize("call, exc, pattern", MODEL)
def test_model_input_shapes(call, exc, pattern):
    expect_error(call, exc, pattern)
