"""The result of quantizing one layer: codes, steps (and zero points), the dequantized kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from gpfq_jax.core.alphabets import QuantSpec, dequantize, describe
from gpfq_jax.core.groups import expand_groups
from gpfq_jax.core.patches import MatrixView, grouped_kernel, unview_kernel


def per_weight(
    a: jax.Array | None, shape: tuple[int, ...], group_size: int | None,
    view: MatrixView | None = None,
) -> Any:  # fmt: skip
    """Compact group-wise steps or zero points as an array of the kernel's ``shape``: from
    (ceil(N / group_size), N_out) with N = prod(shape[:-1]), or, for a general layer's
    ``view``, from its matrix layout (ceil(N / group_size), g * n) (see ``MatrixView``).
    Without groups (or None) ``a`` as is."""
    if a is None or group_size is None:
        return a
    if view is not None:
        rows = expand_groups(a, view.features, group_size)  # (N, g*n)
        return unview_kernel(grouped_kernel(rows, view.groups), view)
    return expand_groups(a, math.prod(shape[:-1]), group_size).reshape(shape)


def kernel_values(
    codes: jax.Array,
    step: jax.Array,
    offset: float = 0.0,
    *,
    zero_point: jax.Array | None = None,
    group_size: int | None = None,
    dtype: Any = None,
    view: MatrixView | None = None,
) -> jax.Array:
    """A quantized kernel's values from its codes (kernel-shaped) and its compact steps and
    zero points ((N_out,), () or, with ``group_size``, (ceil(N / group_size), N_out), or a
    general layer's (ceil(N / group_size), g * n) with its ``view``): ``dequantize`` after
    expanding the groups to every weight."""
    step, zero_point = (per_weight(a, codes.shape, group_size, view) for a in (step, zero_point))
    return dequantize(codes, step, offset, dtype, zero_point=zero_point)


@dataclasses.dataclass
class LayerResult:
    """A quantized layer.

    q: dequantized kernel, shape and layout of the input kernel.
    codes: integer codes, same shape (int8, or int16 when the alphabet needs it).
    step: the step delta: (N_out,) per channel, a scalar () per layer, or compact
      (ceil(N / group_size), N_out) with group-wise steps (N = prod(kernel.shape[:-1])); ``scale``
      is the same array under its public name. Values are ``step * (codes + offset)``, or
      ``step * (codes - zero_point)`` on the "asym" grid; with groups use ``weight_step`` /
      ``weight_zero_point`` (broadcastable against ``codes``):
      ``q == dequantize(codes, r.weight_step, r.offset, zero_point=r.weight_zero_point)``.
    rel_error: ||X W - X~ Q||_F / ||X W||_F over the calibration data (from the statistics).
    c: the step multiplier used ((N_out,) when chosen per channel by ``scale="search"``).
    zero_point: the "asym" grid's integer zero points (float array, shape of ``step``); None on
      the symmetric grids.
    group_size: ``spec.group_size`` (None: no groups).
    view: for a general layer (DenseGeneral / Einsum) with groups, its ``MatrixView``: the
      compact steps and zero points are in the view's matrix layout (ceil(N / group_size),
      g * n); None otherwise.
    """

    q: jax.Array
    codes: jax.Array
    step: jax.Array
    rel_error: float
    spec: QuantSpec
    method: str
    c: Any
    offset: float
    seconds: float = 0.0
    zero_point: jax.Array | None = None
    group_size: int | None = None
    view: MatrixView | None = None

    @property
    def scale(self) -> jax.Array:
        """The step array (the public name the README and checkpoints use)."""
        return self.step

    @property
    def weight_step(self) -> jax.Array:
        """The step of every weight, broadcastable against ``codes`` (kernel-shaped with groups)."""
        return per_weight(self.step, self.codes.shape, self.group_size, self.view)

    @property
    def weight_zero_point(self) -> jax.Array | None:
        """The zero point of every weight (None on symmetric grids), like ``weight_step``."""
        return per_weight(self.zero_point, self.codes.shape, self.group_size, self.view)

    def values(self, dtype: Any = None) -> jax.Array:
        """``kernel_values`` of this result in ``dtype`` (default: the steps' dtype)."""
        return kernel_values(self.codes, self.step, self.offset, zero_point=self.zero_point,
                             group_size=self.group_size, dtype=dtype, view=self.view)  # fmt: skip

    @property
    def levels(self) -> int:
        return self.spec.alphabet.levels

    @property
    def storage_bits(self) -> int:
        return self.spec.alphabet.storage_bits

    def summary(self) -> dict:
        c = np.asarray(self.c)
        return {
            **describe(self.spec),
            "method": self.method,
            "rel_error": self.rel_error,
            "c": float(c) if c.ndim == 0 else [float(v) for v in c],
            "seconds": self.seconds,
        }


__all__ = ["LayerResult", "kernel_values"]
