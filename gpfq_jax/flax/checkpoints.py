"""Quantized checkpoints: integer codes + scales + the float leaves, with orbax-checkpoint.

Layout of a checkpoint directory ``path``::

    path/arrays/                 orbax PyTreeCheckpointer tree:
                                   {"codes": {"0": ..}, "scales": {"0": ..}, "float": {"0": ..}}
    path/gpfq_quantized.json     metadata: leaf paths, dtypes, layers (spec, offset, ...)

Codes are stored in the smallest signed integer dtype holding the alphabet
(``int_dtype(alphabet, storage=True)``: int4 for up to 16 levels, else int8/int16); orbax
saves jnp.int4 on CPU (tensorstore zarr with zstd, so on disk a code costs about its
entropy). Leaves of the variables tree are addressed by their key path (str and int keys
kept as such in JSON); typed PRNG keys (NNX ``Rngs``) are stored as key data plus their
implementation name.

Saving is atomic: everything is written into a temporary sibling directory that is renamed to
``path`` only when complete, so an interrupted save leaves no checkpoint at ``path`` and never
touches an existing one (``overwrite=True`` swaps it out only after the new one is complete).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.core import FrozenDict, unfreeze

from gpfq_jax.atomic import atomic_path, write_text_atomic
from gpfq_jax.core.alphabets import dequantize, int_dtype
from gpfq_jax.flax.results import QuantizeResult

FORMAT = "gpfq_jax.quantized/1"
META = "gpfq_quantized.json"
ARRAYS = "arrays"


# --------------------------------------------------------------------------- tree helpers


def _key(k: Any) -> Any:
    """A jax key-path entry -> str or int."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    raise TypeError(f"unsupported key path entry {k!r}")


def _flatten(tree: Any) -> list[tuple[tuple, Any]]:
    """(key path, leaf) pairs of a nested mapping of arrays (FrozenDict and dict alike)."""
    if isinstance(tree, FrozenDict):
        tree = unfreeze(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in leaves]


