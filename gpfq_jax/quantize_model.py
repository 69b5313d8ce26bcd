"""Whole-model driver: quantize every Dense/Conv layer of a Flax model, in forward order.

For layer l: run the float model and the model whose layers < l are already quantized on the
same calibration batches, capture layer l's input in both (a jitted prefix of the model that
returns only that input), stream the batches into a ``StatsAccumulator`` (H, G, F), quantize
with ``quantize_from_stats``, write the dequantized kernel ``scale * (codes + offset)`` back
into the quantized model, and go on. Only one batch of one layer's inputs is alive at a time.

The "float model" is the user's model, after BatchNorm folding when ``fold_batchnorm=True``.
Linen and NNX specifics live in the two small ``_Target`` adapters at the bottom.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gpfq_jax import bn_fold
from gpfq_jax.alphabets import QuantSpec, describe
from gpfq_jax.calls import BNFollow, InputShapeError, trace_bn_follows
from gpfq_jax.capture import LayerInfo, discover_layers, make_input_capturer, set_kernel
from gpfq_jax.layer import quantize_from_stats
from gpfq_jax.rules import LayerPlan, plan_layers
from gpfq_jax.sharding import replicate, resolve_mesh
from gpfq_jax.stats import ConvGeometry, StatsAccumulator

HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class LayerRecord:
    """One quantized layer.

    path: module path (Linen: in ``variables['params']``; NNX: attribute path); name: "/".join.
    kind: "dense" or "conv"; shape: the kernel shape (Flax layout).
    codes: integer codes, shape ``shape`` (int8/int16); scale: the step, (cout,) or ();
    dequantized kernel = ``scale * (codes + offset)`` (see :func:`dequantize`).
    rel_error: ||X W - X~ Q||_F / ||X W||_F on the calibration data.
    seconds = capture_seconds (forward passes, incl. compilation) + stats_seconds
    (accumulating H, G, F) + quant_seconds (quantize_from_stats).
    rows: calibration rows accumulated (samples for Dense, patches for Conv).
    bias_shift: (cout,) added to the bias by bias correction, else None.
    capture_first_seconds: the first batch's share of capture_seconds (includes compiling
    the layer's capture function).
    """

    path: tuple[Any, ...]
    name: str
    kind: str
    shape: tuple[int, ...]
    spec: QuantSpec
    method: str
    levels: int
    storage_bits: int
    scale: jax.Array
    codes: jax.Array
    c: Any
    offset: float
    rel_error: float
    seconds: float
    capture_seconds: float
    stats_seconds: float
    quant_seconds: float
    rows: int = 0
    bias_shift: jax.Array | None = None
    capture_first_seconds: float = 0.0

    def summary(self) -> dict:
        c = np.asarray(self.c)
        return {
            "layer": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            **describe(self.spec),
            "method": self.method,
            "c": float(c) if c.ndim == 0 else [float(v) for v in c],
            "rel_error": float(self.rel_error),
            "rows": self.rows,
            "bias_corrected": self.bias_shift is not None,
            "seconds": self.seconds,
            "capture_seconds": self.capture_seconds,
            "capture_first_seconds": self.capture_first_seconds,
            "stats_seconds": self.stats_seconds,
            "quant_seconds": self.quant_seconds,
        }


_TABLE = (
    ("layer", "{}"),
    ("kind", "{}"),
    ("shape", "{}"),
    ("bits", "{}"),
    ("grid", "{}"),
    ("method", "{}"),
    ("levels", "{}"),
    ("rel_error", "{:.4f}"),
    ("capture_s", "{:.3f}"),
    ("stats_s", "{:.3f}"),
    ("quant_s", "{:.3f}"),
)


class SummaryTable(list):
    """A list of per-layer dicts that prints as an aligned table."""

    def __str__(self) -> str:
        if not self:
            return "(no quantized layers)"
        key = {
            "capture_s": "capture_seconds",
            "stats_s": "stats_seconds",
            "quant_s": "quant_seconds",
        }
        rows = [
            [
                fmt.format(d[key.get(h, h)])
                if not isinstance(d[key.get(h, h)], list)
                else "x".join(map(str, d[key.get(h, h)]))
                for h, fmt in _TABLE
            ]
            for d in self
        ]
        heads = [h for h, _ in _TABLE]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        return "\n".join([line(heads), line(["-" * w for w in widths]), *map(line, rows)])


@dataclasses.dataclass
class QuantizeResult:
    """What ``quantize_params`` returns.

    variables: Linen: the variables tree with quantized kernels replaced by their dequantized
      values (drop-in for ``model.apply``). NNX: ``nnx.to_pure_dict(nnx.state(model))`` of
      the quantized copy.
    model: NNX: the quantized copy (the user's model is untouched); Linen: None.
    layers: one LayerRecord per quantized layer, forward order.
    skipped: names of the layers left float by rules. folded: (layer, batchnorm) name pairs.
    """

    variables: Any
    model: Any
    layers: list[LayerRecord]
    skipped: list[str]
    folded: list[tuple[str, str]]
    framework: str
    seconds: float = 0.0

    def summary(self) -> SummaryTable:
        """Per-layer dicts; ``print(res.summary())`` shows a table."""
        return SummaryTable(r.summary() for r in self.layers)

    def __getitem__(self, name: str) -> LayerRecord:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(
            f"no quantized layer {name!r}; layers: {', '.join(r.name for r in self.layers)}"
        )


def dequantize(codes: jax.Array, scale: jax.Array, offset: float, dtype) -> jax.Array:
    """``scale * (codes + offset)`` in ``dtype`` (the one formula used everywhere, so that
    res.variables and ``load_quantized`` agree bit for bit). scale broadcasts on the last axis.
    """
    dtype = jnp.dtype(dtype)
    return jnp.asarray(scale, dtype) * (
        jnp.asarray(codes).astype(dtype) + jnp.asarray(offset, dtype)
    )


# --------------------------------------------------------------------------- inputs


def calibration_batches(calib: Any, batch_size: int) -> list[Any]:
    """Split ``calib`` (one array: in order, ``batch_size`` rows per batch, the last one
    possibly smaller; or a list of arrays: each a batch) into batches, validated.

    Raises ValueError for empty data, NaN/Inf (naming the batch and sample), or batches whose
    per-sample shapes differ.
    """
    _check_batch_size(batch_size)
    if isinstance(calib, list | tuple):
        if not calib:
            raise ValueError("empty calibration data: got an empty list of batches")
        batches = list(calib)
    elif _is_array(calib):
        if calib.ndim == 0:
            raise ValueError("calibration data must have a leading batch axis, got a scalar")
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
    else:
        raise TypeError(
            "calib must be an array (n, ...), a list of arrays (batches) or a "
            f"zero-argument callable returning an iterator of batches; got "
            f"{type(calib).__name__}"
        )
    if not batches or all(np.shape(b)[:1] == (0,) for b in batches):
        raise ValueError("empty calibration data: 0 samples")
    first = _sample_shape(batches[0], 0)
    start = 0
    for i, b in enumerate(batches):
        start += _check_batch(b, i, first, start)
    return batches


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _sample_shape(b: Any, i: int) -> tuple[int, ...]:
    if not _is_array(b) or np.ndim(b) == 0:
        raise TypeError(
            f"calibration batch {i} must be an array with a batch axis, got {type(b).__name__}"
        )
    return tuple(b.shape[1:])


def _check_batch(b: Any, i: int, first: tuple[int, ...], start: int, where: str = "") -> int:
    """Validate batch ``i`` (samples ``start``...) against per-sample shape ``first``;
    return its number of samples. ``where`` qualifies the batch in messages."""
    if _sample_shape(b, i) != first:
        raise ValueError(
            f"calibration batch {i}{where} has per-sample shape "
            f"{tuple(b.shape[1:])}, batch 0 has {first}"
        )
    if b.shape[0] == 0:
        raise ValueError(f"empty calibration data: batch {i}{where} has 0 samples")
    if jnp.issubdtype(b.dtype, jnp.inexact):
        bad = ~np.isfinite(np.asarray(b).reshape(b.shape[0], -1)).all(axis=1)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(
                f"calibration data contains NaN or Inf: {int(bad.sum())} "
                f"sample(s) of batch {i}{where}, first at sample {start + j}"
            )
    return int(b.shape[0])


class Calibration:
    """Calibration batches, as a validated list or streamed from a callable.

    ``calib`` is an array (split into ``batch_size`` batches), a list of arrays (one batch
    each), or a zero-argument callable returning a fresh iterator of batches. A callable is
    called once per pass (once per quantized layer; the first pass also supplies the batch
    used to trace the model), so only one batch is held at a time: memory does not grow with
    the number of samples. Every pass must yield the same batches in the same order (same
    sample count, else ValueError). Streamed batches are validated as they arrive (shape,
    empty, NaN/Inf naming the batch and the sample).
    """

    def __init__(self, calib: Any, batch_size: int = 256):
        self._factory: Callable[[], Any] | None = None
        self._batches: list[Any] | None = None
        self._pending: Iterator[Any] | None = None
        self.calls = 0
        self._counts: tuple[int, int] | None = None  # (batches, samples) of the first pass
        if callable(calib) and not _is_array(calib):
            self._factory = calib
            self._pending = self._open()
            first = next(self._pending, None)
            if first is None:
                raise ValueError("empty calibration data: calib() yielded no batches")
            self._shape = _sample_shape(first, 0)
            _check_batch(first, 0, self._shape, 0, " (first pass of calib())")
            self._pending = itertools.chain([first], self._pending)
            self.first = first
        else:
            self._batches = calibration_batches(calib, batch_size)
            self.first = self._batches[0]

    def _open(self) -> Iterator[Any]:
        self.calls += 1
        source = self._factory()
        try:
            return iter(source)
        except TypeError:
            raise TypeError(
                f"calib() must return an iterable of batches (arrays); got {type(source).__name__}"
            ) from None

    def __iter__(self) -> Iterator[Any]:
        """One pass over the batches."""
        if self._batches is not None:
            yield from self._batches
            return
        it, self._pending = (self._pending or self._open()), None
        n_pass, start, i = self.calls, 0, -1
        where = f" (pass {n_pass} of calib())"
        for i, b in enumerate(it):
            start += _check_batch(b, i, self._shape, start, where)
            yield b
        counts = (i + 1, start)
        if self._counts is None:
            self._counts = counts
        elif counts != self._counts:
            raise ValueError(
                f"calib() yielded {counts[1]} samples in {counts[0]} batches on "
                f"pass {n_pass} but {self._counts[1]} in {self._counts[0]} on "
                "pass 1; it must yield the same batches on every call"
            )


def default_apply_kwargs(model: Any) -> dict:
    """``{"train": False}`` if the model's ``__call__`` takes ``train``, else ``{}``."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


# --------------------------------------------------------------------------- driver


def quantize_params(
    model: Any,
    variables: Any,
    calib: Any,
    spec: QuantSpec | dict | None = None,
    method: str = "gpfq",
    rules: Sequence[Any] | None = None,
    *,
    batch_size: int = 256,
    apply_kwargs: dict | None = None,
    fold_batchnorm: bool = False,
    bias_correction: bool = False,
    seed: int = 0,
    progress: bool = True,
    key: jax.Array | None = None,
    patch_fraction: float = 1.0,
    block_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    stats_dtype=jnp.float32,
    mesh: Mesh | str | None = None,
) -> QuantizeResult:
    """Quantize every Dense/Conv layer of ``model``, in forward order (GPFQ by default).

    Args:
      model: a Linen ``nn.Module`` (with ``variables``) or an NNX ``nnx.Module`` (variables
        None; the result's ``model`` is a quantized copy, the input model is untouched).
      variables: Linen variables dict (``params``, ``batch_stats``, ...), or None for NNX.
      calib: calibration inputs: one array (n, ...) split in order into ``batch_size`` batches,
        a list of arrays (each one batch), or a zero-argument callable returning a fresh
        iterator of batches (called once per quantized layer, so the data can stream from
        disk; every call must yield the same batches in the same order). See
        :class:`Calibration`.
      spec, method: default QuantSpec and method ("gpfq", "rtn", "gptq") for every layer.
      rules: list of ``Rule(pattern, skip, spec, method)`` (or tuples/dicts) matched with
        ``re.search`` on layer names; first match wins.
      apply_kwargs: extra arguments of the forward pass; default ``{"train": False}`` if
        ``__call__`` takes ``train``, else ``{}``. NNX models are run on an ``.eval()`` copy.
      fold_batchnorm: fold each inference-mode BatchNorm that directly follows a Dense/Conv
        into that layer before quantizing (see ``gpfq_jax.bn_fold``).
      bias_correction: after quantizing a layer with a bias, add to the bias the mean over
        calibration rows of (float output - quantized output) of that layer.
      seed: seeds patch subsampling and (when ``key`` is None) stochastic rounding.
      progress: show a tqdm bar over layers.
      key: PRNG key for stochastic rounding (per layer: ``fold_in(key, index)``).
      patch_fraction: fraction of conv patches (rows) kept per batch (seeded).
      block_size, damp, act_order: passed to ``quantize_from_stats``.
      stats_dtype: dtype of H, G, F and of the quantization arithmetic: float32, or float64
        (needs ``jax.config.update("jax_enable_x64", True)``, else ValueError).
      mesh: a ``jax.sharding.Mesh``, "auto" (one axis over all local devices) or None. With
        a mesh, each calibration batch (when its size divides the device count) is split
        over the devices for the forward passes, the statistics are accumulated
        data-parallel, and each layer's neurons are split over the devices. The codes do
        not depend on the device count (up to float summation order in the statistics).
    Returns: QuantizeResult.
    """
    start = time.perf_counter()
    _check_stats_dtype(stats_dtype)
    mesh = resolve_mesh(mesh)
    batches = Calibration(calib, batch_size)
    if apply_kwargs is None:
        apply_kwargs = default_apply_kwargs(model)
    target = _make_target(model, variables, dict(apply_kwargs))
    follows = _checked_trace(target, batches.first)
    layers = discover_layers(target.model, target.discover_vars, batches.first, **target.kwargs)
    plans = plan_layers([layer.name for layer in layers], rules, spec, method)
    folded = []
    if fold_batchnorm:
        folded = _fold(target, follows, layers, plans, batches.first)
    key = jax.random.PRNGKey(seed) if key is None else key

    records, skipped = [], []
    bar = tqdm(total=len(layers), desc="quantize", unit="layer", disable=not progress)
    try:
        for i, (layer, plan) in enumerate(zip(layers, plans)):
            bar.set_postfix_str(layer.name)
            if plan.skip:
                skipped.append(layer.name)
            else:
                records.append(
                    _quantize_layer(
                        target,
                        layer,
                        plan,
                        batches,
                        changed=bool(records),
                        bias_correction=bias_correction,
                        key=jax.random.fold_in(key, i),
                        seed=(seed * 1_000_003 + i) % 2**31,
                        patch_fraction=patch_fraction,
                        block_size=block_size,
                        damp=damp,
                        act_order=act_order,
                        stats_dtype=stats_dtype,
                        mesh=mesh,
                    )
                )
            bar.update(1)
    finally:
        bar.close()
    variables_out, model_out = target.result()
    return QuantizeResult(
        variables_out,
        model_out,
        records,
        skipped,
        folded,
        target.framework,
        time.perf_counter() - start,
    )


def _check_stats_dtype(dtype: Any) -> None:
    """float32 or float64 (the latter only with 64-bit JAX enabled)."""
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"stats_dtype must be float32 or float64, got {dt}")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "stats_dtype=float64 needs 64-bit JAX: call "
            "jax.config.update('jax_enable_x64', True) at start-up (or set "
            "JAX_ENABLE_X64=1); without it JAX silently computes in float32"
        )


