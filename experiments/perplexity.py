"""Perplexity of a causal language model on token windows.

Each window is scored on its own (no context carried over): position t predicts token t + 1,
so a window of length L gives L - 1 predicted tokens. Perplexity is
``exp(sum of next-token NLLs / number of predicted tokens)`` over all windows. The model
runs jitted in batches of ``batch_size`` windows (a short last batch is padded, so one shape
compiles once); each window's NLL sum comes back as float32 and is added up in float64 on
the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def nll_sums(model: Any, variables: Any, tokens: jax.Array) -> jax.Array:
    """Each window's summed next-token NLL, (b,) float32, for a Linen model mapping tokens
    (b, L) to logits (b, L, vocab); differentiable in ``variables``."""
    logits = model.apply(variables, tokens)[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)


def mean_nll(model: Any, variables: Any, tokens: jax.Array) -> jax.Array:
    """The mean next-token NLL over every predicted position of ``tokens`` (b, L): a
    scalar loss (its exp is the perplexity)."""
    return jnp.sum(nll_sums(model, variables, tokens)) / (tokens.shape[0] * (tokens.shape[1] - 1))


def _nll_fn(model: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted ``(variables, tokens (b, L)) -> NLL sums (b,)`` (:func:`nll_sums`)."""
    return jax.jit(lambda variables, tokens: nll_sums(model, variables, tokens))


def window_nll(model: Any, variables: Any, windows: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Summed next-token NLL (nats) of each window.

    Args:
      model: a Linen module, ``model.apply(variables, tokens (b, L))`` -> logits (b, L, vocab).
      variables: its variables.
      windows: (n, L) int token ids, L >= 2.
      batch_size: windows per forward pass.
    Returns:
      (n,) float64, each the sum over the window's L - 1 predicted tokens.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2 or len(windows) == 0:
        raise ValueError(f"windows must be (n >= 1, L >= 2), got {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nll, sums = _nll_fn(model), []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        real = len(batch)
        if real < batch_size:  # pad with copies of the first row; their sums are dropped
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        out = np.asarray(nll(variables, jnp.asarray(batch)), np.float64)
        sums.append(out[:real])
    return np.concatenate(sums)


def perplexity(model: Any, variables: Any, windows: np.ndarray, batch_size: int = 4) -> float:
    """``exp(mean next-token NLL)`` over all predicted positions of all ``windows`` (n, L)."""
    sums = window_nll(model, variables, windows, batch_size)
    count = len(sums) * (np.shape(windows)[1] - 1)
    return math.exp(float(np.sum(sums, dtype=np.float64)) / count)


__all__ = ["mean_nll", "nll_sums", "perplexity", "window_nll"]
