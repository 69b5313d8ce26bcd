"""The empirical diagonal Fisher of a loss: how much each weight's error costs downstream.

A layer's output error (``rel_error``) says how far the layer's own output moves; it does not
say how much that move changes the model's loss, which depends on every layer after it. The
second-order Taylor expansion of the loss around the float weights W, with the Fisher in place
of the Hessian and only its diagonal kept (as in OBD, HAWQ and SqueezeLLM), estimates the loss
increase of a quantized kernel Q as

    delta_loss ~= 1/2 * sum_ij F_ij (Q_ij - W_ij) ** 2,   F = mean_b (d loss_b / d W) ** 2,

over calibration batches b. ``fisher_diagonal`` computes F for every parameter;
``fisher_error`` is the estimate for one kernel. The bit allocation
(``quantize_params(budget_fisher=)``) uses it in place of the layer's own output error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fisher_diagonal(
    loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any]
) -> Any:
    """The mean over ``batches`` of the squared gradient of ``loss_fn`` w.r.t. ``params``.

    Args:
      loss_fn: ``(params, batch) -> scalar`` loss of one batch (e.g. the mean next-token NLL
        of one sequence). Each batch gives one gradient, so a batch of one example gives the
        per-example empirical Fisher; larger batches average gradients before squaring.
      params: a pytree of float arrays (e.g. a Linen ``variables["params"]``).
      batches: an iterable of at least one batch, each ``loss_fn``'s second argument.
    Returns:
      A pytree shaped like ``params``: float32 arrays, F >= 0, each leaf's shape.
    Raises ValueError when ``batches`` is empty or a gradient is not finite (naming the leaf).
    """
    grad = jax.jit(jax.grad(loss_fn))
    total, count = None, 0
    for batch in batches:
        g = grad(params, batch)
        sq = jax.tree.map(lambda a: jnp.square(a.astype(jnp.float32)), g)
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        count += 1
    if count == 0:
        raise ValueError("fisher_diagonal needs at least one batch; got none")
    for path, leaf in jax.tree_util.tree_leaves_with_path(total):
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"the loss gradient is not finite at {jax.tree_util.keystr(path)}; "
                             "check the loss and the batches")  # fmt: skip
    return jax.tree.map(lambda a: a / count, total)


def fisher_error(fisher: jax.Array, kernel: jax.Array, quantized: jax.Array) -> float:
    """``1/2 * sum(F * (Q - W) ** 2)``: the loss increase the diagonal Fisher predicts for
    replacing ``kernel`` W by ``quantized`` Q (all three the same shape), in float64."""
    f = np.asarray(fisher, np.float64)
    d = np.asarray(quantized, np.float64) - np.asarray(kernel, np.float64)
    if f.shape != d.shape:
        raise ValueError(f"the Fisher {f.shape} and the kernel {d.shape} differ in shape")
    return 0.5 * float(np.sum(f * d * d))


__all__ = ["fisher_diagonal", "fisher_error"]
