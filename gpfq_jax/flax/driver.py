"""Whole-model driver: quantize every Dense/Conv/DenseGeneral/Einsum layer of a Flax model.

For layer l: run the float model and the model whose layers < l are already quantized on the
same calibration batches, capture layer l's input in both (a jitted prefix of the model that
returns only that input), stream the batches into a ``StatsAccumulator`` (H, G, F), quantize
with ``quantize_from_stats``, write the dequantized kernel (``LayerResult.values``) back
into the quantized model, and go on. Only one batch of one layer's inputs is alive at a time.

The "float model" is the user's model, after BatchNorm folding when ``fold_batchnorm=True``.
Linen and NNX specifics live in ``gpfq_jax.flax.targets``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gpfq_jax.core.alphabets import QuantSpec
from gpfq_jax.core.general import matrix_layout, quantize_view
from gpfq_jax.core.layer import quantize_from_stats
from gpfq_jax.core.numerics import check_fraction, max_abs
from gpfq_jax.core.sharding import replicate, resolve_mesh
from gpfq_jax.core.stats import StatsAccumulator
from gpfq_jax.flax.bn_fold import fold_batchnorms
from gpfq_jax.flax.calibration import Calibration
from gpfq_jax.flax.results import LayerRecord, QuantizeResult
from gpfq_jax.flax.rules import LayerPlan, plan_layers
from gpfq_jax.flax.targets import Target, make_target
from gpfq_jax.flax.tracing import (
    InputShapeError,
    LayerInfo,
    ModelStructureError,
    ModelTrace,
    trace_model,
)


def default_apply_kwargs(model: Any) -> dict:
    """``{"train": False}`` if the model's ``__call__`` takes ``train``, else ``{}``."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


# --------------------------------------------------------------------------- driver


