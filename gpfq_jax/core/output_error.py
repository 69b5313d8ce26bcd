"""The layer's output error from its statistics, without the data.

With D = W - Q and the statistics H = X~^T X~, G = X~^T X, F = X^T X (per group), each
neuron's squared error is

    ||X w - X~ q||^2 = w^T (F - G - G^T + H) w + 2 d^T (G - H) w + d^T H d,

which keeps the dominant d^T H d term free of cancellation. The first two terms' Q-independent
parts are computed once per layer (``error_terms``); each candidate Q then costs one
N x N x n product (``error_given_terms``), which is what makes the step search cheap.
Statistics accumulated for one known kernel carry ||X w_j||^2 and ||(X - X~) w_j||^2 in place
of F (see ``gpfq_jax.core.stats``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpfq_jax.core.numerics import HIGHEST
from gpfq_jax.core.stats import LayerStats


def _colwise_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per column: sum_i a[g, i, n] * b[g, i, n] -> (g, n)."""
    return jnp.einsum("gin,gin->gn", a, b, precision=HIGHEST)


def _matmul(m: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("gij,gjn->gin", m, b, precision=HIGHEST)


class ErrorTerms(NamedTuple):
    """The parts of ||X W - X~ Q||^2 that do not depend on Q (see ``output_error_sq``).

    const: (g, n) W^T (F - G - G^T + H) W = ||(X - X~) w_j||^2.  cross_w: (g, N, n) (G - H) W.
    ref: (g, n) ||X w_j||^2 = W^T F W.
    """

    const: jax.Array
    cross_w: jax.Array
    ref: jax.Array


@jax.jit
def error_terms(stats: LayerStats, w: jax.Array) -> ErrorTerms:
    """Precompute the Q-independent error terms for grouped weights w (g, N, n).

    Statistics without F use their accumulated per-neuron norms, which belong to the kernel the
    accumulator was given: ``w`` must be that kernel.
    """
    h, cross, f = stats.hess, stats.cross, stats.xtx
    w = w.astype(h.dtype)
    gw, hw = _matmul(cross, w), _matmul(h, w)
    if f is None:
        if stats.out_ref.shape != w.shape[::2]:
            raise ValueError(
                f"statistics hold output norms of {stats.out_ref.shape} neurons "
                f"(groups, per group); the weights have {w.shape[::2]}"
            )
        return ErrorTerms(stats.out_drift, gw - hw, stats.out_ref)
    fw = _matmul(f, w)
    gtw = _matmul(jnp.swapaxes(cross, -1, -2), w)
    return ErrorTerms(_colwise_dot(w, fw - gw - gtw + hw), gw - hw, _colwise_dot(w, fw))


@jax.jit
def error_given_terms(
    stats: LayerStats, terms: ErrorTerms, w: jax.Array, q: jax.Array
) -> jax.Array:
    """Per-neuron ||X w_j - X~ q_j||^2 (g, n): one N x N x n product per call."""
    d = w.astype(stats.hess.dtype) - q.astype(stats.hess.dtype)
    err = terms.const + 2 * _colwise_dot(d, terms.cross_w) + _colwise_dot(d, _matmul(stats.hess, d))
    return jnp.maximum(err, 0.0)


def output_error_sq(stats: LayerStats, w: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-neuron ||X w_j - X~ q_j||^2 and ||X w_j||^2 from the statistics.

    w, q: (g, N, n) grouped weights and dequantized weights. Returns two (g, n) arrays.
    With D = W - Q: ||XW - X~Q||^2 = W^T(F - G - G^T + H)W + 2 D^T(G - H)W + D^T H D,
    which keeps the dominant D^T H D term free of cancellation.
    """
    terms = error_terms(stats, w)
    return error_given_terms(stats, terms, w, q), terms.ref


__all__ = ["ErrorTerms", "error_terms", "error_given_terms", "output_error_sq"]