def _unflatten(pairs: list[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for path, leaf in pairs:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _kernel_path(res_framework: str, layer_path: tuple) -> tuple:
    return (
        ("params", *layer_path, "kernel") if res_framework == "linen" else (*layer_path, "kernel")
    )


def _is_key(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


# --------------------------------------------------------------------------- save / load


def save_quantized(
    path: str | os.PathLike, res: QuantizeResult, *, overwrite: bool = False
) -> Path:
    """Write ``res`` (codes, scales, offsets, spec and every non-quantized leaf) to ``path``.

    Refuses to overwrite an existing ``path`` unless ``overwrite=True``. Atomic (see module
    docstring). Returns the absolute path.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    kernels = {_kernel_path(res.framework, r.path): r for r in res.layers}
    floats, codes, scales, leaves, layers = {}, {}, {}, [], []
    for p, leaf in _flatten(res.variables):
        if p in kernels:
            continue
        entry = {"path": list(p), "index": len(floats)}
        if _is_key(leaf):
            entry["prng_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        floats[str(len(floats))] = jnp.asarray(leaf)
        leaves.append(entry)
    for i, (p, r) in enumerate(kernels.items()):
        code_dtype = int_dtype(r.spec.alphabet, storage=True)
        codes[str(i)] = jnp.asarray(r.codes).astype(code_dtype)
        scales[str(i)] = jnp.asarray(r.scale)
        layers.append(
            {
                "path": list(p),
                "name": r.name,
                "kind": r.kind,
                "shape": list(r.shape),
                "dtype": jnp.dtype(r.scale.dtype).name,
                "code_dtype": code_dtype.name,
                "offset": float(r.offset),
                "spec": r.spec.to_dict(),
                "method": r.method,
                "levels": r.levels,
                "storage_bits": r.storage_bits,
                "rel_error": float(r.rel_error),
                "c": np.asarray(r.c, np.float64).tolist(),
            }
        )
    meta = {
        "format": FORMAT,
        "framework": res.framework,
        "leaves": leaves,
        "layers": layers,
        "skipped": list(res.skipped),
        "folded": [list(f) for f in res.folded],
    }

    with atomic_path(path, directory=True) as tmp:
        _write_arrays(tmp / ARRAYS, {"codes": codes, "scales": scales, "float": floats})
        write_text_atomic(tmp / META, json.dumps(meta, indent=1))
    return path


def _write_arrays(path: Path, tree: dict) -> None:
    # Empty subtrees are not saved by orbax; keep the three groups present with a marker.
    tree = {k: (v if v else {"_": jnp.zeros((), jnp.int8)}) for k, v in tree.items()}
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(path, tree)


def _restore(path: Path) -> dict:
    """Restore an orbax tree onto the default device (arrays as saved)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        return ocp.PyTreeCheckpointer().restore(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a quantized checkpoint."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a gpfq_jax quantized checkpoint (no {META})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_quantized(path: str | os.PathLike, model: nnx.Module | None = None) -> Any:
    """Variables with dequantized kernels, bit-identical to the saved ``res.variables``.

    Linen checkpoints: the variables dict for ``model.apply``. NNX checkpoints: the pure-dict
    state; pass the (float) ``model`` to get a quantized NNX copy instead (the model is not
    modified).
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    tree = _restore(path / ARRAYS)
    pairs = []
    for e in meta["leaves"]:
        leaf = jnp.asarray(tree["float"][str(e["index"])])
        if "prng_impl" in e:
            leaf = jax.random.wrap_key_data(leaf, impl=e["prng_impl"])
        pairs.append((tuple(e["path"]), leaf))
    for i, lay in enumerate(meta["layers"]):
        codes = jnp.asarray(tree["codes"][str(i)])
        kernel = dequantize(codes, tree["scales"][str(i)], lay["offset"], lay["dtype"])
        pairs.append((tuple(lay["path"]), kernel))
    variables = _unflatten(pairs)
    if model is None:
        return variables
    if meta["framework"] != "nnx":
        raise TypeError("model= is for NNX checkpoints; apply Linen variables with model.apply")
    copy = nnx.clone(model)
    state = nnx.state(copy)
    nnx.replace_by_pure_dict(state, variables)
    nnx.update(copy, state)
    return copy


# --------------------------------------------------------------------------- sizes


def _dir_bytes(path: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _nbytes(a: Any) -> int:
    if _is_key(a):
        a = jax.random.key_data(a)
    a = np.asarray(a) if not hasattr(a, "dtype") else a
    return math.ceil(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize)


def _float_bytes(float_variables: Any) -> tuple[int, int | None]:
    """(in-memory bytes, on-disk bytes or None) of a float tree, NNX model or checkpoint dir."""
    if isinstance(float_variables, str | os.PathLike):
        p = Path(float_variables)
        tree = _restore(p)
        return sum(_nbytes(a) for _, a in _flatten(tree)), _dir_bytes(p)
    if isinstance(float_variables, nnx.Module):
        float_variables = nnx.to_pure_dict(nnx.state(float_variables))
    return sum(_nbytes(a) for _, a in _flatten(float_variables)), None


def size_report(res_or_path: QuantizeResult | str | os.PathLike, float_variables: Any) -> dict:
    """Float vs quantized sizes in bytes.

    float_variables: the float variables tree, NNX model, or a float orbax checkpoint directory
    (then its disk size is reported too). In memory, codes count at their storage bits
    (``ceil(n * storage_bits / 8)`` per layer), plus scales and all non-quantized leaves.
    On disk: the checkpoint directory's size when ``res_or_path`` is a path.
    """
    if isinstance(res_or_path, QuantizeResult):
        res = res_or_path
        kernels = {_kernel_path(res.framework, r.path) for r in res.layers}
        other = sum(_nbytes(a) for p, a in _flatten(res.variables) if p not in kernels)
        layer_sizes = [
            (r.name, int(np.prod(r.shape)), r.storage_bits, _nbytes(r.scale)) for r in res.layers
        ]
        disk = None
    else:
        path = Path(res_or_path)
        meta = read_metadata(path)
        tree = _restore(path / ARRAYS)
        other = sum(_nbytes(a) for k, a in tree["float"].items() if k != "_")
        layer_sizes = [
            (
                lay["name"],
                int(np.prod(lay["shape"])),
                lay["storage_bits"],
                _nbytes(tree["scales"][str(i)]),
            )
            for i, lay in enumerate(meta["layers"])
        ]
        disk = _dir_bytes(path)
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


__all__ = ["save_quantized", "load_quantized", "size_report", "read_metadata"]
