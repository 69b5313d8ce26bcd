"""What ``train.py`` and ``quantize.py`` share besides their flags: logging and XLA's cache."""

from __future__ import annotations

import logging as pylogging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
from absl import app, logging

from experiments.data_cache import resolve_cache_dir


class QuietOrbax(pylogging.Filter):
    """Drop orbax's per-save INFO chatter; keep its warnings."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def setup_logging() -> None:
    """absl logging at INFO, without orbax's INFO lines."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietOrbax())


def enable_compilation_cache() -> None:
    """Persist XLA compilations across invocations (``$GPFQ_CACHE_DIR``/xla, default
    ~/.cache/gpfq_jax/xla) unless ``JAX_COMPILATION_CACHE_DIR`` already chose a directory."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(resolve_cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


# What a user can cause and fix: reported in one line, without a traceback (set
# GPFQ_TRACEBACK=1 to see it). Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, TypeError)


def checked_workdir(workdir: str | os.PathLike) -> Path:
    """``--workdir`` as a Path; NotADirectoryError if it names an existing file."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--workdir {path} is a file, not a directory")
    return path


def main_with_clear_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap a script's ``main(argv)``: a user error exits with status 1 and one line
    ``error: <type>: <message>`` on stderr instead of a traceback."""

    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except USER_ERRORS as e:
            if os.environ.get("GPFQ_TRACEBACK"):
                traceback.print_exc()
            sys.exit(f"error: {type(e).__name__}: {e}")

    return wrapped


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run(main)`` with clear errors: user errors inside ``main`` (see
    ``main_with_clear_errors``), and a bad ``--config`` override, which ml_collections
    reports as a raw AttributeError / KeyError while the flags are parsed."""
    started = False

    def wrapped(argv: list[str]) -> None:
        nonlocal started
        started = True
        main_with_clear_errors(main)(argv)

    try:
        app.run(wrapped)
    except (AttributeError, KeyError, *USER_ERRORS) as e:
        if started:
            raise
        sys.exit(f"error: bad --config or --config.* override: {type(e).__name__}: {e}")


__all__ = [
    "run",
    "QuietOrbax",
    "USER_ERRORS",
    "checked_workdir",
    "enable_compilation_cache",
    "main_with_clear_errors",
    "setup_logging",
]
