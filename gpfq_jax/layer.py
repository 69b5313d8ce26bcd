"""One layer: quantize a Dense or Conv kernel from data or from accumulated statistics.

A kernel in Flax layout ((N_in, N_out) for Dense, (kh, kw, cin/g, cout) for Conv) becomes
``g`` matrix problems (g = feature_group_count, from the statistics), each (N, cout/g) with
N = kh*kw*cin/g, solved together (vmapped over groups, all neurons at once).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.alphabets import QuantSpec, as_spec, codes_to_values, describe, step_size
from gpfq_jax.baselines import GptqFactor, gptq_codes_from_factor, gptq_factor, rtn_codes
from gpfq_jax.gpfq import gpfq_gram_form
from gpfq_jax.sharding import pad_to_multiple, replicate, resolve_mesh, shard_along
from gpfq_jax.stats import (
    LayerStats,
    error_given_terms,
    error_terms,
    grouped_kernel,
    stats_from_data,
)

METHODS = ("gpfq", "rtn", "gptq")


@dataclasses.dataclass
class LayerResult:
    """A quantized layer.

    q: dequantized kernel, shape and layout of the input kernel.
    codes: integer codes, same shape (int8, or int16 when the alphabet needs it).
    scale: the step delta: (N_out,) per channel, or a scalar () per layer.
    rel_error: ||X W - X~ Q||_F / ||X W||_F over the calibration data (from the statistics).
    c: the step multiplier used ((N_out,) when chosen per channel by ``scale="search"``).
    """

    q: jax.Array
    codes: jax.Array
    scale: jax.Array
    rel_error: float
    spec: QuantSpec
    method: str
    c: Any
    offset: float
    seconds: float = 0.0

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


def check_finite(name: str, a) -> None:
    """Raise ValueError if array ``a`` holds NaN or Inf."""
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(a)))):
        raise ValueError(f"{name} contains NaN or Inf")


def _ungrouped(mats: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of ``stats.grouped_kernel``."""
    return jnp.transpose(mats, (1, 0, 2)).reshape(shape)


