"""GPTQ, and Qronos as a GPTQ variant, on the same alphabets and statistics as GPFQ.

GPTQ follows Frantar et al. 2022 (and their reference code): H = X~^T X~ with dead inputs
(H_ii = 0) given H_ii = 1 and weight 0, damping ``damp * mean(diag H)``, optional act-order
(features in decreasing diag(H)), the upper Cholesky factor U of H^{-1}, and blocked lazy
updates: inside a block of columns rank-1 updates, across blocks one matrix product.
Weights are (N, N_out) in Flax layout, so GPTQ's "columns" are our rows (input features).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpfq_jax.core.alphabets import Alphabet, dequantize, round_to_codes
from gpfq_jax.core.numerics import HIGHEST


def _damped(hess: jax.Array, damp: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(damped H, the damping lambda, dead-input mask (N,)): dead inputs (H_ii = 0) get
    H_ii = 1, then lambda = ``damp * mean(diag H)`` is added to the diagonal."""
    dead = jnp.diagonal(hess) == 0
    h = hess + jnp.diag(dead.astype(hess.dtype))
    lam = damp * jnp.mean(jnp.diagonal(h))
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype), lam, dead


def _upper_inverse_factor(h: jax.Array) -> jax.Array:
    """The upper Cholesky factor U of H^{-1} (H^{-1} = U^T U) of a positive definite H."""
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    linv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    hinv = jnp.dot(linv.T, linv, precision=HIGHEST)  # H^{-1}
    return jnp.linalg.cholesky(hinv).T


def gptq_prepare(hess: jax.Array, w: jax.Array, damp: float = 0.01):
    """Damped H, weights with dead inputs zeroed, and the upper Cholesky factor of H^{-1}."""
    h, _, dead = _damped(hess, damp)
    return jnp.where(dead[:, None], 0.0, w), _upper_inverse_factor(h)


class GptqFactor(NamedTuple):
    """What GPTQ (or Qronos) needs that does not depend on the step: computed once per layer.

    w: (N, N_out) weights in GPTQ's feature order, dead inputs zeroed (Qronos: the
    least-squares weights, see ``qronos_factor``). upper: (N, N) upper Cholesky factor of the
    damped H^{-1} in that order. perm: (N,) the order (act-order or identity). first: None
    (GPTQ), or (N_out,) the value Qronos rounds for the first feature in that order in place
    of ``w[0]``.
    """

    w: jax.Array
    upper: jax.Array
    perm: jax.Array
    first: jax.Array | None = None


@functools.partial(jax.jit, static_argnames=("act_order",))
def gptq_factor(
    w: jax.Array, hess: jax.Array, *, damp: float = 0.01, act_order: bool = False
) -> GptqFactor:
    """Order the features, damp H (N, N) and factor its inverse for weights ``w`` (N, N_out)."""
    n = w.shape[0]
    perm = jnp.argsort(-jnp.diagonal(hess)) if act_order else jnp.arange(n)
    w, upper = gptq_prepare(hess[perm][:, perm], w[perm], damp)
    return GptqFactor(w, upper, perm)


@functools.partial(jax.jit, static_argnames=("act_order",))
def qronos_factor(
    w: jax.Array,
    hess: jax.Array,
    cross: jax.Array,
    *,
    damp: float = 0.01,
    act_order: bool = False,
) -> GptqFactor:
    """Qronos (Zhang, Colbert & Saab 2025) as a GPTQ factor, from H = X~^T X~ and G = X~^T X.

    Qronos quantizes the features in order t = 1..N of the objective
    ||X w - X~ v||^2 + lambda ||w - v||^2 (the float layer's output, from the quantized model's
    inputs; lambda = ``damp * mean(diag H)`` as GPTQ's, i.e. H + lambda I and G + lambda I):
    q_t rounds the v_t that best corrects the error of q_1..q_{t-1} with the later features at
    their current values ("correcting the past"), then the later features are set to the
    least-squares solution given q_1..q_t ("shaping the future"). After step 1 the later
    features are least-squares optimal, so the corrected value of feature t is just its
    current value and the update is GPTQ's with H: Qronos is GPTQ started from the
    least-squares weights v* = (H + lambda I)^{-1} (G + lambda I) w, except that feature 1
    rounds ((G + lambda I) w - H_{1,>1} w_{>1})_1 / (H + lambda I)_{11} (float weights w) in
    place of v*_1. Dead inputs (H_ii = 0) have v_i = 0. ``tests/test_qronos.py`` checks this
    against the iteration written out in data form.

    w: (N, N_out); hess, cross: (N, N). Returns the factor in act-order (descending diag(H))
    or kernel order, for ``gptq_codes_from_factor``.
    """
    n = w.shape[0]
    perm = jnp.argsort(-jnp.diagonal(hess)) if act_order else jnp.arange(n)
    h, lam, dead = _damped(hess[perm][:, perm], damp)
    w, g = w[perm], cross[perm][:, perm]
    target = jnp.dot(g, w, precision=HIGHEST) + lam * jnp.where(dead[:, None], 0.0, w)
    target = jnp.where(dead[:, None], 0.0, target)
    upper = _upper_inverse_factor(h)
    v = jnp.dot(upper.T, jnp.dot(upper, target, precision=HIGHEST), precision=HIGHEST)
    first = (target[0] - jnp.dot(h[0, 1:], w[1:], precision=HIGHEST)) / h[0, 0]
    return GptqFactor(v, upper, perm, first)


