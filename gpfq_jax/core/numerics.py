"""Numerical conventions shared by the core: matmul precision, finiteness checks, safe division."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Every product of statistics and weights runs at full float32 (or float64) precision: on
# accelerators the default precision rounds inputs to bfloat16, which changes codes.
HIGHEST = jax.lax.Precision.HIGHEST


def check_finite(name: str, a: Any) -> None:
    """Raise ValueError naming ``name`` if array ``a`` holds NaN or Inf."""
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(a)))):
        raise ValueError(f"{name} contains NaN or Inf")


def check_real(name: str, a: Any) -> None:
    """Inputs must be real numbers: complex (or other) dtypes would silently lose a part."""
    dtype = a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} has dtype {dtype}; layer inputs must be real (float or int)")


def check_fraction(name: str, value: Any) -> None:
    """``value`` must be a real number (not a bool) in (0, 1]: TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


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
    """The largest magnitude over the arrays (None entries skipped), as a Python float.

    Computed by XLA, and again on the host when XLA reports 0: XLA on CPU flushes subnormal
    inputs to zero, which would hide values below float32's normal range.
    """
    present = [a for a in arrays if a is not None and np.size(a)]
    m = max((float(jnp.max(jnp.abs(a))) for a in present), default=0.0)
    if m == 0.0:
        m = max((float(np.max(np.abs(np.asarray(a)))) for a in present), default=0.0)
    return m


def scaled(a: Any, scale: float) -> Any:
    """``a * scale`` for a power of two ``scale``, computed on the host so that subnormal
    values are scaled, not flushed to zero (exact either way); ``a`` itself when scale is 1."""
    if scale == 1.0:
        return a
    host = np.asarray(a)
    # In float64: the factor itself may exceed float32's range (e.g. 2^132 for subnormals).
    return jnp.asarray((host.astype(np.float64) * scale).astype(host.dtype))


def as_float32_safe(name: str, a: Any) -> jax.Array:
    """``jnp.asarray(a)``, refusing float64 values that float32 cannot hold when JAX runs in
    32 bits (they would silently become Inf or 0): ValueError naming ``name`` and the range."""
    if (
        not jax.config.jax_enable_x64
        and isinstance(a, np.ndarray | np.floating)
        and np.asarray(a).dtype == np.float64
        and np.size(a)
    ):
        finite = np.abs(np.asarray(a)[np.isfinite(a)])
        big = float(finite.max(initial=0.0))
        if big > float(np.finfo(np.float32).max):
            raise ValueError(
                f"{name} holds float64 values up to {big:.3g}, beyond the float32 range "
                "(3.4e38), and JAX runs in 32 bits: rescale them, or enable "
                "jax.config.update('jax_enable_x64', True)"
            )
        if 0.0 < big < float(np.finfo(np.float32).tiny):
            raise ValueError(
                f"{name} holds float64 values no larger than {big:.3g}, below the float32 "
                "range (they would underflow; smallest normal 1.2e-38), and JAX runs in 32 "
                "bits: rescale them, or enable "
                "jax.config.update('jax_enable_x64', True)"
            )
    return jnp.asarray(a)


__all__ = [
    "HIGHEST",
    "check_finite",
    "check_fraction",
    "check_real",
    "safe_ratio",
    "pow2_normalizer",
    "max_abs",
    "scaled",
    "as_float32_safe",
]
