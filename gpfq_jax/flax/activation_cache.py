"""The frontier driver's activation cache: arrays in host memory up to a budget, on disk above.

Entries are addressed by (stream, batch, leaf): stream "float" (the float model) or "quant" (the
partially quantized model), the calibration batch, and the array argument of the block call
(leaf 0 is the hidden state; the others, such as positions or masks, do not change from block to
block). Streams "float_in" (leaf: a layer of the current block) and "float_out" hold the current
block's float layer inputs and output from one float run of the block. Where the "quant" stream
has no array of its own (before any layer has been quantized, and for the arguments computed
before the first block if they equal) it reads the "float" one. An array that would take the
host bytes over ``budget_bytes`` is written to ``spill_dir`` as ``.npy`` and read back (memory-
mapped) when asked for, so a calibration set larger than memory still runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

Key = tuple[str, int, int]


class ActivationCache:
    """Host/disk store of the frontier activations (see the module docstring).

    budget_bytes: host bytes kept in memory (0: everything on disk). spill_dir: where arrays
    above the budget go (None: a temporary directory, removed by ``close``).
    ``peak_host_bytes`` and ``spilled_bytes`` (largest on-disk total) report what was used.
    """

    def __init__(self, budget_bytes: int, spill_dir: str | os.PathLike | None = None):
        self.budget = int(budget_bytes)
        self._dir = None if spill_dir is None else Path(spill_dir)
        self._own_dir = spill_dir is None
        self._host: dict[Key, np.ndarray] = {}
        self._disk: dict[Key, tuple[Path, int]] = {}
        self.host_bytes = self.disk_bytes = 0
        self.peak_host_bytes = self.spilled_bytes = 0

    def _spill_path(self, key: Key) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="gpfq_frontier_"))
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir / f"{key[0]}_{key[1]}_{key[2]}.npy"

    def _drop(self, key: Key) -> None:
        if key in self._host:
            self.host_bytes -= self._host.pop(key).nbytes
        if key in self._disk:
            path, size = self._disk.pop(key)
            self.disk_bytes -= size
            path.unlink(missing_ok=True)

    def put(self, stream: str, batch: int, leaf: int, array: Any) -> None:
        """Store one array (copied to host memory, or to disk above the budget)."""
        key = (stream, batch, leaf)
        self._drop(key)
        a = np.asarray(jax.device_get(array))
        if self.host_bytes + a.nbytes <= self.budget:
            self._host[key] = a
            self.host_bytes += a.nbytes
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
            return
        path = self._spill_path(key)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, a)
        os.replace(tmp, path)
        self._disk[key] = (path, a.nbytes)
        self.disk_bytes += a.nbytes
        self.spilled_bytes = max(self.spilled_bytes, self.disk_bytes)

    def get(self, stream: str, batch: int, leaf: int) -> np.ndarray:
        """One array (memory-mapped from disk when it was spilled)."""
        key = (stream, batch, leaf)
        if stream == "quant" and key not in self._host and key not in self._disk:
            key = ("float", batch, leaf)
        if key in self._host:
            return self._host[key]
        if key in self._disk:
            return np.load(self._disk[key][0], mmap_mode="r")
        raise KeyError(f"no cached activation {key}")

    def leaves(self, stream: str, batch: int, count: int) -> list[np.ndarray]:
        return [self.get(stream, batch, j) for j in range(count)]

    def entries(self, streams: tuple[str, ...] | None = None) -> list[Key]:
        """Every stored (stream, batch, leaf) (of ``streams`` only, if given), sorted."""
        keys = sorted([*self._host, *self._disk])
        return keys if streams is None else [k for k in keys if k[0] in streams]

    def drop_streams(self, streams: tuple[str, ...]) -> None:
        """Remove every entry of ``streams``."""
        for key in self.entries(streams):
            self._drop(key)

    def close(self) -> None:
        """Remove the spilled files (and the directory, if this cache made it)."""
        for key in list(self._disk):
            self._drop(key)
        self._host.clear()
        self.host_bytes = 0
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        elif self._dir is not None and self._dir.is_dir() and not any(self._dir.iterdir()):
            self._dir.rmdir()


__all__ = ["ActivationCache"]
