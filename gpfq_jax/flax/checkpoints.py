"""Quantized checkpoints: integer codes + scales + the float leaves, with orbax-checkpoint.

Layout of a checkpoint directory ``path``::

    path/arrays/                 orbax PyTreeCheckpointer tree:
                                   {"codes": {"0": ..}, "scales": {"0": ..}, "float": {"0": ..}}
    path/gpfq_quantized.json     metadata: leaf paths, dtypes, layers (spec, offset, ...)

Codes are stored in the smallest signed integer dtype holding the alphabet
(``storage_layout``: int4 for up to 16 levels, else int8/int16, shifted into the signed range
for the "asym" grid's unsigned codes); orbax
saves jnp.int4 on CPU (tensorstore zarr with zstd, so on disk a code costs about its
entropy). Leaves of the variables tree are addressed by their key path (str and int keys
kept as such in JSON); typed PRNG keys (NNX ``Rngs``) are stored as key data plus their
implementation name.

Saving is atomic: everything is written into a temporary sibling directory that is renamed to
``path`` only when complete, so an interrupted save leaves no checkpoint at ``path`` and never
touches an existing one (``overwrite=True`` swaps it out only after the new one is complete).
"""

from __future__ import annotations

import dataclasses
import json
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

from gpfq_jax.atomic import atomic_path, recover_interrupted, write_text_atomic
from gpfq_jax.core.code_dtypes import storage_layout
from gpfq_jax.core.patches import MatrixView
from gpfq_jax.core.result import kernel_values
from gpfq_jax.flax.checkpoint_format import (
    ARRAYS,
    META,
    check_arrays,
    read_metadata,
    replaceable,
    seal,
)
from gpfq_jax.flax.paths import param_name
from gpfq_jax.flax.results import QuantizeResult

# --------------------------------------------------------------------------- tree helpers


