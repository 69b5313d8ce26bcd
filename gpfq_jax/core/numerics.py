"""Numerical conventions shared by the core: matmul precision, finiteness checks, safe division."""

from __future__ import annotations

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


__all__ = ["HIGHEST", "check_finite", "safe_ratio"]
