"""Atomic writes: a file or a directory appears complete at its path, or not at all.

Everything is first written to a hidden temporary sibling (``.NAME.tmp-XXXXXXXX``) in the same
folder, then renamed onto the final path; a failure or an interruption (exception, Ctrl-C)
removes the temporary and leaves whatever stood at the path before untouched. Replacing a
directory swaps it out by two renames (the old one goes to ``.NAME.old-XXXXXXXX`` and is
deleted after the new one is in place). A process killed outright can leave such hidden
siblings behind, and a kill between the two renames leaves the path itself missing with its
old version parked: ``remove_stale_siblings`` (called first by every atomic write of a path)
restores a parked version whose path is missing and deletes the rest; readers call
``recover_interrupted`` first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _siblings(path: Path, kind: str) -> list[Path]:
    if not path.parent.is_dir():
        return []
    found = path.parent.glob(f".{path.name}.{kind}-*")
    return sorted(found, key=lambda p: p.lstat().st_mtime_ns)


def recover_interrupted(path: str | os.PathLike) -> Path | None:
    """If a directory swap was interrupted between its two renames (``path`` gone, the old
    version parked as ``.NAME.old-*``), move the newest parked version back to ``path``.
    Returns what was restored, or None."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    parked = _siblings(path, "old")
    if not parked:
        return None
    os.rename(parked[-1], path)
    return parked[-1]


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Clean up after interrupted atomic writes of ``path``: restore a parked old version if
    ``path`` itself is missing (``recover_interrupted``), then delete the temporaries and the
    parked versions that ``path`` has replaced."""
    path = Path(path)
    recover_interrupted(path)
    stale = _siblings(path, "tmp") + (_siblings(path, "old") if path.exists() else [])
    for p in stale:
        _remove(p)
    return stale


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``.

    ``directory=False``: write a file at the yielded path (it is ``os.replace``-d onto
    ``path``). ``directory=True``: the yielded path does not exist yet; create it (e.g. an
    orbax checkpoint) and it is swapped in for ``path``, which may be an existing directory.
    On any exception the temporary is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary {tmp} for {path}")
        _commit(tmp, path, directory)
    finally:
        if tmp.exists():
            _remove(tmp)


def _commit(tmp: Path, path: Path, directory: bool) -> None:
    if not directory or not path.exists():
        os.replace(tmp, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic | np.ndarray) or hasattr(o, "__array__"):
        return np.asarray(o).tolist()
    if isinstance(o, tuple | list | set | frozenset):
        return list(o)
    return str(o)


def to_json(obj: Any) -> str:
    """JSON text (indent 2, trailing newline); arrays and numpy scalars become lists/numbers."""
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (see ``to_json``) to ``path`` atomically."""
    write_text_atomic(path, to_json(obj))


__all__ = [
    "atomic_path",
    "recover_interrupted",
    "remove_stale_siblings",
    "to_json",
    "write_json_atomic",
    "write_text_atomic",
]
