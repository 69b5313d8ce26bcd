"""What ``train.py`` and ``quantize.py`` share besides their flags: logging and XLA's cache."""

from __future__ import annotations

import logging as pylogging

import jax
from absl import logging

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


__all__ = ["QuietOrbax", "enable_compilation_cache", "setup_logging"]
