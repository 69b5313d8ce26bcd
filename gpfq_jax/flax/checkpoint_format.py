"""The quantized checkpoint's metadata: format version, structure, checksums, validation.

``gpfq_quantized.json`` records the format version, the framework, the variables tree's
non-quantized leaves and the quantized layers (path, shape, dtypes, offset, spec, ...), a
SHA-256 of every array written, and a SHA-256 of the metadata itself (``meta_sha256``, over
the canonical JSON of everything else). Reading checks all of it and names the file and the
problem: truncated or edited metadata, a missing or changed array, a shape or dtype that does
not match the layer it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "gpfq_jax.quantized/3"
META = "gpfq_quantized.json"
ARRAYS = "arrays"
GROUPS = ("codes", "scales", "zeros", "float")  # the subtrees of ARRAYS

_LAYER_KEYS = {
    "path": list, "name": str, "kind": str, "shape": list, "dtype": str, "code_dtype": str,
    "offset": (int, float), "spec": dict, "method": str, "levels": int, "storage_bits": int,
    "code_shift": int, "group_size": (int, type(None)), "view": (dict, type(None)),
}  # fmt: skip
_LEAF_KEYS = {"path": list, "index": int}


def digest(array: Any) -> str:
    """SHA-256 of an array's dtype, shape and bytes (int4 arrays: one byte per code)."""
    a = np.asarray(array)
    h = hashlib.sha256(f"{a.dtype.name}{tuple(a.shape)}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal(meta: dict, arrays: dict[str, dict[str, Any]]) -> dict:
    """``meta`` with the format, each array's checksum and the metadata's own checksum."""
    sums = {g: {k: digest(a) for k, a in arrays[g].items()} for g in GROUPS}
    out = {"format": FORMAT, **meta, "checksums": sums}
    out["meta_sha256"] = _meta_digest(out)
    return out


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def _check_entries(meta_path: Path, entries: Any, keys: dict, what: str) -> None:
    if not isinstance(entries, list):
        raise _fail(meta_path, f"'{what}' must be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise _fail(meta_path, f"{what}[{i}] must be an object")
        for key, typ in keys.items():
            if key not in e:
                raise _fail(meta_path, f"{what}[{i}] has no '{key}'")
            if not isinstance(e[key], typ) or isinstance(e[key], bool):
                raise _fail(meta_path, f"{what}[{i}]['{key}'] has the wrong type")


def _check_structure(meta_path: Path, meta: Any) -> None:
    if not isinstance(meta, dict):
        raise _fail(meta_path, "metadata must be a JSON object")
    if meta.get("format") != FORMAT:
        raise _fail(meta_path, f"unknown checkpoint format {meta.get('format')!r} "
                               f"(this version reads {FORMAT!r})")  # fmt: skip
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise _fail(meta_path, "metadata checksum mismatch: the file was edited or corrupted "
                               "after it was written")  # fmt: skip
    if meta.get("framework") not in ("linen", "nnx"):
        raise _fail(meta_path, f"unknown framework {meta.get('framework')!r}")
    _check_entries(meta_path, meta.get("leaves"), _LEAF_KEYS, "leaves")
    _check_entries(meta_path, meta.get("layers"), _LAYER_KEYS, "layers")
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or any(not isinstance(sums.get(g), dict) for g in GROUPS):
        raise _fail(meta_path, "'checksums' is missing or malformed")


def read_metadata(path: str | os.PathLike) -> dict:
    """The validated metadata of the quantized checkpoint at ``path``.

    FileNotFoundError if ``path`` holds no checkpoint; ValueError naming the file and the
    problem if the metadata is unreadable, of another format, edited or malformed.
    """
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a gpfq_jax quantized checkpoint (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(meta_path, f"metadata is not valid JSON ({e}); the checkpoint is corrupt "
                               "or its save was interrupted") from e  # fmt: skip
    _check_structure(meta_path, meta)
    return meta


def check_arrays(path: str | os.PathLike, meta: dict, tree: dict) -> None:
    """Check the restored ``tree`` against ``meta``: every array present, with the recorded
    checksum, and each layer's codes of its shape and code dtype. ValueError names the array."""
    where = Path(path) / ARRAYS
    for group in GROUPS:
        expected = meta["checksums"][group]
        got = tree.get(group, {})
        for key, want in expected.items():
            if key not in got:
                raise _fail(where, f"array {group}/{key} is missing")
            if digest(got[key]) != want:
                raise _fail(where, f"array {group}/{key} does not match its checksum (changed "
                                   "or corrupted after it was written)")  # fmt: skip
    for i, layer in enumerate(meta["layers"]):
        codes = tree["codes"][str(i)]
        if list(codes.shape) != layer["shape"] or np.dtype(codes.dtype).name != layer["code_dtype"]:
            raise _fail(where, f"codes of layer {layer['name']!r} are {codes.dtype}"
                               f"{tuple(codes.shape)}, the metadata says "
                               f"{layer['code_dtype']}{tuple(layer['shape'])}")  # fmt: skip
    leaf_indices = {str(e["index"]) for e in meta["leaves"]}
    if leaf_indices != set(expected_keys(meta, "float")):
        raise _fail(where, "the metadata's leaves and the saved float arrays differ")


def expected_keys(meta: dict, group: str) -> list[str]:
    """The array keys of ``group`` the checkpoint records (its checksum entries)."""
    return [k for k in meta["checksums"][group] if k != "_"]


def replaceable(path: Path) -> str:
    """'' if ``path`` is a gpfq_jax checkpoint that ``overwrite=True`` may replace, else why not.

    Only a directory whose entries are exactly a checkpoint's (its metadata file naming this
    package's format, and the arrays folder) qualifies: a plain file, a link or a folder with
    anything else in it is never deleted.
    """
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a directory"
    extra = sorted(set(os.listdir(path)) - {META, ARRAYS})
    if extra:
        return f"it holds other entries ({', '.join(extra[:5])})"
    try:
        fmt = json.loads((path / META).read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        return f"it has no readable {META}"
    if not str(fmt).startswith("gpfq_jax.quantized/"):
        return f"its {META} names another format ({fmt!r})"
    return ""


__all__ = ["FORMAT", "META", "ARRAYS", "digest", "seal", "read_metadata", "check_arrays",
           "replaceable", "expected_keys"]  # fmt: skip
