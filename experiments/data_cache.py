"""The cache of decoded datasets: ``.npz`` files under ``$GPFQ_CACHE_DIR`` (default
``~/.cache/gpfq_jax``), keyed by the source file's name, size and mtime, written atomically."""

from __future__ import annotations

import os
import pathlib
import warnings
import zipfile
from collections.abc import Callable

import numpy as np

from gpfq_jax.atomic import atomic_path

CACHE_DIR_ENV = "GPFQ_CACHE_DIR"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/gpfq_jax")
# What reading a truncated, corrupt or foreign .npz raises.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def resolve_cache_dir() -> pathlib.Path:
    """Cache directory: ``$GPFQ_CACHE_DIR``, else ``~/.cache/gpfq_jax``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()


def cache_path(source: str | os.PathLike, version: int) -> pathlib.Path:
    """Cache file for a decoded ``source`` file, keyed by its name, size and mtime."""
    st = os.stat(source)
    stem = pathlib.Path(source).name.split(".")[0]
    return resolve_cache_dir() / f"{stem}-v{version}-{st.st_size}-{st.st_mtime_ns}.npz"


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_npz_cached(
    path: pathlib.Path, compute: Callable[[], dict[str, np.ndarray]], keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The arrays ``keys`` cached at ``path``; else ``compute()`` (all arrays), saved there
    (best effort), of which ``keys`` are returned."""
    if path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in keys}
        except NPZ_ERRORS as e:  # corrupt or incompatible cache: compute again
            warnings.warn(f"ignoring unreadable cache {path}: {e}", stacklevel=3)
    arrays = compute()
    try:
        save_npz(path, arrays)
    except OSError as e:
        warnings.warn(f"could not write cache {path}: {e}", stacklevel=3)
    return {k: arrays[k] for k in keys}


__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_CACHE_DIR",
    "NPZ_ERRORS",
    "cache_path",
    "load_npz_cached",
    "resolve_cache_dir",
    "save_npz",
]