def _place(batch: Any, mesh: Mesh | None) -> Any:
    """Split a calibration batch over the mesh's devices along its batch axis.

    Single process: only when the batch size is a multiple of the device count (otherwise
    the batch stays where it is; the statistics still split its rows). Several processes:
    ``batch`` is this process's share and becomes one global array.
    """
    if mesh is None:
        return batch
    spec = PartitionSpec(tuple(mesh.axis_names), *([None] * (np.ndim(batch) - 1)))
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(batch))
    if batch.shape[0] % mesh.size:
        return batch
    return jax.device_put(batch, sharding)


def _checked_trace(target: _Target, batch: Any) -> list[BNFollow]:
    """BN-follow pairs from one abstract pass; a model that fails on ``batch`` -> ValueError."""
    shape = tuple(batch.shape)
    try:
        return trace_bn_follows(target.model, target.discover_vars, batch, target.kwargs)
    except InputShapeError as e:
        raise ValueError(f"calibration inputs of shape {shape} do not fit the model: {e}") from e
    except NotImplementedError:
        raise
    except Exception as e:  # the model's own failure, re-raised with context
        raise ValueError(
            f"running the model on a calibration batch of shape {shape} (dtype "
            f"{batch.dtype}, apply_kwargs={target.kwargs}) failed; check the "
            f"input shape. {type(e).__name__}: {e}"
        ) from e