# long: the public entry point; its signature and argument docs are most of its length.
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
    """Quantize every Dense/Conv/DenseGeneral/Einsum layer of ``model``, in forward order (GPFQ
    by default; general layers as the (g, N, n) problems of their ``MatrixView``).

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
        into that layer before quantizing (see ``gpfq_jax.flax.bn_fold``).
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
    _check_options(
        fold_batchnorm=fold_batchnorm, bias_correction=bias_correction, progress=progress,
        act_order=act_order, seed=seed, patch_fraction=patch_fraction, apply_kwargs=apply_kwargs,
    )  # fmt: skip
    _check_stats_dtype(stats_dtype)
    mesh = resolve_mesh(mesh)
    batches = Calibration(calib, batch_size)
    if apply_kwargs is None:
        apply_kwargs = default_apply_kwargs(model)
    target = make_target(model, variables, dict(apply_kwargs))
    trace = _checked_trace(target, batches.first)
    plans = plan_layers([layer.name for layer in trace.layers], rules, spec, method)
    folded = []
    if fold_batchnorm:
        folded = fold_batchnorms(target, trace.bn_follows, trace.layers, plans, batches.first)
    records, skipped = _quantize_layers(
        target, trace.layers, plans, batches, progress=progress,
        key=jax.random.PRNGKey(seed) if key is None else key, seed=seed,
        bias_correction=bias_correction, patch_fraction=patch_fraction,
        stats_dtype=stats_dtype, mesh=mesh, block_size=block_size, damp=damp,
        act_order=act_order,
    )  # fmt: skip
    variables_out, model_out = target.result()
    elapsed = time.perf_counter() - start
    return QuantizeResult(
        variables_out, model_out, records, skipped, folded, target.framework, elapsed
    )


def _quantize_layers(
    target: Target,
    layers: list[LayerInfo],
    plans: list[LayerPlan],
    batches: Calibration,
    *,
    progress: bool,
    key: jax.Array,
    seed: int,
    **layer_kwargs: Any,
) -> tuple[list[LayerRecord], list[str]]:
    """Quantize the planned layers in forward order (a progress bar over layers).

    Layer i gets the PRNG key ``fold_in(key, i)`` and the patch-sampling seed derived from
    ``seed`` and i; ``layer_kwargs`` go to ``_quantize_layer``.
    """
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
                        key=jax.random.fold_in(key, i),
                        seed=(seed * 1_000_003 + i) % 2**31,
                        **layer_kwargs,
                    )  # fmt: skip
                )
            bar.update(1)
    finally:
        bar.close()
    return records, skipped


def _check_options(*, seed: Any, patch_fraction: Any, apply_kwargs: Any, **flags: Any) -> None:
    """Flags take booleans, ``seed`` an integer, ``patch_fraction`` a number in (0, 1]."""
    for name, value in flags.items():
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    check_fraction("patch_fraction", patch_fraction)
    if apply_kwargs is not None and not isinstance(apply_kwargs, dict):
        raise TypeError(f"apply_kwargs must be a dict or None, got {type(apply_kwargs).__name__}")


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


def _checked_trace(target: Target, batch: Any) -> ModelTrace:
    """The model map from one abstract pass; a model that fails on ``batch`` -> ValueError."""
    shape = tuple(batch.shape)
    try:
        return trace_model(target.model, target.discover_vars, batch, **target.kwargs)
    except InputShapeError as e:
        raise ValueError(f"calibration inputs of shape {shape} do not fit the model: {e}") from e
    except (NotImplementedError, ModelStructureError):
        raise
    except Exception as e:  # the model's own failure, re-raised with context
        raise ValueError(
            f"running the model on a calibration batch of shape {shape} (dtype "
            f"{batch.dtype}, apply_kwargs={target.kwargs}) failed; check the "
            f"input shape. {type(e).__name__}: {e}"
        ) from e


def _accumulate(
    target: Target,
    layer: LayerInfo,
    acc: StatsAccumulator,
    batches: Calibration,
    *,
    changed: bool,
    input_means: bool,
    mesh: Mesh | None,
) -> tuple[LayerRecord, tuple[np.ndarray, np.ndarray] | None]:
    """Stream every batch's layer inputs (float and partially quantized) into ``acc``.

    Returns a LayerRecord holding the capture / statistics timings (no result yet) and, with
    ``input_means``, the mean input rows (g, N) of the float and the quantized model (all
    rows, not subsampled) for bias correction.
    """
    capture = target.capturer(layer)
    record = LayerRecord(layer.path, layer.name, layer.kind, tuple(layer.kernel_shape), None)
    sum_x, sum_xq, count = 0.0, 0.0, 0
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
        if input_means:
            rows = acc.rows(x)
            count += rows.shape[0]
            sum_x = sum_x + np.asarray(rows.sum(0), np.float64)
            sum_xq = sum_xq + np.asarray((acc.rows(xq) if changed else rows).sum(0), np.float64)
        jax.block_until_ready(acc.stats)
        record.stats_seconds += time.perf_counter() - t1
        record.capture_seconds += t1 - t0
        record.capture_first_seconds = record.capture_first_seconds or t1 - t0
    record.rows = int(acc.stats.count)
    return record, ((sum_x / count, sum_xq / count) if input_means else None)


def _quantize_layer(
    target: Target,
    layer: LayerInfo,
    plan: LayerPlan,
    batches: Calibration,
    *,
    changed: bool,
    bias_correction: bool,
    seed: int,
    patch_fraction: float,
    stats_dtype: Any,
    mesh: Mesh | None,
    **quant_kwargs: Any,
) -> LayerRecord:
    """Capture, accumulate, quantize and write back one layer.

    ``quant_kwargs`` (key, block_size, damp, act_order) go to ``quantize_from_stats``.
    """
    kernel = target.float_kernel(layer)
    view, features, neurons = layer.view, layer.features, layer.neurons
    mat = kernel if view is None else matrix_layout(kernel, view)  # (..., g*n) column blocks
    # F = X^T X costs rows x N^2; the per-neuron output norms that can replace it (the kernel is
    # known here) cost 2 x rows x N x n: use whichever is cheaper.
    acc = StatsAccumulator(
        features, layer.geometry, stats_dtype, patch_fraction, seed, mesh=mesh,
        kernel=mat if 2 * neurons < features else None, view=view,
    )  # fmt: skip
    correct = bias_correction and layer.has_bias
    if correct and layer.kind == "einsum":  # its bias need not follow the kernel's axes
        raise NotImplementedError(f"layer {layer.name!r}: bias correction of an Einsum "
                                  "layer is not supported; skip it with a rule")  # fmt: skip
    record, means = _accumulate(
        target, layer, acc, batches, changed=changed, input_means=correct, mesh=mesh
    )
    t0 = time.perf_counter()
    try:
        args = (acc.result(), plan.spec, plan.method)
        if view is None:
            r = quantize_from_stats(kernel, *args, mesh=mesh, **quant_kwargs)
        else:  # general layers: codes and steps in the kernel's own layout
            r = quantize_view(kernel, view, *args, mesh=mesh, **quant_kwargs)
    except (ValueError, TypeError) as e:  # name the layer and, for NaN/Inf, the likely cause
        hint = ""
        if "statistics (" in str(e) and "NaN or Inf" in str(e):
            hint = (f" (the layer's inputs reached {max_abs(acc.stats.hess):.3g} in the "
                    f"statistics: a {jnp.dtype(stats_dtype).name} overflow, or NaN/Inf inputs "
                    "from earlier layers; check the calibration data's scale)")  # fmt: skip
        raise type(e)(f"layer {layer.name!r}: {e}{hint}") from e
    q = jax.block_until_ready(r.values(kernel.dtype))
    record.quant_seconds = time.perf_counter() - t0
    record.result = r
    target.set_kernel(layer, q)
    if correct:
        qmat = q if view is None else matrix_layout(q, view)
        shift = bias_shift(*means, mat, qmat, layer.feature_group_count)
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


__all__ = ["quantize_params", "default_apply_kwargs", "bias_shift"]