def default_gptq_block_size(n: int) -> int:
    """64 columns per block (all of them when n <= 64).

    Each column's update touches its whole block (block x N_out), so the scan's work grows
    with the block size, while every block is unrolled at trace time. Measured on 2 CPU cores
    for a (1536, 576) layer: 0.083 s per call at 256 columns, 0.033 s at 64, 0.021 s at 32,
    compiling in 1.1, 3.1 and 5.5 s; 64 balances the two for layers tried at several steps.
    """
    return max(1, min(n, 64))


@functools.partial(jax.jit, static_argnames=("alphabet", "block_size"))
def gptq_codes_from_factor(
    factor: GptqFactor,
    delta: jax.Array,
    alphabet: Alphabet,
    *,
    block_size: int | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """GPTQ codes (N, N_out) in the original feature order.

    ``delta``: steps (N_out,), or (N, N_out) per feature row in the ORIGINAL feature order
    (group-wise steps fixed from the float weights; with act-order they are permuted along
    with the features, so each weight keeps its own group's step). ``zero_point``: the "asym"
    grid's zero points, broadcastable to (N, N_out), original order.
    """
    w, upper, perm, first = factor
    n = w.shape[0]
    bs = default_gptq_block_size(n) if block_size is None else max(1, min(int(block_size), n))
    asym = zero_point is not None
    deltas = jnp.broadcast_to(delta, w.shape)[perm]
    zeros = jnp.broadcast_to(zero_point, w.shape)[perm] if asym else jnp.zeros_like(w)
    codes = []
    for s in range(0, n, bs):
        e = min(s + bs, n)
        u_bb = upper[s:e, s:e]

        def step(w_blk, inp, u_bb=u_bb, s=s):
            i, u_row, d, z_i = inp
            z = z_i if asym else None
            w_i = w_blk[i]
            # Qronos rounds its own value for the first feature; the error is still w_i - q_i.
            r_i = w_i if first is None or s > 0 else jnp.where(i == 0, first, w_i)
            k = round_to_codes(r_i, d, alphabet, None, z)
            err = (w_i - dequantize(k, d, alphabet.offset, zero_point=z)) / u_bb[i, i]
            # U is upper triangular: u_row[j] = 0 for j < i, so earlier rows stay as they were.
            return w_blk - u_row[:, None] * err[None, :], (k, err)

        inputs = (jnp.arange(e - s), u_bb, deltas[s:e], zeros[s:e])
        _, (k_blk, err_blk) = jax.lax.scan(step, w[s:e], inputs)
        codes.append(k_blk)
        if e < n:
            w = w.at[e:].add(-jnp.dot(upper[s:e, e:].T, err_blk, precision=HIGHEST))
    codes = jnp.concatenate(codes, axis=0)
    return codes[jnp.argsort(perm)]


def gptq_codes(
    w: jax.Array,
    hess: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    *,
    damp: float = 0.01,
    block_size: int | None = None,
    act_order: bool = False,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """GPTQ codes (N, N_out) for weights ``w`` (N, N_out), H = X~^T X~ (N, N), steps (N_out,)
    or (N, N_out) per feature row, optional "asym" zero points.

    ``gptq_factor`` then ``gptq_codes_from_factor``; to try several steps on one layer, factor
    once and call the latter per step.
    """
    factor = gptq_factor(w, hess, damp=damp, act_order=act_order)
    return gptq_codes_from_factor(
        factor, delta, alphabet, block_size=block_size, zero_point=zero_point
    )


__all__ = [
    "default_gptq_block_size",
    "gptq_codes",
    "gptq_factor",
    "gptq_codes_from_factor",
    "gptq_prepare",
    "GptqFactor",
    "qronos_factor",
]
