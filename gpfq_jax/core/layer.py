"""One layer: quantize a Dense or Conv kernel from data or from accumulated statistics.

A kernel in Flax layout ((N_in, N_out) for Dense, (kh, kw, cin/g, cout) for Conv) becomes
``g`` matrix problems (g = feature_group_count, from the statistics), each (N, cout/g) with
N = kh*kw*cin/g, solved together (vmapped over groups, all neurons at once). The steps come
from the spec's rule; with ``scale="search"`` each candidate multiplier of the step is tried
and the one with the smallest output error (from the statistics) is kept, per channel or per
layer. With ``spec.group_size`` the steps (and "asym" zero points) are per (group of input
features, neuron), fixed up front from the float weights; the search multiplier is still per
neuron (or per layer), since the output error is per neuron.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.alphabets import (
    QuantSpec,
    as_spec,
    dequantize,
    expand_groups,
    steps_and_zero_points,
)
from gpfq_jax.core.code_dtypes import int_dtype
from gpfq_jax.core.gpfq import gpfq_gram_form
from gpfq_jax.core.gptq import GptqFactor, gptq_codes_from_factor, gptq_factor, qronos_factor
from gpfq_jax.core.numerics import (
    as_float32_safe,
    check_finite,
    check_real,
    max_abs,
    pow2_normalizer,
    scaled,
)
from gpfq_jax.core.output_error import ErrorTerms, error_given_terms, error_terms
from gpfq_jax.core.patches import grouped_kernel, ungrouped_kernel
from gpfq_jax.core.result import LayerResult
from gpfq_jax.core.rtn import rtn_codes
from gpfq_jax.core.sharding import pad_to_multiple, replicate, resolve_mesh, shard_along
from gpfq_jax.core.stats import LayerStats, stats_from_data

METHODS = ("gpfq", "rtn", "gptq", "qronos")
# Methods quantizing through a GPTQ factor (step-independent, computed once per layer).
FACTOR_METHODS = ("gptq", "qronos")


def _rows(a: jax.Array | None) -> jax.Array | None:
    """Per-neuron (g, n) -> (g, 1, n), so that it broadcasts against (g, N, n); (g, N, n) as is."""
    return a[:, None, :] if a is not None and a.ndim == 2 else a


def _method_codes(
    method: str,
    w_g: jax.Array,
    stats: LayerStats,
    delta_g: jax.Array,
    spec: QuantSpec,
    uniform: jax.Array | None,
    block_size: int | None,
    gptq: GptqFactor | None,
    zero_g: jax.Array | None = None,
    act_order: bool = False,
) -> jax.Array:
    """Codes (g, N, n) of ``method`` for grouped weights (g, N, n) and steps (g, n) per neuron
    or (g, N, n) per feature row (group-wise); zero points ("asym") shaped like the steps.
    ``act_order`` (GPFQ; GPTQ's is in its factor): walk the features in descending order of
    diag(H), each row keeping its own step and zero point; codes come back in kernel order."""
    alphabet = spec.alphabet
    if method == "rtn":
        return rtn_codes(w_g, _rows(delta_g), alphabet, uniform, zero_point=_rows(zero_g))
    if method == "gpfq":

        def solve_in_order(w, h, cross, d, u, z):
            return gpfq_gram_form(
                w, h, cross, d, alphabet, block_size=block_size, sparsity=spec.sparsity,
                lam=spec.lam, uniform=u, zero_point=z,
            )  # fmt: skip

        def solve(w, h, cross, d, u, z):
            if not act_order:
                return solve_in_order(w, h, cross, d, u, z)
            perm = jnp.argsort(-jnp.diagonal(h), stable=True)
            rows = lambda a: a if a is None or a.ndim < 2 else a[perm]  # noqa: E731
            codes = solve_in_order(w[perm], h[perm][:, perm], cross[perm][:, perm], rows(d),
                                   rows(u), rows(z))  # fmt: skip
            return codes[jnp.argsort(perm)]

        args = (w_g, stats.hess, stats.cross, delta_g, uniform, zero_g)
        axes = tuple(None if a is None else 0 for a in args)
        return jax.vmap(solve, in_axes=axes)(*args)

    # gptq, qronos: the factor (step-independent) was computed once per layer, outside the search
    def solve_gptq(f, d, z):
        return gptq_codes_from_factor(f, d, alphabet, block_size=block_size, zero_point=z)

    return jax.vmap(solve_gptq, in_axes=(0, 0, None if zero_g is None else 0))(
        gptq, delta_g, zero_g
    )


def _grouped_steps(
    mat: jax.Array, spec: QuantSpec, c: Any, groups: int
) -> tuple[jax.Array, jax.Array | None]:
    """Steps and zero points of kernel matrix ``mat`` (N, cout) for the conv groups:
    (g, n) per neuron, or (g, N, n) per feature row with ``spec.group_size``."""
    delta, zero = steps_and_zero_points(mat, spec, c)
    if spec.group_size is None:
        return delta.reshape(groups, -1), None if zero is None else zero.reshape(groups, -1)
    n = mat.shape[0]
    delta = grouped_kernel(expand_groups(delta, n, spec.group_size), groups)
    if zero is not None:
        zero = grouped_kernel(expand_groups(zero, n, spec.group_size), groups)
    return delta, zero


def _validate_options(method: Any, key: Any, damp: Any, block_size: Any, act_order: Any) -> None:
    """Raise for options of the wrong type or value (before any work is done)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if isinstance(damp, bool) or not isinstance(damp, int | float | np.integer | np.floating):
        raise TypeError(f"damp must be a real number >= 0, got {damp!r}")
    if not (math.isfinite(float(damp)) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0 (GPTQ's damping), got {damp!r}")
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, int | np.integer)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    if not isinstance(act_order, bool | np.bool_):
        raise TypeError(f"act_order must be True or False, got {act_order!r}")
    if key is not None and not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(f"key must be a JAX PRNG key (jax.random.PRNGKey(...)), got {key!r}")


def _validate(kernel: jax.Array, stats: LayerStats, spec: QuantSpec, method: str, key) -> None:
    """Raise ValueError / TypeError for a kernel or statistics that cannot be quantized."""
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f"kernel dtype {kernel.dtype} is not a floating type: quantize float weights "
            "(cast them with .astype(jnp.float32) first)"
        )
    if not isinstance(stats, LayerStats):
        raise TypeError(
            f"stats must be LayerStats (see StatsAccumulator), got {type(stats).__name__}"
        )
    if kernel.ndim < 2:
        raise ValueError(f"kernel must have at least 2 dims (in, out); got shape {kernel.shape}")
    groups, n = stats.groups, stats.features
    if kernel.shape[-1] % groups or math.prod(kernel.shape[:-1]) != n:
        raise ValueError(
            f"kernel shape {tuple(kernel.shape)} does not match statistics of {groups} group(s) "
            f"of {n} features (need prod(kernel.shape[:-1]) == {n} and {groups} | out channels)"
        )
    if int(stats.count) == 0:
        raise ValueError("empty statistics: no calibration rows were accumulated")
    check_finite("kernel", kernel)
    neurons = (groups, kernel.shape[-1] // groups)
    if stats.xtx is None and (
        stats.out_ref is None or stats.out_drift is None or stats.out_ref.shape != neurons
    ):
        got = None if stats.out_ref is None else tuple(stats.out_ref.shape)
        raise ValueError(
            f"statistics without F must carry the output norms of this kernel ((g, n) = "
            f"{neurons}); got {got}: accumulate with StatsAccumulator(..., kernel=kernel)"
        )
    for name in ("hess", "cross", "xtx", "out_ref", "out_drift"):
        if getattr(stats, name) is not None:
            check_finite(f"statistics ({name})", getattr(stats, name))
    if spec.rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key (key=jax.random.PRNGKey(...))")
    if method in FACTOR_METHODS and (spec.rounding != "nearest" or spec.sparsity is not None):
        raise ValueError(f"{method} supports rounding='nearest' without sparsity only")


def _factor(
    method: str, w_g: jax.Array, stats: LayerStats, damp: float, act_order: bool
) -> GptqFactor | None:
    """The GPTQ or Qronos factors of grouped weights (g, N, n), once per layer; None otherwise."""
    if method == "gptq":
        return jax.vmap(lambda w, h: gptq_factor(w, h, damp=damp, act_order=act_order))(
            w_g, stats.hess
        )
    if method == "qronos":
        return jax.vmap(lambda w, h, g: qronos_factor(w, h, g, damp=damp, act_order=act_order))(
            w_g, stats.hess, stats.cross
        )
    return None


def _search(
    mat: jax.Array,
    w_g: jax.Array,
    stats: LayerStats,
    terms: ErrorTerms,
    spec: QuantSpec,
    method: str,
    uniform: jax.Array | None,
    block_size: int | None,
    gptq: GptqFactor | None,
    mesh,
    act_order: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Try every step multiplier; keep, per channel (or per layer), the smallest output error.

    mat: (N, cout) kernel matrix; w_g: (g, N, n) grouped (maybe padded and sharded) kernel.
    Returns (codes (g, N, n_cols), errors (g, n_cols), multipliers c (g, n_cols)).
    """
    groups, n_cols = w_g.shape[0], mat.shape[-1] // w_g.shape[0]
    multipliers = spec.search_grid if spec.scale == "search" else (1.0,)
    best = None
    for mult in multipliers:
        c = spec.c * mult
        delta_g, zero_g = _grouped_steps(mat, spec, c, groups)  # (g, n) or (g, N, n)
        if mesh is not None:  # padded columns get step 1 (their codes are sliced off)
            delta_g = shard_along(delta_g - 1.0, mesh, -1) + 1.0
            zero_g = None if zero_g is None else shard_along(zero_g, mesh, -1)
        codes = _method_codes(method, w_g, stats, delta_g, spec, uniform, block_size, gptq, zero_g,
                              act_order)  # fmt: skip
        q_g = dequantize(codes, _rows(delta_g), spec.alphabet.offset, zero_point=_rows(zero_g))
        err = error_given_terms(stats, terms, w_g, q_g)[..., :n_cols]  # (g, n)
        cand = (codes[..., :n_cols], err, jnp.full(err.shape, c, err.dtype))
        if best is None:
            best = cand
            continue
        if spec.channelwise:
            better = cand[1] < best[1]  # per neuron
        else:
            better = jnp.broadcast_to(cand[1].sum() < best[1].sum(), err.shape)
        best = tuple(
            jnp.where(better[:, None, :] if b.ndim == 3 else better, new, b)
            for new, b in zip(cand, best)
        )
    return best


def _assemble(
    kernel: jax.Array,
    mat: jax.Array,
    kernel_scale: float,
    codes_g: jax.Array,
    err: jax.Array,
    ref: jax.Array,
    c_g: jax.Array,
    spec: QuantSpec,
    method: str,
    start: float,
) -> LayerResult:
    """The LayerResult of the chosen codes (g, N, n), errors and multipliers (g, n).

    ``mat`` is the kernel matrix times ``kernel_scale``; the steps are divided by it (exact).
    """
    dtype = err.dtype
    c_out = c_g.reshape(-1)
    gs = spec.group_size
    delta, zero = steps_and_zero_points(mat, spec, c_out if spec.channelwise else c_out[0])
    delta = delta / kernel_scale
    codes = ungrouped_kernel(codes_g, mat.shape)
    n = mat.shape[0]
    q = dequantize(
        codes,
        expand_groups(delta, n, gs),
        spec.alphabet.offset,
        zero_point=expand_groups(zero, n, gs),
    )
    rel = float(jnp.sqrt(err.sum() / jnp.maximum(ref.sum(), jnp.finfo(dtype).tiny)))
    per_layer = gs is None and not spec.channelwise
    step = delta[0] if per_layer else delta
    if zero is not None:
        zero = (zero[0] if per_layer else zero).astype(kernel.dtype)
    c_val = c_out if (spec.channelwise and spec.scale == "search") else c_out[0]
    return LayerResult(
        q=q.reshape(kernel.shape).astype(kernel.dtype),
        codes=codes.reshape(kernel.shape).astype(int_dtype(spec.alphabet)),
        step=step.astype(kernel.dtype),
        rel_error=rel,
        spec=spec,
        method=method,
        c=c_val,
        offset=spec.alphabet.offset,
        seconds=time.perf_counter() - start,
        zero_point=zero,
        group_size=gs,
    )


def quantize_from_stats(
    kernel: jax.Array,
    stats: LayerStats,
    spec: QuantSpec | dict | None = None,
    method: str = "gpfq",
    *,
    key: jax.Array | None = None,
    block_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    mesh=None,
) -> LayerResult:
    """Quantize a Dense or Conv kernel from its layer's accumulated statistics.

    Args:
      kernel: (N_in, N_out) Dense or (kh, kw, cin/g, cout) Conv kernel, Flax layout.
      stats: the layer's LayerStats (g problems of N = prod(kernel.shape[:-1]) features).
      spec: the alphabet and step rule. method: "gpfq", "rtn", "gptq" or "qronos" (GPTQ
        from the least-squares weights of the float output; ``gptq.qronos_factor``).
      key: PRNG key, required for ``spec.rounding == "stochastic"``.
      block_size: column block of the Gram-form / GPTQ lazy updates (None:
        ``gpfq_jax.core.gpfq.default_block_size`` for GPFQ,
        ``gpfq_jax.core.gptq.default_gptq_block_size`` for GPTQ).
      damp: GPTQ's and Qronos's damping. act_order: GPTQ, Qronos and GPFQ walk the features in
        descending diag(H); group steps stay the contiguous groups'; codes come back in
        kernel order.
      mesh: a ``jax.sharding.Mesh`` (its devices, flattened, split the output channels),
        "auto" (all local devices) or None. The codes do not depend on the device count.
    """
    spec = as_spec(spec)
    _validate_options(method, key, damp, block_size, act_order)
    kernel = as_float32_safe("kernel", kernel)
    _validate(kernel, stats, spec, method, key)
    start = time.perf_counter()
    dtype = stats.hess.dtype
    # Exact power-of-two normalization (the accumulator applied the same one to its kernel):
    # the work is done on kernel_scale * W and the steps are divided by it at the end.
    kernel_scale = pow2_normalizer(max_abs(kernel))
    mat = scaled(kernel.reshape(-1, kernel.shape[-1]), kernel_scale).astype(dtype)
    w_g = grouped_kernel(mat, stats.groups)
    uniform = jax.random.uniform(key, w_g.shape, dtype) if spec.rounding == "stochastic" else None
    mesh = resolve_mesh(mesh)
    if mesh is not None:  # neurons across devices, statistics replicated
        w_g = shard_along(w_g, mesh, -1)
        uniform = None if uniform is None else shard_along(uniform, mesh, -1)
        if stats.xtx is None:  # per-neuron norms padded like the columns
            stats = stats._replace(
                out_ref=pad_to_multiple(stats.out_ref, 1, mesh.size),
                out_drift=pad_to_multiple(stats.out_drift, 1, mesh.size),
            )
        stats = replicate(stats, mesh)
    terms = error_terms(stats, w_g)  # Q-independent, once per layer
    gptq = _factor(method, w_g, stats, damp, act_order)
    codes, err, c_g = _search(mat, w_g, stats, terms, spec, method, uniform, block_size, gptq, mesh,
                              act_order)  # fmt: skip
    ref = terms.ref[..., : mat.shape[-1] // stats.groups]
    return _assemble(kernel, mat, kernel_scale, codes, err, ref, c_g, spec, method, start)


def quantize_layer(
    w: jax.Array,
    x: jax.Array,
    x_quant: jax.Array | None = None,
    spec: QuantSpec | dict | None = None,
    method: str = "gpfq",
    **kwargs,
) -> LayerResult:
    """Quantize one Dense layer from its inputs.

    Args:
      w: (N_in, N_out) kernel (Flax layout: column j is neuron j).
      x: (m, N_in) the layer's inputs in the float model.
      x_quant: (m, N_in) the same inputs in the partially quantized model (default: x).
      spec, method, kwargs: as ``quantize_from_stats``.
    Returns: LayerResult with q, codes (shape of w), scale ((N_out,) or ()), rel_error.
    """
    w, x = as_float32_safe("w", w), as_float32_safe("x", x)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"w dtype {w.dtype} is not a floating type: quantize float weights "
            "(cast them with .astype(jnp.float32) first)"
        )
    if w.ndim != 2:
        raise ValueError(f"w must be (N_in, N_out); got shape {tuple(w.shape)}")
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x must be (m, {w.shape[0]}) to match w {tuple(w.shape)}; got shape {tuple(x.shape)}"
        )
    xq = x if x_quant is None else as_float32_safe("x_quant", x_quant)
    if xq.shape != x.shape:
        raise ValueError(f"x_quant shape {tuple(xq.shape)} differs from x shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty calibration data: x has 0 rows")
    check_real("x", x)
    check_real("x_quant", xq)
    check_finite("x", x)
    if x_quant is not None:
        check_finite("x_quant", xq)
    check_finite("w", w)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return quantize_from_stats(w, stats_from_data(x, xq, dtype), spec, method, **kwargs)


__all__ = ["LayerResult", "quantize_layer", "quantize_from_stats", "METHODS"]
