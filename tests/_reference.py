"""Slow, obviously right references the fast paths are compared with (numpy, float64)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.gpfq import threshold


def numpy_gpfq(w, x, xq, delta, alphabet, *, zero=None, sparsity=None, lam=0.0, uniform=None):
    """The GPFQ recurrence in plain numpy loops, the literal reading of docs/ALGORITHM.md sec. 2.

    ``delta`` (and the "asym" grid's ``zero``) broadcast to one value per (row, neuron):
    (N_out,) per channel, or (N, N_out) with group-wise steps. Returns the codes (N, N_out).
    """
    w, x, xq = (np.asarray(a, np.float64) for a in (w, x, xq))
    n, n_out = w.shape
    delta = np.broadcast_to(np.asarray(delta, np.float64), (n, n_out))
    zero = np.zeros((n, n_out)) if zero is None else np.broadcast_to(np.asarray(zero), (n, n_out))
    codes = np.zeros((n, n_out))
    for j in range(n_out):
        u = np.zeros(x.shape[0])
        for t in range(n):
            v = u + w[t, j] * x[:, t]
            nrm = xq[:, t] @ xq[:, t]
            num = float(threshold(jnp.asarray(xq[:, t] @ v), sparsity, lam))
            arg = num / nrm if nrm > 0 else 0.0
            s = arg / delta[t, j] - alphabet.offset + zero[t, j]
            if uniform is None:
                k = np.clip(np.round(s), alphabet.kmin, alphabet.kmax)
            else:
                s = np.clip(s, alphabet.kmin, alphabet.kmax)
                k = np.clip(np.floor(s) + (uniform[t, j] < s - np.floor(s)), alphabet.kmin,
                            alphabet.kmax)  # fmt: skip
            codes[t, j] = k
            u = v - delta[t, j] * (k - zero[t, j] + alphabet.offset) * xq[:, t]
    return codes
