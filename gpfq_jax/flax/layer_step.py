"""One layer of the whole-model driver: accumulate its statistics, quantize, write back.

The layer's inputs come from an iterator of (float input, partially-quantized-model input)
pairs, one per calibration batch: from whole-model runs (the reference driver,
``reference_inputs``) or from one block run on cached block inputs (the frontier driver).
Layers that read the same tensor share one accumulation (``Accumulated``), quantized from
the same statistics.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gpfq_jax.core.general import matrix_layout, quantize_view
from gpfq_jax.core.layer import quantize_from_stats
from gpfq_jax.core.numerics import max_abs
from gpfq_jax.core.sharding import place_batch, replicate
from gpfq_jax.core.stats import LayerStats, StatsAccumulator
from gpfq_jax.flax.calibration import Calibration
from gpfq_jax.flax.results import LayerRecord
from gpfq_jax.flax.rules import LayerPlan
from gpfq_jax.flax.targets import Target
from gpfq_jax.flax.tracing import LayerInfo

Pair = tuple[jax.Array, jax.Array]


def reference_inputs(
    target: Target, layer: LayerInfo, batches: Calibration, changed: bool, mesh: Mesh | None
) -> Iterator[Pair]:
    """The layer's inputs from whole-model runs (float and partially quantized model)."""
    capture = target.capturer(layer)
    float_arg, quant_arg = target.float_arg, target.quant_arg
    if mesh is not None:  # the models on every device, once per layer (not per batch)
        float_arg = replicate(float_arg, mesh)
        quant_arg = replicate(quant_arg, mesh) if changed else float_arg
    for b in batches:
        b = place_batch(b, mesh)
        x = capture(float_arg, b)
        yield x, (capture(quant_arg, b) if changed else x)


@dataclasses.dataclass
class Accumulated:
    """A layer's accumulated statistics, what they cost, and (for bias correction) the mean
    input rows (g, N) of the float and of the quantized model."""

    acc: StatsAccumulator
    capture_seconds: float = 0.0
    capture_first_seconds: float = 0.0
    stats_seconds: float = 0.0
    means: tuple[np.ndarray, np.ndarray] | None = None


def accumulator(
    layer: LayerInfo, kernel: jax.Array | None, *, stats_dtype: Any, patch_fraction: float,
    seed: int, mesh: Mesh | None,
) -> StatsAccumulator:  # fmt: skip
    """The layer's StatsAccumulator. With its float ``kernel`` and when cheaper, per-neuron
    output norms replace F (F = X^T X costs rows x N^2, the norms 2 x rows x N x n); pass
    None for statistics several layers share."""
    view, features = layer.view, layer.features
    use_kernel = kernel is not None and 2 * layer.neurons < features
    mat = None
    if use_kernel:
        mat = kernel if view is None else matrix_layout(kernel, view)  # (..., g*n) columns
    return StatsAccumulator(
        features, layer.geometry, stats_dtype, patch_fraction, seed, mesh=mesh, kernel=mat,
        view=view,
    )  # fmt: skip


def table_statistics(layer: LayerInfo, stats_dtype: Any) -> Accumulated:
    """Statistics for an embedding table (no input data): H = G = F = I, so the output error
    is the weights' relative error ||E - Q||_F / ||E||_F and RTN's step search minimises it."""
    acc = StatsAccumulator(layer.features, None, stats_dtype, view=layer.view)
    eye = jnp.eye(layer.features, dtype=stats_dtype)[None]
    acc.stats = LayerStats(eye, eye, eye, jnp.asarray(layer.features, jnp.int32))
    return Accumulated(acc)