def _method_codes(
    method: str,
    w_g,
    stats: LayerStats,
    delta_g,
    spec: QuantSpec,
    uniform,
    block_size,
    gptq: GptqFactor | None,
):
    """Codes (g, N, n) of ``method`` for grouped weights and steps (g, n)."""
    alphabet = spec.alphabet
    if method == "rtn":
        return rtn_codes(w_g, delta_g[:, None, :], alphabet, uniform)
    if method == "gpfq":
        fn = lambda w, h, g, d, u: gpfq_gram_form(  # noqa: E731
            w,
            h,
            g,
            d,
            alphabet,
            block_size=block_size,
            sparsity=spec.sparsity,
            lam=spec.lam,
            uniform=u,
        )
        if uniform is None:
            return jax.vmap(lambda w, h, g, d: fn(w, h, g, d, None))(
                w_g, stats.hess, stats.cross, delta_g
            )
        return jax.vmap(fn)(w_g, stats.hess, stats.cross, delta_g, uniform)
    if method == "gptq":  # gptq_factor(...) was computed once per layer, outside the search
        return jax.vmap(lambda f, d: gptq_codes_from_factor(f, d, alphabet, block_size=block_size))(
            gptq, delta_g
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


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
      spec: the alphabet and step rule. method: "gpfq", "rtn" or "gptq".
      key: PRNG key, required for ``spec.rounding == "stochastic"``.
      block_size: column block of the Gram-form / GPTQ lazy updates (None: about N/32).
      damp, act_order: GPTQ's damping fraction and act-order.
      mesh: a ``jax.sharding.Mesh`` (its devices, flattened, split the output channels),
        "auto" (all local devices) or None. The codes do not depend on the device count.
    """
    spec = as_spec(spec)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"kernel must have at least 2 dims (in, out); got shape {kernel.shape}")
    g, n = stats.groups, stats.features
    if kernel.shape[-1] % g or math.prod(kernel.shape[:-1]) != n:
        raise ValueError(
            f"kernel shape {tuple(kernel.shape)} does not match statistics of {g} group(s) of "
            f"{n} features (need prod(kernel.shape[:-1]) == {n} and {g} | out channels)"
        )
    if int(stats.count) == 0:
        raise ValueError("empty statistics: no calibration rows were accumulated")
    check_finite("kernel", kernel)
    if stats.gram is None and (
        stats.out_ref is None
        or stats.out_drift is None
        or stats.out_ref.shape != (g, kernel.shape[-1] // g)
    ):
        raise ValueError(
            f"statistics without F must carry the output norms of this kernel ((g, n) = "
            f"{(g, kernel.shape[-1] // g)}); got "
            f"{None if stats.out_ref is None else tuple(stats.out_ref.shape)}: accumulate with "
            "StatsAccumulator(..., kernel=kernel)"
        )
    for name in ("hess", "cross", "gram", "out_ref", "out_drift"):
        if getattr(stats, name) is not None:
            check_finite(f"statistics ({name})", getattr(stats, name))
    if spec.rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key (key=jax.random.PRNGKey(...))")

    start = time.perf_counter()
    dtype = stats.hess.dtype
    mat = kernel.reshape(-1, kernel.shape[-1]).astype(dtype)
    w_g = grouped_kernel(mat, g)
    uniform = None
    if spec.rounding == "stochastic":
        uniform = jax.random.uniform(key, w_g.shape, dtype)
    mesh = resolve_mesh(mesh)
    n_cols = w_g.shape[-1]
    if mesh is not None:  # neurons across devices, statistics replicated
        w_g = shard_along(w_g, mesh, -1)
        uniform = None if uniform is None else shard_along(uniform, mesh, -1)
        if stats.gram is None:  # per-neuron norms padded like the columns
            stats = stats._replace(
                out_ref=pad_to_multiple(stats.out_ref, 1, mesh.size),
                out_drift=pad_to_multiple(stats.out_drift, 1, mesh.size),
            )
        stats = replicate(stats, mesh)
    multipliers = spec.search_grid if spec.scale == "search" else (1.0,)
    terms = error_terms(stats, w_g)  # Q-independent, once per layer
    gptq = None
    if method == "gptq":
        if spec.rounding != "nearest" or spec.sparsity is not None:
            raise ValueError("gptq supports rounding='nearest' without sparsity only")
        gptq = jax.vmap(lambda w, h: gptq_factor(w, h, damp=damp, act_order=act_order))(
            w_g, stats.hess
        )  # step-independent, once per layer
    best = None
    for mult in multipliers:
        c = spec.c * mult
        delta = step_size(mat, spec, c)  # (cout,)
        delta_g = delta.reshape(g, -1)
        if mesh is not None:  # padded columns get step 1 (their codes are sliced off)
            delta_g = shard_along(delta_g - 1.0, mesh, -1) + 1.0
        codes = _method_codes(method, w_g, stats, delta_g, spec, uniform, block_size, gptq)
        q_g = codes_to_values(codes, delta_g[:, None, :], spec.alphabet)
        err = error_given_terms(stats, terms, w_g, q_g)[..., :n_cols]  # (g, n)
        codes = codes[..., :n_cols]
        cand = (codes, err, jnp.full(err.shape, c, dtype))
        if best is None:
            best = cand
        else:
            if spec.channelwise:
                better = cand[1] < best[1]  # per neuron
            else:
                better = jnp.broadcast_to(cand[1].sum() < best[1].sum(), err.shape)
            best = tuple(
                jnp.where(better[:, None, :] if b.ndim == 3 else better, c_, b)
                for c_, b in zip(cand, best)
            )
    codes, err, c_g = best
    ref = terms.ref[..., :n_cols]
    c_out = c_g.reshape(-1)
    delta = step_size(mat, spec, c_out if spec.channelwise else c_out[0])
    q = codes_to_values(_ungrouped(codes, mat.shape), delta, spec.alphabet)
    rel = float(jnp.sqrt(err.sum() / jnp.maximum(ref.sum(), jnp.finfo(dtype).tiny)))
    code_dtype = jnp.int8 if -128 <= spec.alphabet.kmin and spec.alphabet.kmax <= 127 else jnp.int16
    scale = delta if spec.channelwise else delta[0]
    c_val = c_out if (spec.channelwise and spec.scale == "search") else c_out[0]
    return LayerResult(
        q=q.reshape(kernel.shape).astype(kernel.dtype),
        codes=_ungrouped(codes, mat.shape).reshape(kernel.shape).astype(code_dtype),
        scale=scale.astype(kernel.dtype),
        rel_error=rel,
        spec=spec,
        method=method,
        c=c_val,
        offset=spec.alphabet.offset,
        seconds=time.perf_counter() - start,
    )


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
    w, x = jnp.asarray(w), jnp.asarray(x)
    if w.ndim != 2:
        raise ValueError(f"w must be (N_in, N_out); got shape {tuple(w.shape)}")
    if x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x must be (m, {w.shape[0]}) to match w {tuple(w.shape)}; got shape {tuple(x.shape)}"
        )
    xq = x if x_quant is None else jnp.asarray(x_quant)
    if xq.shape != x.shape:
        raise ValueError(f"x_quant shape {tuple(xq.shape)} differs from x shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty calibration data: x has 0 rows")
    check_finite("x", x)
    if x_quant is not None:
        check_finite("x_quant", xq)
    check_finite("w", w)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return quantize_from_stats(w, stats_from_data(x, xq, dtype), spec, method, **kwargs)


__all__ = ["LayerResult", "quantize_layer", "quantize_from_stats", "check_finite", "METHODS"]