def _key(k: Any) -> Any:
    """A jax key-path entry -> str or int."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    raise TypeError(f"unsupported key path entry {k!r}")


def flatten_tree(tree: Any) -> list[tuple[tuple, Any]]:
    """(key path, leaf) pairs of a nested mapping of arrays (FrozenDict and dict alike)."""
    if isinstance(tree, FrozenDict):
        tree = unfreeze(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(_key(k) for k in path), leaf) for path, leaf in leaves]


def unflatten_tree(pairs: list[tuple[tuple, Any]]) -> dict:
    """The nested dict of (key path, leaf) pairs (``flatten_tree``'s inverse for dicts)."""
    out: dict = {}
    for path, leaf in pairs:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def kernel_path(res_framework: str, layer_path: tuple, kind: str = "dense") -> tuple:
    """Where a layer's weight is in the result's variables (Linen: under "params")."""
    name = param_name(kind)
    return ("params", *layer_path, name) if res_framework == "linen" else (*layer_path, name)


def view_from_dict(d: dict | None) -> MatrixView | None:
    """The MatrixView of a layer entry's "view" (lists of ints), or None."""
    return None if d is None else MatrixView(**{k: tuple(v) for k, v in d.items()})


def is_prng_key(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


# --------------------------------------------------------------------------- save / load


def save_quantized(
    path: str | os.PathLike, res: QuantizeResult, *, overwrite: bool = False
) -> Path:
    """Write ``res`` (codes, scales, offsets, spec and every non-quantized leaf) to ``path``.

    Refuses to overwrite an existing ``path`` unless ``overwrite=True``. Atomic (see module
    docstring). Returns the absolute path.
    """
    if not isinstance(res, QuantizeResult):
        raise TypeError(
            f"res must be the QuantizeResult of quantize_params, got {type(res).__name__}"
        )
    path = Path(path).absolute()
    _check_destination(path, overwrite)
    kernels = {kernel_path(res.framework, r.path, r.kind): r for r in res.layers}
    floats, leaves = _float_leaves(res.variables, kernels)
    codes, scales, zeros, layers = {}, {}, {}, []
    for i, (p, r) in enumerate(kernels.items()):
        code_dtype, shift = storage_layout(r.spec.alphabet)
        codes[str(i)] = (jnp.asarray(r.codes, jnp.int32) + shift).astype(code_dtype)
        scales[str(i)] = jnp.asarray(r.scale)
        if r.result.zero_point is not None:  # integers in the code range: stored like codes
            zeros[str(i)] = (jnp.asarray(r.result.zero_point) + shift).astype(code_dtype)
        layers.append(_layer_entry(p, r, code_dtype, shift))
    arrays = {"codes": codes, "scales": scales, "zeros": zeros, "float": floats}
    meta = {
        "framework": res.framework,
        "leaves": leaves,
        "layers": layers,
        "skipped": list(res.skipped),
        "folded": [list(f) for f in res.folded],
    }

    meta = seal(meta, arrays)
    with atomic_path(path, directory=True) as tmp:
        _write_arrays(tmp / ARRAYS, arrays)
        write_text_atomic(tmp / META, json.dumps(meta, indent=1))
    return path


def _float_leaves(variables: Any, kernels: dict) -> tuple[dict, list[dict]]:
    """The non-quantized leaves (arrays by index) and their metadata entries; typed PRNG keys
    are stored as key data plus their implementation name."""
    floats, leaves = {}, []
    for p, leaf in flatten_tree(variables):
        if p in kernels:
            continue
        entry = {"path": list(p), "index": len(floats)}
        if is_prng_key(leaf):
            entry["prng_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        floats[str(len(floats))] = jnp.asarray(leaf)
        leaves.append(entry)
    return floats, leaves


def _layer_entry(p: tuple, r: Any, code_dtype: Any, shift: int) -> dict:
    """One quantized layer's metadata (a LayerRecord ``r`` at kernel path ``p``)."""
    return {
        "path": list(p),
        "name": r.name,
        "kind": r.kind,
        "shape": list(r.shape),
        "dtype": jnp.dtype(r.scale.dtype).name,
        "code_dtype": jnp.dtype(code_dtype).name,
        "code_shift": shift,
        "offset": float(r.offset),
        "group_size": r.result.group_size,
        "view": None if r.result.view is None else dataclasses.asdict(r.result.view),
        "spec": r.spec.to_dict(),
        "method": r.method,
        "levels": r.levels,
        "storage_bits": r.storage_bits,
        "rel_error": float(r.rel_error),
        "c": np.asarray(r.c, np.float64).tolist(),
    }


def _check_destination(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything but a gpfq_jax checkpoint (and that only with overwrite)."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    why = replaceable(path)
    if why:
        raise FileExistsError(
            f"{path} exists and is not a gpfq_jax quantized checkpoint ({why}); overwrite=True "
            "only ever replaces a checkpoint written by save_quantized, so nothing was written"
        )


def _write_arrays(path: Path, tree: dict) -> None:
    # Empty subtrees are not saved by orbax; keep the three groups present with a marker.
    tree = {k: (v if v else {"_": jnp.zeros((), jnp.int8)}) for k, v in tree.items()}
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(path, tree)


def _stored_ints(tree: dict, group: str, i: int, shift: int) -> jax.Array | None:
    """Layer ``i``'s codes or zero points as saved, with the storage shift undone (int32)."""
    a = tree[group].get(str(i))
    return None if a is None else jnp.asarray(a).astype(jnp.int32) - shift


def restore_orbax(path: Path) -> dict:
    """An orbax PyTree checkpoint's tree (arrays as saved, on the default device)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        return ocp.PyTreeCheckpointer().restore(Path(path).absolute())


def restore_arrays(path: Path) -> dict:
    """The arrays of the quantized checkpoint at ``path`` (not yet checked: ``check_arrays``)."""
    if not (path / ARRAYS).is_dir():
        raise FileNotFoundError(f"{path}: the arrays folder {ARRAYS}/ is missing")
    try:
        return restore_orbax(path / ARRAYS)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path / ARRAYS}: cannot read the saved arrays ({type(e).__name__}: "
                         f"{e}); the checkpoint is corrupt") from e  # fmt: skip


def load_quantized(path: str | os.PathLike, model: nnx.Module | None = None) -> Any:
    """Variables with dequantized kernels, bit-identical to the saved ``res.variables``.

    Linen checkpoints: the variables dict for ``model.apply``. NNX checkpoints: the pure-dict
    state; pass the (float) ``model`` to get a quantized NNX copy instead (the model is not
    modified).
    """
    path = Path(path).absolute()
    recover_interrupted(path)
    meta = read_metadata(path)
    tree = restore_arrays(path)
    check_arrays(path, meta, tree)
    pairs = []
    for e in meta["leaves"]:
        leaf = jnp.asarray(tree["float"][str(e["index"])])
        if "prng_impl" in e:
            leaf = jax.random.wrap_key_data(leaf, impl=e["prng_impl"])
        pairs.append((tuple(e["path"]), leaf))
    for i, lay in enumerate(meta["layers"]):
        codes = _stored_ints(tree, "codes", i, lay["code_shift"])
        zero_point = _stored_ints(tree, "zeros", i, lay["code_shift"])
        kernel = kernel_values(
            codes, tree["scales"][str(i)], lay["offset"], group_size=lay["group_size"],
            zero_point=None if zero_point is None else zero_point.astype(lay["dtype"]),
            dtype=lay["dtype"], view=view_from_dict(lay["view"]),
        )  # fmt: skip
        pairs.append((tuple(lay["path"]), kernel))
    variables = unflatten_tree(pairs)
    if model is None:
        return variables
    if meta["framework"] != "nnx":
        raise TypeError("model= is for NNX checkpoints; apply Linen variables with model.apply")
    copy = nnx.clone(model)
    state = nnx.state(copy)
    nnx.replace_by_pure_dict(state, variables)
    nnx.update(copy, state)
    return copy


__all__ = [
    "save_quantized",
    "load_quantized",
    "read_metadata",
    "restore_arrays",
    "restore_orbax",
    "flatten_tree",
    "kernel_path",
    "is_prng_key",
]
