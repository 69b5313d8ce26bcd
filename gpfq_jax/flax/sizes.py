"""Sizes of a quantized model against its float model: in memory (codes at their storage bits)
and on disk."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpfq_jax.atomic import recover_interrupted
from gpfq_jax.flax.checkpoint_format import check_arrays, read_metadata
from gpfq_jax.flax.checkpoints import (
    flatten_tree,
    is_prng_key,
    kernel_path,
    restore_arrays,
    restore_orbax,
)
from gpfq_jax.flax.results import QuantizeResult


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under ``path`` (a checkpoint directory's size on disk)."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _nbytes(a: Any) -> int:
    if is_prng_key(a):
        a = jax.random.key_data(a)
    a = np.asarray(a) if not hasattr(a, "dtype") else a
    return math.ceil(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize)


def _float_bytes(float_variables: Any) -> tuple[int, int | None]:
    """(in-memory bytes, on-disk bytes or None) of a float tree, NNX model or checkpoint dir."""
    if isinstance(float_variables, str | os.PathLike):
        p = Path(float_variables).absolute()
        tree = restore_orbax(p)
        return sum(_nbytes(a) for _, a in flatten_tree(tree)), directory_bytes(p)
    if isinstance(float_variables, nnx.Module):
        float_variables = nnx.to_pure_dict(nnx.state(float_variables))
    return sum(_nbytes(a) for _, a in flatten_tree(float_variables)), None


def _step_bytes(step: Any, zero_point: Any, storage_bits: int) -> int:
    """Bytes of a layer's steps plus its zero points (asym grid; stored at the codes' bits)."""
    zeros = 0 if zero_point is None else math.ceil(np.size(zero_point) * storage_bits / 8)
    return _nbytes(step) + zeros


def layer_storage_bytes(params: int, storage_bits: int, step: Any, zero_point: Any) -> int:
    """A quantized layer's bytes as ``size_report`` counts them: ``params`` codes at
    ``storage_bits``, its steps, and the asym grid's zero points at the codes' bits."""
    return math.ceil(params * storage_bits / 8) + _step_bytes(step, zero_point, storage_bits)


def _result_sizes(res: QuantizeResult) -> tuple[int, list[tuple]]:
    """(bytes of the other leaves, per layer (name, weights, storage bits, step bytes))."""
    kernels = {kernel_path(res.framework, r.path, r.kind) for r in res.layers}
    other = sum(_nbytes(a) for p, a in flatten_tree(res.variables) if p not in kernels)
    layers = [
        (r.name, int(np.prod(r.shape)), r.storage_bits,
         _step_bytes(r.scale, r.result.zero_point, r.storage_bits))
        for r in res.layers
    ]  # fmt: skip
    return other, layers


def _checkpoint_sizes(path: Path) -> tuple[int, list[tuple]]:
    """``_result_sizes`` of a saved checkpoint (read and checked)."""
    recover_interrupted(path)
    meta = read_metadata(path)
    tree = restore_arrays(path)
    check_arrays(path, meta, tree)
    other = sum(_nbytes(a) for k, a in tree["float"].items() if k != "_")
    layers = [
        (lay["name"], int(np.prod(lay["shape"])), lay["storage_bits"],
         _step_bytes(tree["scales"][str(i)], tree["zeros"].get(str(i)), lay["storage_bits"]))
        for i, lay in enumerate(meta["layers"])
    ]  # fmt: skip
    return other, layers


def size_report(res_or_path: QuantizeResult | str | os.PathLike, float_variables: Any) -> dict:
    """Float vs quantized sizes in bytes.

    float_variables: the float variables tree, NNX model, or a float orbax checkpoint directory
    (then its disk size is reported too). In memory, codes count at their storage bits
    (``ceil(n * storage_bits / 8)`` per layer), plus steps (and the asym grid's zero points;
    one per channel, or per group of ``group_size`` inputs) and all non-quantized leaves.
    On disk: the checkpoint directory's size when ``res_or_path`` is a path.
    """
    if isinstance(res_or_path, QuantizeResult):
        other, layer_sizes, disk = *_result_sizes(res_or_path), None
    else:
        path = Path(res_or_path).absolute()
        other, layer_sizes = _checkpoint_sizes(path)
        disk = directory_bytes(path)
    codes = sum(math.ceil(n * bits / 8) for _, n, bits, _ in layer_sizes)
    scales = sum(s for *_, s in layer_sizes)
    float_mem, float_disk = _float_bytes(float_variables)
    quant_mem = codes + scales + other
    return {
        "float_bytes": float_mem,
        "quantized_bytes": quant_mem,
        "codes_bytes": codes,
        "scales_bytes": scales,
        "other_bytes": other,
        "ratio": float_mem / max(quant_mem, 1),
        "float_disk_bytes": float_disk,
        "quantized_disk_bytes": disk,
        "layers": [
            {
                "layer": n,
                "params": k,
                "storage_bits": b,
                "codes_bytes": math.ceil(k * b / 8),
                "scale_bytes": s,
            }
            for n, k, b, s in layer_sizes
        ],
    }


__all__ = ["size_report"]
