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

import dataclasses
import inspect
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gpfq_jax.core.alphabets import QuantSpec
from gpfq_jax.core.numerics import check_fraction
from gpfq_jax.core.sharding import resolve_mesh
from gpfq_jax.flax.activation_cache import ActivationCache
from gpfq_jax.flax.bit_allocation import DEFAULT_CANDIDATES, allocate_for_plans, check_budget
from gpfq_jax.flax.blocks import find_blocks
from gpfq_jax.flax.bn_fold import fold_batchnorms
from gpfq_jax.flax.budget_fisher import check_fisher
from gpfq_jax.flax.calibration import Calibration
from gpfq_jax.flax.results import QuantizeResult
from gpfq_jax.flax.resume import ResumeStore, run_fingerprint
from gpfq_jax.flax.rules import plan_layers
from gpfq_jax.flax.schedule import LayerWalk, RunOptions
from gpfq_jax.flax.targets import Target, make_target
from gpfq_jax.flax.tracing import InputShapeError, ModelStructureError, ModelTrace, trace_model


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
    blocks: str | Sequence[str] | None = "auto",
    shared_stats: bool = True,
    cache_bytes: int = 2**31,
    resume_dir: str | os.PathLike | None = None,
    budget_bits: float | None = None,
    budget_candidates: Sequence[int] = DEFAULT_CANDIDATES,
    budget_fisher: Any = None,
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
      spec, method: default QuantSpec and method ("gpfq", "rtn", "gptq", "qronos") for every layer.
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
      blocks: how layers get their inputs. "auto" (default): repeated sibling submodules
        (``layers_0``, ``layers_1``, ... or NNX list items) that form a chain (each block's
        first argument is the previous block's output; see ``gpfq_jax.flax.blocks``) are run
        one at a time from cached block inputs, so the forward work grows linearly with depth;
        layers outside blocks, or every layer when none are found, use whole-model runs.
        None: whole-model runs for every layer (the reference driver). A list of regex
        patterns fully matched against module names ("layers_\\d+", "encoder/block_\\d+"): those
        modules are the blocks (BlockStructureError if they do not form a chain).
      shared_stats: layers that read the same tensor (q, k, v; gate, up) accumulate their
        statistics once and are quantized from them (the codes equal those of separate
        accumulation). False accumulates per layer.
      cache_bytes: host memory budget of the cached block inputs (both streams); arrays
        above it are written to disk (``resume_dir``/spill, or a temporary directory).
      resume_dir: a directory to make the run resumable: every finished layer and the block
        inputs are written there atomically, and a rerun with the same arguments continues
        after the last finished layer with the same result (see ``gpfq_jax.flax.resume``).
      budget_bits: an average bits-per-weight budget over the quantized layers (codes, steps
        and zero points, as ``size_report`` counts them): each layer's bits are chosen from
        ``budget_candidates`` to minimise the summed ``rel_error ** 2`` from float-model
        statistics (``gpfq_jax.flax.bit_allocation``), then the run uses them; the choice is
        ``result.bit_allocation``. Rules may not fix bits then. None: the spec's bits.
      budget_fisher: with ``budget_bits``, the diagonal Fisher of a loss (a pytree shaped like
        the params: Linen ``variables["params"]``, NNX ``nnx.to_pure_dict(nnx.state(model))``;
        e.g. from ``gpfq_jax.core.fisher.fisher_diagonal``): each candidate's error is then the
        loss increase it predicts, ``1/2 sum F (Q - W)^2``, which weighs a layer by how much of
        its error reaches the loss (objective "fisher"). None: ``rel_error ** 2``.
    Returns: QuantizeResult (``driver`` says how it ran: blocks, shared statistics, compiles).
    """
    start = time.perf_counter()
    _check_options(
        fold_batchnorm=fold_batchnorm, bias_correction=bias_correction, progress=progress,
        act_order=act_order, seed=seed, patch_fraction=patch_fraction, apply_kwargs=apply_kwargs,
        shared_stats=shared_stats,
    )  # fmt: skip
    _check_stats_dtype(stats_dtype)
    _check_run_layout(blocks, cache_bytes, resume_dir)
    if budget_bits is not None:
        budget = check_budget(budget_bits, budget_candidates, rules)
        check_fisher(budget_fisher, fold_batchnorm)
    elif budget_fisher is not None:
        raise ValueError("budget_fisher weighs the bit allocation's errors; it needs budget_bits")
    mesh = resolve_mesh(mesh)
    batches = Calibration(calib, batch_size)
    if apply_kwargs is None:
        apply_kwargs = default_apply_kwargs(model)
    target = make_target(model, variables, dict(apply_kwargs))
    trace = _checked_trace(target, batches.first)
    names, kinds = [lay.name for lay in trace.layers], [lay.kind for lay in trace.layers]
    plans = plan_layers(names, rules, spec, method, kinds)
    folded = []
    if fold_batchnorm:
        folded = fold_batchnorms(target, trace.bn_follows, trace.layers, plans, batches.first)
    found, note = find_blocks(target.model, target.discover_vars, batches.first, target.kwargs,
                              trace.layers, blocks)  # fmt: skip
    options = RunOptions(
        key=jax.random.PRNGKey(seed) if key is None else key, seed=seed,
        bias_correction=bias_correction, patch_fraction=patch_fraction,
        stats_dtype=stats_dtype, mesh=mesh, block_size=block_size, damp=damp,
        act_order=act_order, shared_stats=shared_stats, progress=progress,
    )  # fmt: skip
    allocation = None
    if budget_bits is not None:
        allocation = allocate_for_plans(target, trace.layers, plans, found, batches, options,
                                        cache_bytes, *budget, budget_fisher)  # fmt: skip
        plans = plan_layers(names, allocation.rules(rules), spec, method, kinds)
    store = None
    if resume_dir is not None:
        parts = _fingerprint_parts(target, trace, plans, found, batches, options, fold_batchnorm)
        store = ResumeStore(resume_dir, run_fingerprint(parts))
    spill = None if resume_dir is None else Path(resume_dir) / "spill"
    walk = LayerWalk(target, trace.layers, plans, found, batches, options,
                     ActivationCache(cache_bytes, spill), store)  # fmt: skip
    records, skipped, report = walk.run()
    report.note = note
    variables_out, model_out = target.result()
    elapsed = time.perf_counter() - start
    return QuantizeResult(variables_out, model_out, records, skipped, folded, target.framework,
                          elapsed, report, bit_allocation=allocation)  # fmt: skip


def _fingerprint_parts(target, trace, plans, blocks, batches, options, folded) -> dict:
    """What a resumed run must share with the saved one (``run_fingerprint`` hashes it)."""
    opts = dataclasses.asdict(options)
    opts.pop("progress")
    opts["key"] = np.asarray(jax.random.key_data(options.key) if jnp.issubdtype(
        options.key.dtype, jax.dtypes.prng_key) else options.key)  # fmt: skip
    opts["stats_dtype"] = jnp.dtype(options.stats_dtype).name
    opts["mesh"] = None if options.mesh is None else options.mesh.size
    return {
        "layers": [(lay.name, lay.kind, lay.kernel_shape) for lay in trace.layers],
        "plans": [(p.skip, p.spec.to_dict(), p.method) for p in plans],
        "blocks": [b.name for b in blocks],
        "options": opts,
        "fold_batchnorm": folded,
        "calibration": [np.asarray(b) for b in batches],  # hashed by their bytes
        "weights": jax.tree.leaves(target.float_arg),
        "apply_kwargs": repr(sorted(target.kwargs.items())),
    }


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


def _check_run_layout(blocks: Any, cache_bytes: Any, resume_dir: Any) -> None:
    """``blocks``: "auto", None or a list of pattern strings; ``cache_bytes`` an int >= 0;
    ``resume_dir`` None or a path that is not a file."""
    if not (blocks is None or blocks == "auto") and (
        isinstance(blocks, str) or not isinstance(blocks, list | tuple)
        or not all(isinstance(p, str) for p in blocks)
    ):  # fmt: skip
        raise TypeError(f"blocks must be 'auto', None or a list of regex strings, got {blocks!r}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int | np.integer):
        raise TypeError(f"cache_bytes must be an integer number of bytes, got {cache_bytes!r}")
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    if resume_dir is not None:
        if not isinstance(resume_dir, str | os.PathLike):
            raise TypeError(f"resume_dir must be a path or None, got {type(resume_dir).__name__}")
        if Path(resume_dir).exists() and not Path(resume_dir).is_dir():
            raise ValueError(f"resume_dir {resume_dir} is a file, not a directory")


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


__all__ = ["quantize_params", "default_apply_kwargs"]
