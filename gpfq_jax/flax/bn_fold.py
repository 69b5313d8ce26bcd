"""Fold an inference-mode BatchNorm into the Dense/Conv kernel it directly follows.

BN(y) = (y - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel. For
y = x W + b:  BN(y) = x (W s) + (b s + beta - mean s).

After folding, the BatchNorm is rewritten to the exact identity (scale 1, bias 0, mean 0 and
var = 1 - eps, chosen so that var + eps == 1 exactly in the variable's dtype) and stays in the
model, so the folded variables are drop-in for the same ``model.apply``. A layer without a bias
(``use_bias=False``) has nowhere to put the shift: its kernel is still scaled, and the
BatchNorm keeps the shift alone (scale 1, var 1 - eps, mean = -shift, bias 0), which is also
exact. The fold is computed in float64 and cast back to each variable's dtype.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpfq_jax.flax.paths import get_in, module_at, path_name, replace_in
from gpfq_jax.flax.rules import LayerPlan
from gpfq_jax.flax.tracing import BNFollow, LayerInfo


@dataclasses.dataclass(frozen=True)
class Folded:
    """New values for a folded (layer, BatchNorm) pair; ``None`` means: leave as is."""

    kernel: np.ndarray
    bias: np.ndarray | None
    bn_scale: np.ndarray | None
    bn_bias: np.ndarray | None
    bn_mean: np.ndarray
    bn_var: np.ndarray


def identity_var(epsilon: float, dtype) -> np.ndarray:
    """A scalar ``v`` of ``dtype`` with ``v + epsilon == 1`` exactly (so rsqrt gives 1)."""
    dt = np.dtype(dtype)
    v = dt.type(1) - dt.type(epsilon)
    for _ in range(8):
        s = v + dt.type(epsilon)
        if s == 1:
            break
        v = np.nextafter(v, dt.type(2) if s < 1 else dt.type(0))
    return np.asarray(v, dt)


def fold_arrays(kernel, bias, gamma, beta, mean, var, epsilon: float) -> Folded:
    """Fold BN (gamma, beta, mean, var: (cout,) or None for absent scale/bias) into a kernel.

    kernel: (..., cout) Flax layout; bias: (cout,) or None. Returns the new arrays (dtypes of
    the inputs); the BN values make it the identity (or the bare shift when ``bias`` is None).
    """
    k = np.asarray(kernel)
    cout = k.shape[-1]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    m, v = f64(mean), f64(var)
    if m.shape != (cout,) or v.shape != (cout,):
        raise ValueError(
            f"BatchNorm statistics of shape {m.shape} do not match the layer's "
            f"{cout} output channels"
        )
    g = np.ones(cout) if gamma is None else f64(gamma)
    b = np.zeros(cout) if beta is None else f64(beta)
    s = g / np.sqrt(v + epsilon)
    shift = b - m * s
    new_k = (f64(k) * s).astype(k.dtype)
    like = lambda a, val: None if a is None else np.asarray(val, np.asarray(a).dtype)  # noqa: E731
    mdt = np.asarray(mean).dtype
    if bias is not None:
        new_b = (f64(bias) * s + shift).astype(np.asarray(bias).dtype)
        new_mean = np.zeros(cout, mdt)
    else:
        new_b = None
        new_mean = (-shift).astype(mdt)
    vdt = np.asarray(var).dtype
    return Folded(
        new_k,
        new_b,
        like(gamma, np.ones(cout)),
        like(beta, np.zeros(cout)),
        new_mean,
        np.full(cout, identity_var(epsilon, vdt), vdt),
    )


# --------------------------------------------------------------------------- Linen


def fold_linen(variables: Mapping, pairs: Sequence[BNFollow]) -> Mapping:
    """Linen variables with every foldable pair folded (a new tree; the input is untouched)."""
    out = variables
    for p in pairs:
        params, bnp = ("params", *p.path), ("params", *p.bn_path)
        bstats = ("batch_stats", *p.bn_path)
        f = fold_arrays(
            get_in(out, (*params, "kernel")),
            get_in(out, (*params, "bias")),
            get_in(out, (*bnp, "scale")),
            get_in(out, (*bnp, "bias")),
            get_in(out, (*bstats, "mean")),
            get_in(out, (*bstats, "var")),
            p.epsilon,
        )
        updates = [
            ((*params, "kernel"), f.kernel),
            ((*params, "bias"), f.bias),
            ((*bnp, "scale"), f.bn_scale),
            ((*bnp, "bias"), f.bn_bias),
            ((*bstats, "mean"), f.bn_mean),
            ((*bstats, "var"), f.bn_var),
        ]
        for path, val in updates:
            if val is not None:
                out = replace_in(out, path, jnp.asarray(val))
    return out


# --------------------------------------------------------------------------- NNX


def _value(var: Any) -> Any:
    return None if var is None else var[...]


def fold_nnx(model: nnx.Module, pairs: Sequence[BNFollow]) -> None:
    """Fold every pair in place. Only call this on a private copy (``nnx.clone``)."""
    for p in pairs:
        layer, bn = module_at(model, p.path), module_at(model, p.bn_path)
        f = fold_arrays(
            _value(layer.kernel),
            _value(layer.bias),
            _value(bn.scale),
            _value(bn.bias),
            _value(bn.mean),
            _value(bn.var),
            p.epsilon,
        )
        for var, val in (
            (layer.kernel, f.kernel),
            (layer.bias, f.bias),
            (bn.scale, f.bn_scale),
            (bn.bias, f.bn_bias),
            (bn.mean, f.bn_mean),
            (bn.var, f.bn_var),
        ):
            if var is not None and val is not None:
                var.set_value(jnp.asarray(val))


def fold_batchnorms(
    target: Any,
    follows: list[BNFollow],
    layers: list[LayerInfo],
    plans: list[LayerPlan],
    batch: Any,
) -> list[tuple[str, str]]:
    """Fold the foldable BN pairs of quantized layers into the target's float model.

    ``target`` is a ``gpfq_jax.flax.targets.Target``. Pairs that cannot be folded are left (with
    a warning naming them); the float model's outputs on ``batch`` are compared before and
    after, and a fold that changes them (the pre-BN output used elsewhere) raises ValueError
    naming the pair. Returns the folded (layer, BatchNorm) name pairs.
    """
    quantized = {layer.path for layer, plan in zip(layers, plans) if not plan.skip}
    pairs = []
    for p in follows:
        if p.path not in quantized:
            continue
        if not p.foldable:
            warnings.warn(
                f"not folding BatchNorm {path_name(p.bn_path)!r} into "
                f"{path_name(p.path)!r}: {p.reason}",
                stacklevel=3,
            )
            continue
        pairs.append(p)
    if not pairs:
        return []
    before = target.forward(batch)
    target.fold(pairs)
    bad = _changed_outputs(before, target.forward(batch))
    if bad:
        culprits = [p for p in pairs if _changed_outputs(before, target.forward(batch, fold=[p]))]
        names = ", ".join(f"{path_name(p.path)} -> {path_name(p.bn_path)}" for p in culprits) or "?"
        raise ValueError(
            f"folding BatchNorm changed the float model's outputs (relative "
            f"difference {bad:.2e}) for: {names}; the layer's pre-BatchNorm output "
            "is probably used elsewhere too. Pass fold_batchnorm=False."
        )
    return [(path_name(p.path), path_name(p.bn_path)) for p in pairs]


def _changed_outputs(a: Any, b: Any) -> float:
    """Largest relative output difference if above the dtype's tolerance, else 0."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        denom = max(float(np.abs(x64).max(initial=0.0)), 1e-30)
        rel = float(np.abs(x64 - y64).max(initial=0.0)) / denom
        if rel > max(1e-3, 16 * float(jnp.finfo(x.dtype).eps)):
            worst = max(worst, rel)
    return worst


__all__ = [
    "fold_batchnorms",
    "Folded",
    "identity_var",
    "fold_arrays",
    "fold_linen",
    "fold_nnx",
]