def _fold(
    target: _Target,
    follows: list[BNFollow],
    layers: list[LayerInfo],
    plans: list[LayerPlan],
    batch: Any,
) -> list[tuple[str, str]]:
    """Fold the foldable BN pairs of quantized layers into the float model; check outputs."""
    quantized = {layer.path for layer, plan in zip(layers, plans) if not plan.skip}
    pairs = []
    for p in follows:
        if p.path not in quantized:
            continue
        if not p.foldable:
            warnings.warn(
                f"not folding BatchNorm {_name(p.bn_path)!r} into {_name(p.path)!r}: {p.reason}",
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
        names = ", ".join(f"{_name(p.path)} -> {_name(p.bn_path)}" for p in culprits) or "?"
        raise ValueError(
            f"folding BatchNorm changed the float model's outputs (relative "
            f"difference {bad:.2e}) for: {names}; the layer's pre-BatchNorm output "
            "is probably used elsewhere too. Pass fold_batchnorm=False."
        )
    return [(_name(p.path), _name(p.bn_path)) for p in pairs]


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


def _quantize_layer(
    target: _Target,
    layer: LayerInfo,
    plan: LayerPlan,
    batches: Calibration,
    *,
    changed: bool,
    bias_correction: bool,
    key: jax.Array,
    seed: int,
    patch_fraction: float,
    block_size: int | None,
    damp: float,
    act_order: bool,
    stats_dtype,
    mesh: Mesh | None,
) -> LayerRecord:
    """Capture, accumulate, quantize and write back one layer."""
    capture = target.capturer(layer)
    kernel = target.float_kernel(layer)
    features = math.prod(layer.kernel_shape[:-1])
    neurons = layer.kernel_shape[-1] // layer.feature_group_count
    # F = X^T X costs rows x N^2; the per-neuron output norms that can replace it (the kernel is
    # known here) cost 2 x rows x N x n: use whichever is cheaper (norms for every conv here).
    acc = StatsAccumulator(
        features,
        _geometry(layer),
        stats_dtype,
        patch_fraction,
        seed,
        mesh=mesh,
        kernel=kernel if 2 * neurons < features else None,
    )
    correct = bias_correction and layer.has_bias
    sum_x, sum_xq, count = 0.0, 0.0, 0
    t_cap = t_stats = t_first = 0.0
    float_arg, quant_arg = target.float_arg, target.quant_arg
    if mesh is not None:  # the models on every device, once per layer (not per batch)
        float_arg = replicate(float_arg, mesh)
        quant_arg = replicate(quant_arg, mesh) if changed else float_arg
    for b in batches:
        t0 = time.perf_counter()
        b = _place(b, mesh)
        x = jax.block_until_ready(capture(float_arg, b))
        xq = jax.block_until_ready(capture(quant_arg, b)) if changed else x
        t1 = time.perf_counter()
        acc.update(x, xq)
        if correct:  # mean input rows (all rows, not subsampled): (g, N)
            rows = acc.rows(x)
            count += rows.shape[0]
            sum_x = sum_x + np.asarray(rows.sum(0), np.float64)
            sum_xq = sum_xq + (
                np.asarray(acc.rows(xq).sum(0), np.float64)
                if changed
                else np.asarray(rows.sum(0), np.float64)
            )
        jax.block_until_ready(acc.stats)
        t_stats += time.perf_counter() - t1
        t_cap += t1 - t0
        t_first = t_first or t1 - t0
    stats = acc.result()
    t0 = time.perf_counter()
    r = quantize_from_stats(
        kernel,
        stats,
        plan.spec,
        plan.method,
        key=key,
        block_size=block_size,
        damp=damp,
        act_order=act_order,
        mesh=mesh,
    )
    q = jax.block_until_ready(dequantize(r.codes, r.scale, r.offset, kernel.dtype))
    t_quant = time.perf_counter() - t0
    target.set_kernel(layer, q)
    shift = None
    if correct:
        shift = bias_shift(sum_x / count, sum_xq / count, kernel, q, layer.feature_group_count)
        bias = target.quant_bias(layer)
        target.set_bias(layer, (np.asarray(bias, np.float64) + shift).astype(bias.dtype))
        shift = jnp.asarray(shift, bias.dtype)
    return LayerRecord(
        path=layer.path,
        name=layer.name,
        kind=layer.kind,
        shape=tuple(layer.kernel_shape),
        spec=r.spec,
        method=r.method,
        levels=r.levels,
        storage_bits=r.storage_bits,
        scale=r.scale,
        codes=r.codes,
        c=r.c,
        offset=r.offset,
        rel_error=r.rel_error,
        seconds=t_cap + t_stats + t_quant,
        capture_seconds=t_cap,
        stats_seconds=t_stats,
        quant_seconds=t_quant,
        rows=int(stats.count),
        bias_shift=shift,
        capture_first_seconds=t_first,
    )


def bias_shift(
    mean_x: np.ndarray, mean_xq: np.ndarray, kernel: jax.Array, q: jax.Array, groups: int = 1
) -> np.ndarray:
    """(cout,) mean float output minus mean quantized output of a layer, bias excluded.

    mean_x, mean_xq: (g, N) mean input rows (float / quantized model; patches for conv);
    kernel, q: float and dequantized kernels (..., cout/.. Flax layout).
    """

    def grouped(k):
        mat = np.asarray(k, np.float64).reshape(-1, k.shape[-1])
        return mat.reshape(mat.shape[0], groups, -1).transpose(1, 0, 2)  # (g, N, cout/g)

    out = np.einsum("gi,gin->gn", mean_x, grouped(kernel)) - np.einsum(
        "gi,gin->gn", mean_xq, grouped(q)
    )
    return out.reshape(-1)


def _geometry(layer: LayerInfo) -> ConvGeometry | None:
    if layer.kind == "dense":
        return None
    return ConvGeometry(
        tuple(layer.kernel_shape[:-2]),
        int(layer.input_shape[-1]),
        tuple(layer.strides),
        tuple(tuple(p) for p in layer.padding),
        tuple(layer.input_dilation),
        tuple(layer.kernel_dilation),
        int(layer.feature_group_count),
    )


def _name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


# --------------------------------------------------------------------------- Flax adapters


class _Target:
    """The float and the partially quantized model of one framework."""

    framework: str
    model: Any
    kwargs: dict
    discover_vars: Any
    float_arg: Any  # what a capturer takes for the float model
    quant_arg: Any  # ... and for the partially quantized model

    def capturer(self, layer: LayerInfo) -> Callable:
        raise NotImplementedError


class _LinenTarget(_Target):
    framework = "linen"

    def __init__(self, model: nn.Module, variables: Any, kwargs: dict):
        if variables is None or not hasattr(variables, "keys") or "params" not in variables:
            raise TypeError(
                "a Linen model needs its variables dict (with 'params'); got "
                f"{type(variables).__name__}"
            )
        self.model, self.kwargs = model, kwargs
        self.float_arg = self.quant_arg = self.discover_vars = variables
        self._apply = jax.jit(lambda v, x: model.apply(v, x, **kwargs))

    def capturer(self, layer):
        return make_input_capturer(self.model, self.float_arg, layer, **self.kwargs)

    def forward(self, batch, fold=None):
        v = self.float_arg if fold is None else bn_fold.fold_linen(self.discover_vars, fold)
        return self._apply(v, batch)

    def fold(self, pairs):
        self.float_arg = self.quant_arg = bn_fold.fold_linen(self.float_arg, pairs)

    def float_kernel(self, layer):
        return jnp.asarray(bn_fold.get_in(self.float_arg, ("params", *layer.path, "kernel")))

    def set_kernel(self, layer, q):
        self.quant_arg = set_kernel(self.quant_arg, layer, q)

    def quant_bias(self, layer):
        return jnp.asarray(bn_fold.get_in(self.quant_arg, ("params", *layer.path, "bias")))

    def set_bias(self, layer, b):
        self.quant_arg = bn_fold.replace_in(
            self.quant_arg, ("params", *layer.path, "bias"), jnp.asarray(b)
        )

    def result(self):
        return self.quant_arg, None


class _NNXTarget(_Target):
    framework = "nnx"
    discover_vars = None

    def __init__(self, model: nnx.Module, kwargs: dict):
        self.kwargs = kwargs
        self.model = nnx.clone(model)  # the float model (folded later); the user's is untouched
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.qmodel = nnx.clone(self.model)  # the partially quantized model
        self._fstate = self._qstate = None  # cached nnx.state of each
        self._graphdef = nnx.graphdef(self.model)
        self._apply = jax.jit(lambda st, x: nnx.merge(self._graphdef, st)(x, **kwargs))

    @property
    def float_arg(self):
        if self._fstate is None:
            self._fstate = nnx.state(self.model)
        return self._fstate

    @property
    def quant_arg(self):
        if self._qstate is None:
            self._qstate = nnx.state(self.qmodel)
        return self._qstate

    def capturer(self, layer):
        return make_input_capturer(self.model, None, layer, **self.kwargs)

    def forward(self, batch, fold=None):
        m = self.model
        if fold is not None:
            m = nnx.clone(self._unfolded)
            bn_fold.fold_nnx(m, fold)
        return self._apply(nnx.state(m), batch)

    def fold(self, pairs):
        self._unfolded = nnx.clone(self.model)
        bn_fold.fold_nnx(self.model, pairs)
        self.qmodel = nnx.clone(self.model)
        self._fstate = self._qstate = None

    def float_kernel(self, layer):
        return bn_fold.module_at(self.model, layer.path).kernel[...]

    def set_kernel(self, layer, q):
        bn_fold.module_at(self.qmodel, layer.path).kernel.set_value(q)
        self._qstate = None

    def quant_bias(self, layer):
        return bn_fold.module_at(self.qmodel, layer.path).bias[...]

    def set_bias(self, layer, b):
        bn_fold.module_at(self.qmodel, layer.path).bias.set_value(jnp.asarray(b))
        self._qstate = None

    def result(self):
        return nnx.to_pure_dict(nnx.state(self.qmodel)), self.qmodel


def _make_target(model: Any, variables: Any, kwargs: dict) -> _Target:
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError(
                "for an NNX model pass variables=None (the model holds its state); "
                f"got {type(variables).__name__}"
            )
        return _NNXTarget(model, kwargs)
    if isinstance(model, nn.Module):
        return _LinenTarget(model, variables, kwargs)
    raise TypeError(
        f"model must be a flax.linen Module or a flax.nnx Module, got {type(model).__name__}"
    )


__all__ = [
    "quantize_params",
    "QuantizeResult",
    "LayerRecord",
    "SummaryTable",
    "dequantize",
    "calibration_batches",
    "Calibration",
    "default_apply_kwargs",
    "bias_shift",
]
