"""Qronos (Zhang, Colbert & Saab 2025) against its iteration written out in data form.

The reference is the paper's description taken literally, in numpy float64: at every feature
t, round the value that best corrects the error of the features already quantized with the
later features at their current values, then re-solve the later features by least squares.
The fast path (``gptq.qronos_factor``) is GPTQ started from the least-squares weights, in
Gram form; they must give the same codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpfq_jax as gq
from gpfq_jax.core import expand_groups, steps_and_zero_points
from gpfq_jax.core.alphabets import QuantSpec, make_alphabet
from gpfq_jax.core.gptq import gptq_codes_from_factor, qronos_factor


def numpy_qronos(w, x, xq, delta, alphabet, *, zero=None, damp=0.01, act_order=False, target=None):
    """Qronos feature by feature on the data (damping: rows sqrt(lambda) I under X and X~).

    ``delta`` and ``zero`` broadcast to (N, N_out) (per channel or per feature row, kernel
    order). ``target``: the float output to match (default X W). Returns the codes (N, N_out)
    in kernel order.
    """
    target = np.asarray(x, np.float64) @ np.asarray(w, np.float64) if target is None else target
    w, x, xq = (np.array(a, np.float64) for a in (w, x, xq))
    n, n_out = w.shape
    delta = np.broadcast_to(np.asarray(delta, np.float64), (n, n_out))
    zero = np.zeros((n, n_out)) if zero is None else np.broadcast_to(np.asarray(zero), (n, n_out))
    perm = np.argsort(-np.sum(xq * xq, axis=0), kind="stable") if act_order else np.arange(n)
    w, x, xq, delta, zero = w[perm], x[:, perm], xq[:, perm], delta[perm], zero[perm]
    lam = damp * np.mean(np.sum(xq * xq, axis=0))
    xqa = np.vstack([xq, np.sqrt(lam) * np.eye(n)])
    target = np.vstack([target, np.sqrt(lam) * w])  # the float output and the damping rows
    v, q, codes = w.copy(), np.zeros_like(w), np.zeros_like(w)
    for t in range(n):
        # correcting the past: the best value of feature t, later features as they are now
        resid = target - xqa[:, :t] @ q[:t] - xqa[:, t + 1 :] @ v[t + 1 :]
        alpha = xqa[:, t] @ resid / (xqa[:, t] @ xqa[:, t])
        s = alpha / delta[t] - alphabet.offset + zero[t]
        codes[t] = np.clip(np.round(s), alphabet.kmin, alphabet.kmax)
        q[t] = delta[t] * (codes[t] - zero[t] + alphabet.offset)
        # shaping the future: later features by least squares given q_1..q_t
        if t + 1 < n:
            v[t + 1 :] = np.linalg.lstsq(xqa[:, t + 1 :], target - xqa[:, : t + 1] @ q[: t + 1],
                                         rcond=None)[0]  # fmt: skip
    return codes[np.argsort(perm)]


def _problem(rng, n=14, m=60, out=5):
    """(W, X, X~) with correlated inputs, energies far from sorted, X~ drifted from X."""
    x = rng.normal(size=(m, n)) @ rng.normal(size=(n, n)) / np.sqrt(n)
    x = x * rng.permutation(np.linspace(0.3, 2.0, n))
    xq = x + 0.2 * rng.normal(size=(m, n))
    return rng.normal(size=(n, out)) / 3, x, xq


def _fast(w, x, xq, delta, alphabet, *, zero=None, damp=0.01, act_order=False, block=None):
    stats = gq.stats_from_data(jnp.asarray(x), jnp.asarray(xq), dtype=jnp.float64)
    factor = qronos_factor(jnp.asarray(w), stats.hess[0], stats.cross[0], damp=damp,
                           act_order=act_order)  # fmt: skip
    z = None if zero is None else jnp.asarray(zero)
    return np.asarray(gptq_codes_from_factor(factor, jnp.asarray(delta), alphabet,
                                             block_size=block, zero_point=z))  # fmt: skip


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid,bits", [("int", 3), ("int_full", 2), ("ls", 2), ("asym", 2)])
def test_qronos_equals_data_form_iteration(x64, rng, act_order, grid, bits):
    w, x, xq = _problem(rng)
    spec = QuantSpec(bits=bits, grid=grid)
    delta, zero = (None if a is None else np.asarray(a)
                   for a in steps_and_zero_points(jnp.asarray(w), spec, 1.0))  # fmt: skip
    ref = numpy_qronos(w, x, xq, delta, spec.alphabet, zero=zero, act_order=act_order)
    for block in (1, 4, 14):
        got = _fast(w, x, xq, delta, spec.alphabet, zero=zero, act_order=act_order, block=block)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("act_order", [False, True])
def test_qronos_group_steps_equal_data_form_iteration(x64, rng, act_order):
    """Group-wise steps and zero points (groups of 4 inputs), fixed from the float weights."""
    w, x, xq = _problem(rng, n=16)
    spec = QuantSpec(bits=3, grid="asym", group_size=4)
    delta, zero = steps_and_zero_points(jnp.asarray(w), spec, 1.0)
    delta, zero = (np.asarray(expand_groups(a, 16, 4)) for a in (delta, zero))
    ref = numpy_qronos(w, x, xq, delta, spec.alphabet, zero=zero, act_order=act_order)
    got = _fast(w, x, xq, delta, spec.alphabet, zero=zero, act_order=act_order, block=5)
    np.testing.assert_array_equal(got, ref)


def test_quantize_from_stats_runs_qronos(x64, rng):
    """The layer entry point: max steps give the reference's codes; the search keeps, per
    neuron, an error no larger than with the max steps."""
    w, x, xq = _problem(rng)
    stats = gq.stats_from_data(jnp.asarray(x), jnp.asarray(xq), dtype=jnp.float64)
    spec = QuantSpec(bits=3, grid="int", scale="max")
    res = gq.quantize_from_stats(jnp.asarray(w), stats, spec, "qronos")
    delta = np.asarray(steps_and_zero_points(jnp.asarray(w), spec, 1.0)[0])
    np.testing.assert_array_equal(np.asarray(res.codes),
                                  numpy_qronos(w, x, xq, delta, spec.alphabet))  # fmt: skip
    assert res.method == "qronos"
    searched = gq.quantize_from_stats(
        jnp.asarray(w), stats, QuantSpec(bits=3, grid="int", scale="search"), "qronos"
    )
    assert searched.rel_error <= res.rel_error + 1e-12


def test_dead_input_is_left_out(x64, rng):
    """An input that is zero in the quantized model: its weight becomes the level nearest 0 and
    the other codes are those of the problem without it (no damping, so lambda is the same)."""
    w, x, xq = _problem(rng, n=10)
    xq[:, 5] = 0.0
    spec = QuantSpec(bits=3, grid="int_full")
    delta = np.asarray(steps_and_zero_points(jnp.asarray(w), spec, 1.0)[0])
    got = _fast(w, x, xq, delta, spec.alphabet, damp=0.0)
    keep = np.arange(10) != 5
    ref = numpy_qronos(w[keep], x[:, keep], xq[:, keep], delta, spec.alphabet, damp=0.0,
                       target=x @ w)  # fmt: skip
    np.testing.assert_array_equal(got[keep], ref)
    np.testing.assert_array_equal(got[5], np.zeros(w.shape[1]))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    act_order=st.booleans(),
    bits=st.integers(2, 4),
    damp=st.sampled_from([0.0, 0.01, 0.1]),
)
def test_without_drift_qronos_is_gptq(seed, act_order, bits, damp):
    """With X~ = X the least-squares weights are W and feature 1's value is w_1: GPTQ's codes."""
    rng = np.random.default_rng(seed)
    w, x, _ = _problem(rng, n=9, m=30, out=3)
    alphabet = make_alphabet(bits, "int")
    with jax.enable_x64(True):
        delta = np.asarray(gq.step_size(jnp.asarray(w), QuantSpec(bits=bits, grid="int")))
        got = _fast(w, x, x, delta, alphabet, damp=damp, act_order=act_order)
        gptq = gq.gptq_codes(jnp.asarray(w), jnp.asarray(x.T @ x), jnp.asarray(delta), alphabet,
                             damp=damp, act_order=act_order)  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(gptq))


def test_qronos_corrects_input_drift_better_than_gptq(rng):
    """Inputs that drifted systematically (X~ = X (I + E), as earlier quantized layers do):
    Qronos targets the float output X W and GPTQ only X~ W, so Qronos's output error is
    lower (fixed seed; float32 as users run it)."""
    w, x, _ = _problem(rng, n=64, m=512, out=16)
    xq = x @ (np.eye(64) + 0.1 * rng.normal(size=(64, 64)))
    spec = QuantSpec(bits=3, grid="int")
    errs = {
        m: gq.quantize_layer(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                             jnp.asarray(xq, jnp.float32), spec=spec, method=m).rel_error
        for m in ("gptq", "qronos")
    }  # fmt: skip
    assert errs["qronos"] < 0.9 * errs["gptq"], errs
