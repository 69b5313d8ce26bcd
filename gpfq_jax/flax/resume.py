"""Resumable runs: what ``quantize_params(..., resume_dir=...)`` writes after every layer.

Layout of the directory:

- ``resume.json``: the format, a fingerprint of the run's arguments (model weights,
  calibration batches, specs, methods and options), ``next_layer`` (every layer before it is
  done) and, inside a block, where the frontier activations of that point are.
- ``layer_00012.npz``: one finished layer: codes, steps, zero points, step multipliers, its
  new bias (bias correction) and its record's numbers (in ``meta``, JSON).
- ``frontier_<n>/``: the cached block arguments of both streams (``<stream>_<batch>_<leaf>.npy``),
  written when they change (entering or leaving a block).

Every file is written atomically and ``resume.json`` last, so an interruption at any moment
leaves the previous consistent state; a rerun with the same arguments continues from it and
gives the codes of an uninterrupted run. A directory holding a run with other arguments, or
files that are not a resume state, is refused (nothing in it is changed or deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gpfq_jax.atomic import atomic_path, write_json_atomic
from gpfq_jax.core.alphabets import QuantSpec
from gpfq_jax.core.result import LayerResult
from gpfq_jax.flax.activation_cache import ActivationCache
from gpfq_jax.flax.checkpoints import view_from_dict
from gpfq_jax.flax.results import LayerRecord

FORMAT = "gpfq_jax.resume/1"
MANIFEST = "resume.json"
# The cache streams a saved frontier holds (a block's float layer inputs are recomputed).
FRONTIER_STREAMS = ("float", "quant")
_TIMES = ("capture_seconds", "stats_seconds", "quant_seconds", "capture_first_seconds")


def run_fingerprint(parts: dict[str, Any]) -> str:
    """SHA-256 of the JSON of ``parts`` (arrays by their bytes)."""
    h = hashlib.sha256()

    def add(obj: Any) -> None:
        if hasattr(obj, "shape") and hasattr(obj, "dtype"):
            a = np.ascontiguousarray(np.asarray(obj))
            h.update(f"{a.dtype.name}{a.shape}".encode())
            h.update(a.tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                add(obj[k])
        elif isinstance(obj, list | tuple):
            h.update(b"[")
            for v in obj:
                add(v)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    add(parts)
    return h.hexdigest()


def _record_to_files(record: LayerRecord, bias: Any) -> tuple[dict, dict]:
    r = record.result
    arrays = {"codes": r.codes, "step": r.step, "c": np.asarray(r.c)}
    if r.zero_point is not None:
        arrays["zero_point"] = r.zero_point
    if bias is not None:
        arrays["bias"] = bias
    if record.bias_shift is not None:
        arrays["bias_shift"] = record.bias_shift
    meta = {
        "path": list(record.path), "name": record.name, "kind": record.kind,
        "shape": list(record.shape), "rows": record.rows, "rel_error": float(r.rel_error),
        "spec": r.spec.to_dict(), "method": r.method, "offset": float(r.offset),
        "seconds": float(r.seconds), "group_size": r.group_size,
        "view": None if r.view is None else dataclasses.asdict(r.view),
        "block": record.block, "shares_stats_with": record.shares_stats_with,
        **{k: getattr(record, k) for k in _TIMES},
    }  # fmt: skip
    return {k: np.asarray(v) for k, v in arrays.items()}, meta


def _record_from_file(path: Path, dtype: Any) -> tuple[LayerRecord, np.ndarray | None]:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    spec = QuantSpec(**{**meta["spec"], "search_grid": tuple(meta["spec"]["search_grid"])})
    c = arrays["c"]
    result = LayerResult(
        q=None, codes=jnp.asarray(arrays["codes"]), step=jnp.asarray(arrays["step"]),
        rel_error=meta["rel_error"], spec=spec, method=meta["method"],
        c=float(c) if c.ndim == 0 else jnp.asarray(c), offset=meta["offset"],
        seconds=meta["seconds"], group_size=meta["group_size"],
        zero_point=jnp.asarray(arrays["zero_point"]) if "zero_point" in arrays else None,
        view=view_from_dict(meta["view"]),
    )  # fmt: skip
    result.q = result.values(dtype)
    record = LayerRecord(tuple(meta["path"]), meta["name"], meta["kind"], tuple(meta["shape"]),
                         result, rows=meta["rows"], block=meta["block"],
                         shares_stats_with=meta["shares_stats_with"],
                         **{k: meta[k] for k in _TIMES})  # fmt: skip
    if "bias_shift" in arrays:
        record.bias_shift = jnp.asarray(arrays["bias_shift"])
    return record, arrays.get("bias")


class ResumeStore:
    """A run's resume directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.next_layer = 0
        self.frontier: dict | None = None
        self._generation = 0
        manifest = self.dir / MANIFEST
        if manifest.exists():
            self._load_manifest(manifest)
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(
                f"resume_dir {self.dir} is not empty and holds no {MANIFEST}: it is not a "
                "resume directory of quantize_params; give an empty or new directory"
            )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _load_manifest(self, manifest: Path) -> None:
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: unreadable resume state ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{manifest}: not a {FORMAT} resume state")
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"resume_dir {self.dir} holds a run with other arguments (model weights, "
                "calibration data, specs, methods, rules or options differ): resuming it would "
                "mix two runs. Rerun with the same arguments, or give another directory."
            )
        self.next_layer = int(meta["next_layer"])
        self.frontier = meta.get("frontier")
        self._generation = int(meta.get("generation", 0))

    def layer_file(self, index: int) -> Path:
        return self.dir / f"layer_{index:05d}.npz"

    def finished(self, dtypes: dict[int, Any]) -> dict[int, tuple[LayerRecord, Any]]:
        """The finished layers (index -> (record, new bias or None)) before ``next_layer``;
        ``dtypes``: the kernel dtype of every quantized layer index."""
        out = {}
        for i, dtype in dtypes.items():
            if i < self.next_layer:
                path = self.layer_file(i)
                if not path.exists():
                    raise ValueError(f"resume_dir {self.dir}: {path.name} is missing")
                out[i] = _record_from_file(path, dtype)
        return out

    def load_frontier(self, cache: ActivationCache) -> dict | None:
        """Fill ``cache`` with the saved frontier; its description (block, batches, count)."""
        if not self.frontier:
            return None
        folder = self.dir / self.frontier["dir"]
        for stream, i, j in self.frontier["entries"]:
            cache.put(stream, i, j, np.load(folder / f"{stream}_{i}_{j}.npy"))
        return self.frontier

    def save_layer(self, index: int, record: LayerRecord, bias: Any) -> None:
        arrays, meta = _record_to_files(record, bias)
        with atomic_path(self.layer_file(index)) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)

    def save_frontier(self, cache: ActivationCache, block: int, batches: int, count: int) -> None:
        """Write the cache's arrays to a new ``frontier_<n>/`` (made current by ``commit``)."""
        self._generation += 1
        name = f"frontier_{self._generation}"
        with atomic_path(self.dir / name, directory=True) as tmp:
            tmp.mkdir()
            entries = cache.entries(FRONTIER_STREAMS)
            for stream, i, j in entries:
                np.save(tmp / f"{stream}_{i}_{j}.npy", np.asarray(cache.get(stream, i, j)))
        self.frontier = {"dir": name, "block": block, "batches": batches, "count": count,
                         "entries": entries}  # fmt: skip

    def clear_frontier(self) -> None:
        self.frontier = None

    def commit(self, next_layer: int) -> None:
        """Record that every layer before ``next_layer`` is done; drop older frontiers."""
        self.next_layer = next_layer
        write_json_atomic(self.dir / MANIFEST, {
            "format": FORMAT, "fingerprint": self.fingerprint, "next_layer": next_layer,
            "frontier": self.frontier, "generation": self._generation,
        })  # fmt: skip
        keep = self.frontier["dir"] if self.frontier else None
        for p in self.dir.glob("frontier_*"):
            if p.name != keep and p.is_dir() and not p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)


__all__ = ["ResumeStore", "run_fingerprint", "FORMAT", "MANIFEST"]