def accumulate(
    acc: StatsAccumulator, inputs: Iterator[Pair], *, changed: bool, input_means: bool
) -> Accumulated:
    """Stream every batch's layer inputs (float and partially quantized) into ``acc``."""
    out = Accumulated(acc)
    sum_x, sum_xq, count = 0.0, 0.0, 0
    while True:
        t0 = time.perf_counter()
        pair = next(inputs, None)
        if pair is None:
            break
        x, xq = jax.block_until_ready(pair)
        t1 = time.perf_counter()
        acc.update(x, xq)
        if input_means:
            rows = acc.rows(x)
            count += rows.shape[0]
            sum_x = sum_x + np.asarray(rows.sum(0), np.float64)
            sum_xq = sum_xq + np.asarray((acc.rows(xq) if changed else rows).sum(0), np.float64)
        jax.block_until_ready(acc.stats)
        out.stats_seconds += time.perf_counter() - t1
        out.capture_seconds += t1 - t0
        out.capture_first_seconds = out.capture_first_seconds or t1 - t0
    if input_means:
        out.means = (sum_x / count, sum_xq / count)
    return out


def check_bias_correction(layer: LayerInfo, bias_correction: bool) -> bool:
    """Whether the layer's bias is corrected; Einsum biases (any layout) are refused."""
    correct = bias_correction and layer.has_bias
    if correct and layer.kind == "einsum":  # its bias need not follow the kernel's axes
        raise NotImplementedError(f"layer {layer.name!r}: bias correction of an Einsum "
                                  "layer is not supported; skip it with a rule")  # fmt: skip
    return correct


def quantize_layer(
    target: Target,
    layer: LayerInfo,
    plan: LayerPlan,
    acc: Accumulated,
    *,
    correct: bool,
    stats_dtype: Any,
    mesh: Mesh | None,
    **quant_kwargs: Any,
) -> LayerRecord:
    """Quantize one layer from its accumulated statistics and write it into the target.

    ``quant_kwargs`` (key, block_size, damp, act_order) go to ``quantize_from_stats``.
    """
    kernel = target.float_kernel(layer)
    view = layer.view
    record = LayerRecord(layer.path, layer.name, layer.kind, tuple(layer.kernel_shape), None)
    record.capture_seconds, record.stats_seconds = acc.capture_seconds, acc.stats_seconds
    record.capture_first_seconds = acc.capture_first_seconds
    record.rows = int(acc.acc.stats.count)
    t0 = time.perf_counter()
    try:
        args = (acc.acc.result(), plan.spec, plan.method)
        if view is None:
            r = quantize_from_stats(kernel, *args, mesh=mesh, **quant_kwargs)
        else:  # general layers: codes and steps in the kernel's own layout
            r = quantize_view(kernel, view, *args, mesh=mesh, **quant_kwargs)
    except (ValueError, TypeError) as e:  # name the layer and, for NaN/Inf, the likely cause
        hint = ""
        if "statistics (" in str(e) and "NaN or Inf" in str(e):
            hint = (f" (the layer's inputs reached {max_abs(acc.acc.stats.hess):.3g} in the "
                    f"statistics: a {jnp.dtype(stats_dtype).name} overflow, or NaN/Inf inputs "
                    "from earlier layers; check the calibration data's scale)")  # fmt: skip
        raise type(e)(f"layer {layer.name!r}: {e}{hint}") from e
    q = jax.block_until_ready(r.values(kernel.dtype))
    record.quant_seconds = time.perf_counter() - t0
    record.result = r
    target.set_kernel(layer, q)
    if correct:
        mat = kernel if view is None else matrix_layout(kernel, view)
        qmat = q if view is None else matrix_layout(q, view)
        shift = bias_shift(*acc.means, mat, qmat, layer.feature_group_count)
        bias = target.quant_bias(layer)
        shift = shift.reshape(bias.shape)  # DenseGeneral: bias (batch, features), g-major
        target.set_bias(layer, (np.asarray(bias, np.float64) + shift).astype(bias.dtype))
        record.bias_shift = jnp.asarray(shift, bias.dtype)
    return record


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


__all__ = [
    "Accumulated",
    "accumulator",
    "accumulate",
    "table_statistics",
    "reference_inputs",
    "quantize_layer",
    "check_bias_correction",
    "bias_shift",
]
