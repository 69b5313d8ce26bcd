"""Group-wise steps, the asymmetric grid's range and zero points, and storage bits per weight.

A group is ``group_size`` consecutive input features (rows of the (N, N_out) kernel matrix;
for a conv kernel the flattened kh*kw*cin/g rows) of one output neuron; the last group is
shorter when ``group_size`` does not divide N. Per-group quantities are held compactly as
(ceil(N / group_size), N_out) and expanded to one row per feature (N, N_out) for the
recurrences (``expand_groups``).

The "asym" grid (codes 0..2^b - 1, value ``delta * (k - z)``): its base is the range
``max(w, 0) - min(w, 0)`` (the weights' range widened to contain 0, as in GPTQ's reference
code, so that every zero point is a valid code and 0 is exactly representable),
``delta = c * range / (2^b - 1)`` and ``z = clip(round(-min(w, 0) / (range / (2^b - 1))))``
computed at c = 1: ``c`` scales the range [min, max] about 0, so z does not depend on c and
the step search changes only the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # alphabets imports this module
    from gpfq_jax.core.alphabets import QuantSpec


def n_groups(n_features: int, group_size: int | None) -> int:
    """Number of feature groups: ceil(N / group_size) (1 without groups)."""
    return 1 if group_size is None else -(-int(n_features) // int(group_size))


def grouped_rows(w: jax.Array, group_size: int) -> jax.Array:
    """(N, N_out) -> (ceil(N/gs), gs, N_out), the short last group padded with NaN."""
    n = w.shape[0]
    ng = n_groups(n, group_size)
    pad = ng * group_size - n
    if pad:
        w = jnp.concatenate([w, jnp.full((pad, *w.shape[1:]), jnp.nan, w.dtype)], axis=0)
    return w.reshape(ng, group_size, *w.shape[1:])


def expand_groups(a: jax.Array | None, n_features: int, group_size: int | None) -> Any:
    """Compact per-group array (ceil(N/gs), N_out) -> per-feature-row (N, N_out).

    Row t takes its group's value (group ``t // group_size``). Without groups ``a`` ((N_out,)
    or ()) is returned as is: it already broadcasts against (N, N_out). None stays None.
    """
    if group_size is None or a is None:
        return a
    total = n_groups(n_features, group_size) * group_size
    return jnp.repeat(a, group_size, axis=0, total_repeat_length=total)[:n_features]


def group_base(w: jax.Array, rule: str, group_size: int) -> jax.Array:
    """A symmetric rule's base value per (group, neuron): compact (n_groups, N_out).

    "max" and "mean_max" (the mean over one neuron of its max is its max) give the group's
    max |w|, "median" its median |w|; an all-zero group gets 1.
    """
    a = grouped_rows(jnp.abs(w), group_size)
    if rule in ("max", "mean_max"):
        v = jnp.nanmax(a, axis=1)
    elif rule == "median":
        v = jnp.nanmedian(a, axis=1)
    else:
        raise ValueError(f"unknown step rule {rule!r}; expected max, mean_max or median")
    return jnp.where(v > 0, v, 1.0).astype(w.dtype)


def asym_range_and_zero(
    w: jax.Array, kmax: int, group_size: int | None, per_channel: bool
) -> tuple[jax.Array, jax.Array]:
    """The "asym" grid's base (range) and integer zero point (as floats) at c = 1.

    ``lo = min(w, 0)``, ``hi = max(w, 0)`` over each group (or channel, or the whole layer),
    ``range = hi - lo`` (1 when 0) and ``zero = clip(round(-lo / (range / kmax)), 0, kmax)``
    with codes 0..kmax. Shapes: (N_out,) without groups, (n_groups, N_out) with them.
    """
    if group_size is not None:
        g = grouped_rows(w, group_size)
        lo, hi = jnp.nanmin(g, axis=1), jnp.nanmax(g, axis=1)
    elif per_channel:
        lo, hi = w.min(axis=0), w.max(axis=0)
    else:
        lo, hi = jnp.full(w.shape[1:], w.min()), jnp.full(w.shape[1:], w.max())
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    rng = hi - lo
    rng = jnp.where(rng > 0, rng, 1.0).astype(w.dtype)
    zero = jnp.clip(jnp.round(-lo / (rng / kmax)), 0, kmax).astype(w.dtype)
    return rng, zero


def bits_per_weight(
    spec: QuantSpec, n_features: int, step_bits: int = 16, *, n_out: int | None = None
) -> float:
    """Storage bits per weight: code bits plus the step (and zero point) bits amortized.

    Per (group, neuron) one step of ``step_bits`` bits and, on the "asym" grid, one zero
    point of the alphabet's code bits (the convention of GPTQ/AWQ packing: zero points are
    stored in the codes' integer width). A neuron of ``n_features`` inputs has
    ceil(n_features / group_size) groups (the last one possibly shorter), so the overhead is
    ``groups * (step_bits + zero_bits) / n_features`` (4-bit "int", groups of 128 of 4096,
    16-bit steps: 4.125; "asym": 4.15625). Per channel: one group of ``n_features``. Per
    layer: one step for the whole kernel, amortized over ``n_features * n_out`` weights
    (counted as 0 when ``n_out`` is not given).
    """
    for name, v in (("n_features", n_features), ("step_bits", step_bits)):
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    a = spec.alphabet
    per_group = step_bits + (a.storage_bits if spec.grid == "asym" else 0)
    if spec.group_size is not None or spec.channelwise:
        return a.storage_bits + n_groups(n_features, spec.group_size) * per_group / n_features
    return a.storage_bits + (0.0 if n_out is None else per_group / (n_features * n_out))


__all__ = [
    "n_groups",
    "grouped_rows",
    "expand_groups",
    "group_base",
    "asym_range_and_zero",
    "bits_per_weight",
]
