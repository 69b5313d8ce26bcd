"""Alphabets (quantization grids), step sizes and rounding.

Every alphabet here is a uniform grid: the value of integer code ``k`` is
``delta * (k + offset)`` with ``k`` in ``[kmin, kmax]`` and ``offset`` in {0, 0.5}.

==========  ===========================================  =======  ==================
grid        codes (b bits)                               offset   default step rule
==========  ===========================================  =======  ==================
"int"       -(2^(b-1)-1) .. 2^(b-1)-1  (2^b - 1 levels)  0        "max"  per channel
"int_full"  -2^(b-1) .. 2^(b-1)-1      (2^b levels)      0        "max"  per channel
"zzs"       -2^(b-1) .. 2^(b-1)        (2^b + 1 levels)  0        "mean_max" per layer
"ls"        -2^(b-1) .. 2^(b-1)-1      (2^b levels)      0.5      "median" per layer
"asym"      0 .. 2^b - 1               (2^b levels)      0        "max" (range) per channel
==========  ===========================================  =======  ==================

``bits="ternary"`` (or ``log2(3)``) selects codes {-1, 0, 1} on every grid ({0, 1, 2} on
"asym").

The "asym" grid's value of code k is ``delta * (k - z)`` with an integer zero point z per
channel or group; its range rule and group-wise steps (``group_size``) are described in
``gpfq_jax.core.groups``.

The "ls" grid is the JMLR paper's ``linspace(-1, 1, 2^b) * alpha`` (no zero level): its step is
``2 alpha / (2^b - 1)`` and its levels are ``step * (k + 1/2)``. The "zzs" grid is the SIMODS
paper's {-K..K} * delta with K = 2^(b-1); it has 2^b + 1 levels and needs b + 1 bits to store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.groups import asym_range_and_zero, bits_per_weight, expand_groups, group_base
from gpfq_jax.core.groups import n_groups as n_groups

GRIDS = ("int", "int_full", "zzs", "ls", "asym")
SCALE_RULES = ("max", "mean_max", "median", "search")
ROUNDINGS = ("nearest", "stochastic")
SPARSITIES = (None, "l1", "l0")
_DEFAULT_RULE = {"int": "max", "int_full": "max", "zzs": "mean_max", "ls": "median", "asym": "max"}
_DEFAULT_PER_CHANNEL = {"int": True, "int_full": True, "zzs": False, "ls": False, "asym": True}
# Multipliers of ``c`` tried by ``scale="search"``: a geometric grid, ratio 2^(1/4) (steps of
# about 19%), from 1/4 to 4 times the rule's base step. GPFQ's best constant ranges from about
# 0.5x the absmax step (low bits, heavy-tailed weights) to 3x the median (ternary, JMLR paper),
# and the layer's output error changes little within 19% of its minimum.
DEFAULT_SEARCH_GRID = tuple(float(2.0 ** (e / 4)) for e in range(-8, 9))


def _checked_bits(bits: Any) -> int | str:
    """2..8 (an integral number, not a bool) or "ternary" (also ``log2(3)``)."""
    bad = ValueError(f"bits must be an integer in 2..8 or 'ternary', got {bits!r}")
    if isinstance(bits, str):
        if bits != "ternary":
            raise bad
        return bits
    if isinstance(bits, bool | np.bool_) or not isinstance(
        bits, int | float | np.integer | np.floating
    ):
        raise bad
    if math.isclose(float(bits), math.log2(3)):
        return "ternary"
    if not float(bits).is_integer() or not 2 <= int(bits) <= 8:
        raise bad
    return int(bits)


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    try:
        ok = value in allowed
    except TypeError:  # unhashable or uncomparable
        ok = False
    if not ok or isinstance(value, bool | np.bool_):
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


def _checked_real(name: str, value: Any, *, positive: bool) -> float:
    """A finite real number (not a bool); > 0 if ``positive``, else >= 0."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What to quantize to.

    Attributes:
      bits: 2..8, or "ternary" (equivalently ``math.log2(3)``) for {-1, 0, 1}.
      grid: "int" (default), "int_full", "zzs", "ls" or "asym" (2^b levels with an integer
        zero point per channel or group; see the module docstring).
      scale: step-size rule: "max" (absmax), "mean_max" (mean over neurons of each neuron's
        absmax), "median" (median |w|), or "search" (the grid's default rule, with ``c``
        chosen from ``search_grid * c`` to minimise the layer's output error). ``None`` means
        the grid's default rule. The "asym" grid takes "max" (its min/max range rule) or
        "search" only.
      c: multiplier of the rule's base step (the papers' constant).
      per_channel: one step per output channel (True) or per layer (False). ``None`` means the
        grid's default (True for int grids, False for the papers' grids).
      rounding: "nearest" or "stochastic" (SPFQ-style unbiased rounding; needs a PRNG key).
      sparsity: None, "l1" (soft threshold) or "l0" (hard threshold) of the GPFQ argument's
        numerator by ``lam`` (Zhang, Zhou & Saab 2023, sec. 5).
      lam: the sparsity threshold (>= 0), in units of the numerator <X~_t, u + w_t X_t>.
      search_grid: multipliers of ``c`` tried when ``scale="search"``.
      group_size: None (steps per channel or per layer, as ``per_channel`` says) or a positive
        int: one step (and zero point on "asym") per (group of ``group_size`` consecutive input
        features, output neuron), the rule applied to each group's weights ("mean_max" per
        group is "max"). The last group is shorter when it does not divide N; ``group_size >=
        N`` is one group (per channel). With groups, ``per_channel`` only says how
        ``scale="search"`` chooses ``c``: per neuron (True; all groups of a neuron share its
        multiplier, since the output error is per neuron) or per layer (False).
    """

    bits: int | float | str = 4
    grid: str = "int"
    scale: str | None = None
    c: float = 1.0
    per_channel: bool | None = None
    rounding: str = "nearest"
    sparsity: str | None = None
    lam: float = 0.0
    search_grid: tuple[float, ...] = DEFAULT_SEARCH_GRID
    group_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "bits", _checked_bits(self.bits))
        for name, allowed in (("grid", GRIDS), ("rounding", ROUNDINGS)):
            _check_choice(name, getattr(self, name), allowed)
        _check_choice("scale", self.scale, (None, *SCALE_RULES))
        _check_choice("sparsity", self.sparsity, SPARSITIES)
        object.__setattr__(self, "c", _checked_real("c", self.c, positive=True))
        object.__setattr__(self, "lam", _checked_real("lam", self.lam, positive=False))
        if self.per_channel is not None and not isinstance(self.per_channel, bool | np.bool_):
            raise TypeError(f"per_channel must be True, False or None, got {self.per_channel!r}")
        if isinstance(self.search_grid, str | bytes) or not hasattr(self.search_grid, "__iter__"):
            raise TypeError(f"search_grid must be a sequence of numbers, got {self.search_grid!r}")
        grid = tuple(_checked_real("search_grid entry", g, positive=True) for g in self.search_grid)
        if not grid:
            raise ValueError("search_grid must be a non-empty sequence of positive multipliers")
        object.__setattr__(self, "search_grid", grid)
        gs = self.group_size
        if gs is not None:
            if isinstance(gs, bool | np.bool_) or not isinstance(gs, int | np.integer):
                raise TypeError(f"group_size must be a positive int or None, got {gs!r}")
            if gs < 1:
                raise ValueError(f"group_size must be a positive int or None, got {gs!r}")
            object.__setattr__(self, "group_size", int(gs))
        if self.grid == "asym" and self.scale not in (None, "max", "search"):
            raise ValueError(
                f"grid 'asym' uses its min/max range rule: scale must be None, 'max' or "
                f"'search', got {self.scale!r}"
            )

    def to_dict(self) -> dict:
        """The fields as given (JSON-friendly); ``QuantSpec(**spec.to_dict()) == spec``."""
        out = dataclasses.asdict(self)
        out["search_grid"] = list(self.search_grid)
        return out

    @property
    def alphabet(self) -> Alphabet:
        return make_alphabet(self.bits, self.grid)

    @property
    def step_rule(self) -> str:
        """The base step rule ("search" searches around the grid's default rule)."""
        if self.scale in (None, "search"):
            return _DEFAULT_RULE[self.grid]
        return self.scale

    @property
    def channelwise(self) -> bool:
        return _DEFAULT_PER_CHANNEL[self.grid] if self.per_channel is None else self.per_channel


@dataclasses.dataclass(frozen=True)
class Alphabet:
    """A uniform grid ``delta * (k + offset)``, ``kmin <= k <= kmax``.

    ``denominator``: the rule's base value (e.g. absmax) divided by ``denominator`` gives the
    step, so that with c = 1 the grid's top level sits at (or, for "int_full", just above)
    the base value.
    """

    kmin: int
    kmax: int
    offset: float
    denominator: float

    @property
    def levels(self) -> int:
        return self.kmax - self.kmin + 1

    @property
    def storage_bits(self) -> int:
        """Bits needed to store one code (honest: 2^b + 1 levels need b + 1 bits)."""
        return max(1, math.ceil(math.log2(self.levels)))

    def values(self, delta: float = 1.0) -> np.ndarray:
        """All levels for step ``delta``, ascending."""
        return delta * (np.arange(self.kmin, self.kmax + 1) + self.offset)


def make_alphabet(bits: int | str, grid: str) -> Alphabet:
    """The integer code range and offset of ``grid`` at ``bits``."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if grid == "asym":
        levels = 3 if bits == "ternary" else 2 ** int(bits)
        return Alphabet(0, levels - 1, 0.0, float(levels - 1))
    if bits == "ternary":
        return Alphabet(-1, 1, 0.0, 1.0)
    half = 2 ** (int(bits) - 1)
    if grid == "int":
        return Alphabet(-(half - 1), half - 1, 0.0, float(half - 1))
    if grid == "int_full":
        return Alphabet(-half, half - 1, 0.0, half - 0.5)
    if grid == "zzs":
        return Alphabet(-half, half, 0.0, float(half))
    return Alphabet(-half, half - 1, 0.5, half - 0.5)  # "ls"


def base_scale(w: jax.Array, rule: str, per_channel: bool) -> jax.Array:
    """The rule's base value of a weight matrix ``w`` (N_in, N_out): shape (N_out,).

    A per-layer value is broadcast to every channel. "mean_max" per channel equals "max".
    """
    a = jnp.abs(w)
    if rule == "max":
        v = a.max(axis=0) if per_channel else jnp.full(w.shape[1:], a.max())
    elif rule == "mean_max":
        v = a.max(axis=0) if per_channel else jnp.full(w.shape[1:], a.max(axis=0).mean())
    elif rule == "median":
        v = jnp.median(a, axis=0) if per_channel else jnp.full(w.shape[1:], jnp.median(a))
    else:
        raise ValueError(f"unknown step rule {rule!r}; expected max, mean_max or median")
    # An all-zero channel gets step 1 so that codes stay finite (its codes are then 0, or the
    # smallest level of the "ls" grid, which has no zero).
    return jnp.where(v > 0, v, 1.0).astype(w.dtype)


def steps_and_zero_points(
    w: jax.Array, spec: QuantSpec, c: float | jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
    """The steps and zero points of ``spec`` for weights ``w`` (N_in, N_out).

    Returns ``(delta, zero_point)``: (N_out,) each without groups (a per-layer value broadcast
    to every channel), compact (ceil(N_in / group_size), N_out) with ``spec.group_size``;
    ``zero_point`` is None except on the "asym" grid (integers stored as floats, independent
    of ``c``). ``c`` (default ``spec.c``) is a scalar or (N_out,), one multiplier per neuron.
    """
    c = spec.c if c is None else c
    a = spec.alphabet
    if spec.grid == "asym":
        rng, zero = asym_range_and_zero(w, a.kmax, spec.group_size, spec.channelwise)
        return c * rng / a.denominator, zero
    if spec.group_size is None:
        return c * base_scale(w, spec.step_rule, spec.channelwise) / a.denominator, None
    return c * group_base(w, spec.step_rule, spec.group_size) / a.denominator, None


def step_size(w: jax.Array, spec: QuantSpec, c: float | jax.Array | None = None) -> jax.Array:
    """The steps ``delta`` of ``spec`` for ``w`` (N_in, N_out): ``steps_and_zero_points``'s."""
    return steps_and_zero_points(w, spec, c)[0]


def round_to_codes(
    x: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    uniform: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """Integer codes (as floats) of the levels nearest to ``x``.

    ``delta`` (and ``zero_point``, the "asym" grid's integer zero points, levels
    ``delta * (k - zero_point)``) broadcast against ``x``. With ``uniform`` (same shape as
    ``x``, in [0, 1)) the rounding is stochastic and unbiased inside the grid's range: ``x``
    between two levels goes up with probability equal to its fractional position.
    """
    t = x / delta - alphabet.offset
    if zero_point is not None:
        t = t + zero_point
    if uniform is None:
        k = jnp.round(t)
    else:
        t = jnp.clip(t, alphabet.kmin, alphabet.kmax)
        lo = jnp.floor(t)
        k = lo + (uniform < (t - lo)).astype(t.dtype)
    return jnp.clip(k, alphabet.kmin, alphabet.kmax)


def dequantize(
    codes: jax.Array,
    step: jax.Array,
    offset: float = 0.0,
    dtype: Any = None,
    *,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """The values of integer ``codes``: ``step * (codes + offset)``, or with the "asym"
    grid's ``zero_point``: ``step * ((codes - zero_point) + offset)`` (offset 0 there).

    The one dequantization formula of the package (the Gram form, GPTQ, the layer result,
    ``quantize_params``' variables and ``load_quantized`` all call it, so they agree bit for
    bit). ``step`` and ``zero_point`` broadcast against ``codes`` (per-channel steps on the
    last axis; group-wise ones expanded to rows with ``expand_groups``).
    ``dtype``: compute and return in this dtype (default: ``step``'s).
    """
    if dtype is None:
        if zero_point is not None:
            codes = codes - zero_point
        return step * (codes + offset)
    dtype = jnp.dtype(dtype)
    codes = jnp.asarray(codes).astype(dtype)
    if zero_point is not None:
        codes = codes - jnp.asarray(zero_point).astype(dtype)
    return jnp.asarray(step, dtype) * (codes + jnp.asarray(offset, dtype))


def quantize_values(
    x: jax.Array,
    delta: jax.Array,
    alphabet: Alphabet,
    uniform: jax.Array | None = None,
    zero_point: jax.Array | None = None,
) -> jax.Array:
    """``Q_A(x)``: the nearest (or stochastically rounded) level."""
    k = round_to_codes(x, delta, alphabet, uniform, zero_point)
    return dequantize(k, delta, alphabet.offset, zero_point=zero_point)


def int_dtype(alphabet: Alphabet) -> np.dtype:
    """The in-memory dtype of an alphabet's codes: int8, or int16 when the codes need it."""
    if alphabet.kmin >= -128 and alphabet.kmax <= 127:
        return np.dtype(np.int8)
    return np.dtype(np.int16)


def storage_layout(alphabet: Alphabet) -> tuple[np.dtype, int]:
    """How checkpoints store codes: the smallest signed dtype and a shift added to every code.

    Up to 16 levels fit int4 (XLA on CPU stores but does not compute with it), up to 256 int8,
    else int16. Codes outside the signed range (the "asym" grid's 0..2^b-1) are shifted into it,
    e.g. 0..15 by -8; loading subtracts the shift again.
    """
    for dtype, lo, hi in ((jnp.dtype(jnp.int4), -8, 7), (np.dtype(np.int8), -128, 127)):
        if alphabet.kmax - alphabet.kmin <= hi - lo:
            shift = 0 if (alphabet.kmin >= lo and alphabet.kmax <= hi) else lo - alphabet.kmin
            return dtype, shift
    return np.dtype(np.int16), 0


def describe(spec: QuantSpec) -> dict:
    """A JSON-friendly summary: the spec's fields with defaults resolved, levels, storage bits."""
    a = spec.alphabet
    out = spec.to_dict()
    del out["search_grid"]
    out.update(scale=spec.scale or spec.step_rule, per_channel=spec.channelwise)
    return {**out, "levels": a.levels, "storage_bits": a.storage_bits}


def as_spec(spec: QuantSpec | dict | None) -> QuantSpec:
    """Accept a QuantSpec, a dict of its fields, or None (the default spec)."""
    if spec is None:
        return QuantSpec()
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, dict):
        return QuantSpec(**spec)
    raise TypeError(f"spec must be a QuantSpec or a dict, got {type(spec).__name__}")


__all__: Sequence[str] = (
    "QuantSpec", "Alphabet", "make_alphabet", "base_scale", "step_size",
    "steps_and_zero_points", "expand_groups", "n_groups", "bits_per_weight", "round_to_codes",
    "dequantize", "quantize_values", "int_dtype", "storage_layout", "describe", "as_spec",
    "GRIDS", "SCALE_RULES", "DEFAULT_SEARCH_GRID",
)  # fmt: skip
