"""Bad calibration sources: empty data, wrong types, and streaming callables that do not yield
the same batches on every pass (count, contents, order) raise naming the batch and the pass."""

from __future__ import annotations

import numpy as np
import pytest
from _faultkit import CALIB, check, error_cases, expect_error, fault, poke, qp, same_tree

B = [CALIB[:8], CALIB[8:16], CALIB[16:24]]


def passes(make):
    """A calib callable whose pass p (1-based) yields ``make(p)``."""
    calls = [0]

    def calib():
        calls[0] += 1
        return iter(make(calls[0]))

    return calib


def P(calib, **kw):
    return lambda: qp(calib=calib, **kw)


SAME = (r"calib\(\) yielded a different batch {} on pass 2 than on pass 1 \(its contents "
        r"changed\); it must yield the same batches in the same order")  # fmt: skip


def _one_iterator():
    """calib() returns the same iterator on every call (exhausted after pass 1)."""
    it = iter(B)
    return qp(calib=lambda: it)


CASES = error_cases(
    ("empty-list", P([]), ValueError, r"empty calibration data: got an empty list of batches$"),
    ("empty-tuple", P(()), ValueError, r"empty calibration data: got an empty list of batches$"),
    ("empty-array", P(CALIB[:0]), ValueError, r"empty calibration data: 0 samples$"),
    ("list-of-empty-batches", P([CALIB[:0], CALIB[:0]]), ValueError,
     r"empty calibration data: 0 samples$"),
    ("empty-later-batch", P([CALIB[:4], CALIB[:0]]), ValueError,
     r"empty calibration data: batch 1 has 0 samples$"),
    ("callable-yields-nothing", P(lambda: iter([])), ValueError,
     r"empty calibration data: calib\(\) yielded no batches$"),
    ("callable-returns-int", P(lambda: 5), TypeError,
     r"calib\(\) must return an iterable of batches \(arrays\); got int$"),
    ("callable-returns-None", P(lambda: None), TypeError,
     r"calib\(\) must return an iterable of batches \(arrays\); got NoneType$"),
    ("generator-object-not-callable", P(b for b in B), TypeError,
     r"calib must be an array \(n, \.\.\.\), a list of arrays \(batches\) or a zero-argument "
     r"callable returning an iterator of batches; got generator$"),
    ("str", P("calib.npy"), TypeError, r"calib must be an array .*; got str$"),
    ("dict", P({"x": CALIB}), TypeError, r"calib must be an array .*; got dict$"),
    ("int", P(7), TypeError, r"calib must be an array .*; got int$"),
    ("passes-fewer-batches", P(passes(lambda p: B if p == 1 else B[:2])), ValueError,
     r"calib\(\) yielded 16 samples in 2 batches on pass 2 but 24 in 3 on pass 1; it must "
     r"yield the same batches on every call$"),
    ("passes-fewer-samples", P(passes(lambda p: B if p == 1 else [*B[:2], B[2][:5]])),
     ValueError, SAME.format(2)),
    ("passes-more-batches", P(passes(lambda p: B if p == 1 else [*B, CALIB[24:]])), ValueError,
     SAME.format(3)),
    ("passes-same-iterator-exhausted", _one_iterator, ValueError,
     r"calib\(\) yielded 0 samples in 0 batches on pass 2 but 24 in 3 on pass 1"),
    ("passes-contents-differ", P(passes(lambda p: B if p == 1 else [B[0], B[1] * 1.01, B[2]])),
     ValueError, SAME.format(1)),
    ("passes-one-value-differs",
     P(passes(lambda p: B if p == 1 else [B[0], B[1], poke(B[2], (7, 5), 0.0)])), ValueError,
     SAME.format(2)),
    ("passes-fresh-random-data",
     P(passes(lambda p: [np.random.default_rng(p).normal(size=(8, 6)).astype(np.float32)])),
     ValueError, SAME.format(0)),
    ("passes-batches-reordered", P(passes(lambda p: B if p == 1 else [B[1], B[0], B[2]])),
     ValueError, SAME.format(0)),
    ("passes-samples-reordered", P(passes(lambda p: B if p == 1 else [B[0][::-1], B[1], B[2]])),
     ValueError, SAME.format(0)),
    ("passes-features-permuted",
     P(passes(lambda p: B if p == 1 else [B[0], B[1][:, ::-1], B[2]])), ValueError,
     SAME.format(1)),
    ("nan-in-later-streamed-batch",
     P(passes(lambda p: [B[0], B[1], poke(B[2], (3, 3), np.nan)])), ValueError,
     r"calibration data contains NaN or Inf: 1 sample\(s\) of batch 2 \(pass 1 of calib\(\)\), "
     r"first at sample 19$"),
    ("nan-only-on-pass-2",
     P(passes(lambda p: B if p == 1 else [B[0], poke(B[1], (0, 0), np.inf), B[2]])),
     ValueError,
     r"NaN or Inf: 1 sample\(s\) of batch 1 \(pass 2 of calib\(\)\), first at sample 8$"),
    ("shape-changes-on-pass-2",
     P(passes(lambda p: B if p == 1 else [B[0], B[1][:, :5], B[2]])), ValueError,
     r"calibration batch 1 \(pass 2 of calib\(\)\) has per-sample shape \(5,\), batch 0 "
     r"has \(6,\)"),
)  # fmt: skip


@fault("calibration")
@pytest.mark.parametrize("call, exc, pattern", CASES)
def test_bad_calibration_sources(call, exc, pattern):
    expect_error(call, exc, pattern)


@fault("calibration", "result")
@pytest.mark.parametrize(
    "calib",
    [
        pytest.param(lambda: B, id="list"),
        pytest.param(lambda: tuple(B), id="tuple"),
        pytest.param(lambda: lambda: iter(B), id="callable-iterator"),
        pytest.param(lambda: lambda: (b for b in B), id="callable-generator"),
        pytest.param(lambda: lambda: list(B), id="callable-list"),
        pytest.param(lambda: np.concatenate(B), id="array-batch_size-8"),
    ],
)
def test_equivalent_calibration_sources(calib):
    """A list, a tuple, a streaming callable and one array split into the same batches give
    bit-identical variables."""
    ref = qp(calib=B, batch_size=8)
    got = qp(calib=calib(), batch_size=8)
    check(same_tree(got.variables, ref.variables), "variables differ from the list's")
