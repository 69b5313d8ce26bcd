"""Paths as result files record them: relative, never the absolute paths of one machine.

A path inside the repository is written relative to its root (``checkpoints/mnist_mlp``,
``workdirs/results/mnist_mlp/quantized/gpfq_int_3``), the form the configs and the commands
use (the scripts run from the repository root). Otherwise a path inside the run's workdir is
written ``<workdir>/...`` and a file of the data directory ``<data_dir>/...`` (the notation
of ``experiments.data``'s messages); anything else relative to the repository root
(``../...``).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKDIR = "<workdir>"
DATA_DIR = "<data_dir>"


def _inside(path: Path, base: Path | None) -> str | None:
    """``path`` relative to ``base`` ("." for ``base`` itself), or None if outside it."""
    if base is None:
        return None
    try:
        return path.relative_to(base.resolve()).as_posix()
    except ValueError:
        return None


def _join(tag: str, rel: str) -> str:
    return tag if rel == "." else f"{tag}/{rel}"


def relative_path(path: str | os.PathLike, workdir: str | os.PathLike | None = None) -> str:
    """How a result file records ``path`` (see the module docstring)."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path.cwd() / p
    p = Path(os.path.normpath(p))
    rel = _inside(p, REPO)
    if rel is not None:
        return rel
    rel = _inside(p, Path(workdir) if workdir is not None else None)
    if rel is not None:
        return _join(WORKDIR, rel)
    return Path(os.path.relpath(p, REPO)).as_posix()


def resolve_recorded(recorded: str, workdir: str | os.PathLike) -> Path:
    """The path a result file recorded with ``relative_path``, back as a real path."""
    if recorded == WORKDIR or recorded.startswith(WORKDIR + "/"):
        return Path(workdir) / recorded[len(WORKDIR) :].lstrip("/")
    return REPO / recorded


def relative_source(source: str, data_dir: str | os.PathLike | None) -> str:
    """A dataset's source description with the data directory written ``<data_dir>``."""
    if data_dir is None:
        return source
    root = Path(data_dir).expanduser()
    for prefix in dict.fromkeys([str(root.resolve()), str(root)]):
        source = source.replace(prefix + os.sep, DATA_DIR + "/").replace(prefix, DATA_DIR)
    return source


def relative_config(config: Mapping[str, Any], workdir: str | os.PathLike) -> dict[str, Any]:
    """``config`` (a dict, e.g. ``ConfigDict.to_dict()``) with absolute paths made relative."""

    def fix(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, str) and os.path.isabs(os.path.expanduser(v)):
            return relative_path(v, workdir)
        return v

    return fix(dict(config))


def relative_command(argv: Sequence[str], workdir: str | os.PathLike) -> list[str]:
    """A command line (``sys.argv``) with absolute paths, bare or as ``--flag=PATH``, made
    relative; the script itself is written as run from the repository root."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        if value and os.path.isabs(os.path.expanduser(value)):
            value = relative_path(value, workdir)
        out.append(f"{flag}{eq}{value}")
    return out


def command_line(workdir: str | os.PathLike) -> str:
    """This process's command line as results record it (``python quantize.py ...``)."""
    return shlex.join([os.path.basename(sys.executable), *relative_command(sys.argv, workdir)])


__all__ = [
    "resolve_recorded",
    "REPO",
    "command_line",
    "relative_command",
    "relative_config",
    "relative_path",
    "relative_source",
]
