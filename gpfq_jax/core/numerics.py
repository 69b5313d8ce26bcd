"""Numerical conventions shared by the core: matmul precision, finiteness checks, safe division."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# Every product of statistics and weights runs at full float32 (or float64) precision: on
# accelerators the default precision rounds inputs to bfloat16, which changes codes.
HIGHEST = jax.lax.Precision.HIGHEST


def check_finite(name: str, a: Any) -> None:
    """Raise ValueError naming ``name`` if array ``a`` holds NaN or Inf."""
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(a)))):
        raise ValueError(f"{name} contains NaN or Inf")


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den == 0`` (a zero input column)."""
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)


# Inputs and kernels whose largest magnitude lies in [2^-16, 2^16] are used as they are; outside,
# they are multiplied by a power of two that brings it into [1, 2). Products of such values,
# squared and summed over 2^35 terms, stay far inside float32's range (2^-126 .. 2^128).
_SAFE_EXPONENT = 16


def pow2_normalizer(max_abs: float) -> float:
    """The power of two that brings a largest magnitude ``max_abs`` into a float32-safe range.

    1.0 when ``max_abs`` is already in [2^-16, 2^16] (or is 0, NaN or Inf); otherwise
    ``2^-floor(log2 max_abs)``. Multiplying by a power of two is exact in floating point, so the
    statistics, codes and relative errors computed from scaled values are those of the
    unscaled ones, minus the overflow and underflow.
    """
    m = float(max_abs)
    if not math.isfinite(m) or m == 0.0:
        return 1.0
    exponent = math.floor(math.log2(m))
    if -_SAFE_EXPONENT <= exponent <= _SAFE_EXPONENT:
        return 1.0
    return 2.0 ** (-exponent)


def max_abs(*arrays: Any) -> float:
    """The largest magnitude over the arrays (None entries skipped), as a Python float."""
    return max((float(jnp.max(jnp.abs(a))) for a in arrays if a is not None and jnp.size(a)),
               default=0.0)  # fmt: skip


__all__ = ["HIGHEST", "check_finite", "safe_ratio", "pow2_normalizer", "max_abs"]
