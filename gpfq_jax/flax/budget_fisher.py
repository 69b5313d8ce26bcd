"""The Fisher that weighs the bit allocation (``quantize_params(budget_fisher=)``), per layer.

``budget_fisher`` is a nested mapping shaped like the model's params (Linen:
``variables["params"]``; NNX: ``nnx.to_pure_dict(nnx.state(model))``), e.g. from
``gpfq_jax.core.fisher.fisher_diagonal``. :func:`layer_fisher` reads each quantized layer's
kernel entry from it and checks it; :func:`check_fisher` refuses the options it cannot serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpfq_jax.flax.paths import get_in
from gpfq_jax.flax.rules import LayerPlan
from gpfq_jax.flax.tracing import LayerInfo


def check_fisher(fisher: Any, fold_batchnorm: bool) -> None:
    """``budget_fisher`` is read per kernel as given: refuse it where the quantized kernels are
    not the model's own (BatchNorm folded into them changes their scale, and the Fisher of the
    unfolded kernels would weigh the folded ones wrongly)."""
    if fisher is not None and fold_batchnorm:
        raise ValueError(
            "budget_fisher holds the Fisher of the model's own kernels; with "
            "fold_batchnorm=True the quantized kernels are the folded ones, so the two "
            "cannot be combined (fold the model first, then take its Fisher)"
        )


def layer_fisher(
    fisher: Any, layers: list[LayerInfo], plans: list[LayerPlan]
) -> dict[int, np.ndarray]:
    """Quantized layer index -> its kernel's Fisher diagonal, read from ``fisher`` at the
    kernel's own place (Linen: shaped like ``variables["params"]``; NNX: like
    ``nnx.to_pure_dict(nnx.state(model))``). ValueError naming the layer when it is missing,
    of another shape, negative or not finite."""
    if not isinstance(fisher, Mapping):
        raise ValueError("budget_fisher must be a nested mapping shaped like the model's params "
                         f"(e.g. from fisher_diagonal), got {type(fisher).__name__}")  # fmt: skip
    out = {}
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if plan.skip:
            continue
        where = "/".join(str(k) for k in (*layer.path, layer.param))
        leaf = get_in(fisher, (*layer.path, layer.param))
        if leaf is None:
            raise ValueError(f"layer {layer.name!r}: budget_fisher has no entry at {where!r}")
        f = np.asarray(leaf)  # its own dtype: fisher_error works in float64 one layer at a time
        if f.shape != tuple(layer.kernel_shape):
            raise ValueError(f"layer {layer.name!r}: budget_fisher[{where!r}] has shape {f.shape}, "
                             f"the kernel {tuple(layer.kernel_shape)}")  # fmt: skip
        if not np.all(np.isfinite(f)) or (f < 0).any():
            raise ValueError(f"layer {layer.name!r}: budget_fisher[{where!r}] must be finite "
                             "and >= 0 (a mean of squared gradients)")  # fmt: skip
        out[i] = f
    return out


__all__ = ["check_fisher", "layer_fisher"]
