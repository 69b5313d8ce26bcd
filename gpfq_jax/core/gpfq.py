"""The GPFQ recurrence: the data-form reference and the blocked Gram-form fast path.

Notation (docs/ALGORITHM.md): weights ``w`` (N, N_out) in Flax layout (column j = neuron j),
float-model inputs ``x`` (m, N), partially-quantized-model inputs ``x_quant`` (m, N).
For every neuron, for t = 1..N:

    q_t = Q_A( <X~_t, u_{t-1} + w_t X_t> / ||X~_t||^2 ),   u_t = u_{t-1} + w_t X_t - q_t X~_t

with argument 0 where ||X~_t|| = 0. Both forms return integer codes (as floats, shape of
``w``); values are ``delta * (codes + offset)`` (``delta * (codes - zero_point)`` on the
"asym" grid). ``delta`` is (N_out,) (one step per neuron), or (N, N_out) with one step per
feature row and neuron (group-wise steps, expanded with ``expand_groups``): the alphabet's
step changes as the walk crosses a group boundary. ``zero_point`` (None, or broadcastable
to (N, N_out)) holds the "asym" grid's integer zero points.

Variants: stochastic rounding (``uniform``, an (N, N_out) array of U[0,1) draws shared by
both forms so that they agree code for code) and L1 / L0 thresholding of the numerator
<X~_t, u_{t-1} + w_t X_t> by ``lam``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpfq_jax.core.alphabets import Alphabet, dequantize, round_to_codes
from gpfq_jax.core.numerics import HIGHEST, safe_ratio


def threshold(num: jax.Array, sparsity: str | None, lam: float | jax.Array) -> jax.Array:
    """L1 soft (``"l1"``) or L0 hard (``"l0"``) threshold of the numerator; identity if None."""
    if sparsity is None:
        return num
    if sparsity == "l1":
        return jnp.sign(num) * jnp.maximum(jnp.abs(num) - lam, 0.0)
    if sparsity == "l0":
        return jnp.where(jnp.abs(num) > lam, num, 0.0)
    raise ValueError(f"unknown sparsity {sparsity!r}; expected None, 'l1' or 'l0'")


@functools.partial(jax.jit, static_argnames=("alphabet", "sparsity"))
def gpfq_data_form(
    w: jax.Array,
    x: jax.Array,
    x_quant: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    *,
    sparsity: str | None = None,
    lam: float | jax.Array = 0.0,
    uniform: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """Reference GPFQ exactly as written: ``lax.scan`` over features, ``vmap`` over neurons.

    Args:
      w: (N, N_out) weights. x, x_quant: (m, N) inputs. delta: (N_out,) steps, or (N, N_out)
        per feature row (group-wise steps).
      uniform: optional (N, N_out) U[0,1) draws for stochastic rounding.
      zero_point: optional zero points ("asym" grid), broadcastable to (N, N_out).
    Returns: (N, N_out) integer codes (float dtype). Memory and time are O(m N N_out).
    """
    xt, xqt = x.T, x_quant.T
    norms = jnp.einsum("tm,tm->t", xqt, xqt, precision=HIGHEST)
    stochastic, asym = uniform is not None, zero_point is not None
    rand = uniform if stochastic else jnp.zeros_like(w)
    deltas = jnp.broadcast_to(delta, w.shape)
    zeros = jnp.broadcast_to(zero_point, w.shape) if asym else jnp.zeros_like(w)

    def neuron(w_col, d_col, r_col, z_col):
        def step(u, inp):
            w_t, x_t, xq_t, n_t, d, r_t, z_t = inp
            z = z_t if asym else None
            v = u + w_t * x_t
            num = threshold(jnp.dot(xq_t, v, precision=HIGHEST), sparsity, lam)
            k = round_to_codes(safe_ratio(num, n_t), d, alphabet, r_t if stochastic else None, z)
            return v - dequantize(k, d, alphabet.offset, zero_point=z) * xq_t, k

        _, codes = jax.lax.scan(
            step, jnp.zeros(x.shape[0], x.dtype), (w_col, xt, xqt, norms, d_col, r_col, z_col)
        )
        return codes

    return jax.vmap(neuron, in_axes=1, out_axes=1)(w, deltas, rand, zeros)


def default_block_size(n: int) -> int:
    """One block up to 512 features; above, about 16 blocks of a multiple of 64, at least 256.

    Each block is unrolled at trace time (compile time grows with their number) while the
    work inside a block is a memory-bound scan, so a few hundred columns per block balance
    the two (``benchmarks/layer_speed.py`` measures block sizes).
    """
    if n <= 512:
        return max(1, n)
    per_block = -(-n // 16)
    return min(n, max(256, -(-per_block // 64) * 64))


@functools.partial(jax.jit, static_argnames=("alphabet", "block_size", "sparsity"))
def gpfq_gram_form(
    w: jax.Array,
    hess: jax.Array,
    cross: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    *,
    block_size: int | None = None,
    sparsity: str | None = None,
    lam: float | jax.Array = 0.0,
    uniform: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """GPFQ from the statistics H = X~^T X~ (``hess``) and G = X~^T X (``cross``), both (N, N).

    q_t = Q_A((sum_{j<=t} G_tj w_j - sum_{j<t} H_tj q_j) / H_tt), evaluated in column blocks
    of ``block_size``: for block [s, e) the contribution of every earlier column is one
    product ``[G[s:e, :s], -H[s:e, :s]] @ [W[:s]; Q[:s]]`` (left-looking, so the total work is
    the lower triangle only, N^2 N_out multiply-adds); inside a block a ``lax.scan`` over its
    columns adds the within-block terms. Blocks are unrolled at trace time (at most about
    16 by default); there is no Python loop over features or neurons.

    Args as ``gpfq_data_form`` with ``hess``, ``cross`` in place of the data; ``delta`` (N_out,)
    or (N, N_out) (row t of Q uses row t of the steps), ``zero_point`` as there.
    Returns: (N, N_out) integer codes (float dtype).
    """
    n, n_out = w.shape
    bs = default_block_size(n) if block_size is None else max(1, min(int(block_size), n))
    diag = jnp.diagonal(hess)
    stochastic, asym = uniform is not None, zero_point is not None
    deltas = jnp.broadcast_to(delta, w.shape)
    zeros = jnp.broadcast_to(zero_point, w.shape) if asym else jnp.zeros_like(w)
    codes = jnp.zeros_like(w)
    values = jnp.zeros_like(w)
    for s in range(0, n, bs):
        e = min(s + bs, n)
        cross_bb, h_bb = cross[s:e, s:e], hess[s:e, s:e]
        w_blk = w[s:e]
        pre = jnp.dot(jnp.tril(cross_bb), w_blk, precision=HIGHEST)
        if s > 0:
            pre += jnp.dot(cross[s:e, :s], w[:s], precision=HIGHEST)
            pre -= jnp.dot(hess[s:e, :s], values[:s], precision=HIGHEST)
        rand = uniform[s:e] if stochastic else jnp.zeros_like(w_blk)

        def step(q_blk, inp, h_bb=h_bb):
            i, pre_i, h_row, d_i, r_i, delta_i, z_i = inp
            z = z_i if asym else None
            num = pre_i - jnp.dot(h_row, q_blk, precision=HIGHEST)  # q_blk rows >= i are 0
            num = threshold(num, sparsity, lam)
            r = r_i if stochastic else None
            k = round_to_codes(safe_ratio(num, d_i), delta_i, alphabet, r, z)
            return q_blk.at[i].set(dequantize(k, delta_i, alphabet.offset, zero_point=z)), k

        inputs = (jnp.arange(e - s), pre, h_bb, diag[s:e], rand, deltas[s:e], zeros[s:e])
        q_blk, k_blk = jax.lax.scan(step, jnp.zeros_like(w_blk), inputs)
        codes = codes.at[s:e].set(k_blk)
        values = values.at[s:e].set(q_blk)
    return codes


__all__ = ["gpfq_data_form", "gpfq_gram_form", "threshold", "default_block_size"]
