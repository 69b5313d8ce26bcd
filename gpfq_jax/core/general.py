"""General kernel layers (DenseGeneral, Einsum): quantize through a ``MatrixView``.

The kernel is viewed as ``g`` problems (g, N, n) (``view_kernel``), laid out as the (N, g*n)
matrix whose column blocks are the groups (the layout ``quantize_from_stats`` uses for grouped
convolutions), quantized from the statistics of the view's rows, and the result is put back in
the kernel's own layout:

- ``q`` and ``codes`` have the kernel's shape;
- ``step`` / ``zero_point``: a scalar () per layer; per neuron, kernel-shaped with size 1 on
  the contracted axes (broadcastable against ``codes``); with ``spec.group_size`` (groups run
  along each problem's N rows) compact in the matrix layout, (ceil(N / group_size), g * n),
  and the result carries the ``view`` to expand them (``weight_step``, ``values``). In every
  case ``q == dequantize(codes, r.weight_step, offset, zero_point=r.weight_zero_point)``,
  which is what ``kernel_values`` and the checkpoints compute;
- ``c`` stays per neuron in (g, n) order, flattened.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gpfq_jax.core.layer import quantize_from_stats
from gpfq_jax.core.patches import (
    MatrixView,
    grouped_kernel,
    ungrouped_kernel,
    unview_kernel,
    view_kernel,
)
from gpfq_jax.core.result import LayerResult
from gpfq_jax.core.stats import LayerStats


def matrix_layout(kernel: jax.Array, view: MatrixView) -> jax.Array:
    """The kernel as the (N, g*n) matrix of its ``g`` problems (column block i: group i)."""
    return ungrouped_kernel(view_kernel(kernel, view), (view.features, -1))


def kernel_layout(a: jax.Array | None, view: MatrixView) -> Any:
    """A matrix-layout array back in the kernel's layout: (N, g*n) -> kernel shape; per neuron
    (g*n,) -> size 1 on the contracted axes; () and None as they are."""
    if a is None or a.ndim == 0:
        return a
    g, n = view.groups, view.neurons
    if a.ndim == 1:
        return unview_kernel(a.reshape(g, 1, n), view)
    return unview_kernel(grouped_kernel(a, g), view)


def quantize_view(
    kernel: jax.Array, view: MatrixView, stats: LayerStats, spec=None, method: str = "gpfq",
    **kwargs,
) -> LayerResult:  # fmt: skip
    """Quantize a general layer's ``kernel`` (its own layout) from the statistics of its view's
    rows (``StatsAccumulator(view=view)``); ``spec``, ``method``, ``kwargs`` as
    ``quantize_from_stats``. The result is in the kernel's layout (module docstring)."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != len(view.kernel_perm):
        raise ValueError(f"kernel shape {kernel.shape} does not fit the view {view}")
    r = quantize_from_stats(matrix_layout(kernel, view), stats, spec, method, **kwargs)
    q, codes = kernel_layout(r.q, view), kernel_layout(r.codes, view)
    if r.group_size is not None:  # compact steps stay in the matrix layout, with the view
        return dataclasses.replace(r, q=q, codes=codes, view=view)
    step, zero_point = kernel_layout(r.step, view), kernel_layout(r.zero_point, view)
    return dataclasses.replace(r, q=q, codes=codes, step=step, zero_point=zero_point)


__all__ = ["matrix_layout", "kernel_layout", "quantize_view"]
