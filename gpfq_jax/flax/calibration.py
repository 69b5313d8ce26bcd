"""Calibration inputs: an array, a list of batches, or a callable streaming batches.

Every batch is validated as it is used: a leading batch axis, the same per-sample shape as the
first batch, no empty batch, no NaN/Inf (naming the batch and the sample).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def calibration_batches(calib: Any, batch_size: int) -> list[Any]:
    """Split ``calib`` (one array: in order, ``batch_size`` rows per batch, the last one
    possibly smaller; or a list of arrays: each a batch) into batches, validated.

    Raises ValueError for empty data, NaN/Inf (naming the batch and sample), or batches whose
    per-sample shapes differ.
    """
    _check_batch_size(batch_size)
    if isinstance(calib, list | tuple):
        if not calib:
            raise ValueError("empty calibration data: got an empty list of batches")
        batches = list(calib)
    elif _is_array(calib):
        if calib.ndim == 0:
            raise ValueError("calibration data must have a leading batch axis, got a scalar")
        batches = [calib[i : i + batch_size] for i in range(0, calib.shape[0], batch_size)]
    else:
        raise TypeError(
            "calib must be an array (n, ...), a list of arrays (batches) or a "
            f"zero-argument callable returning an iterator of batches; got "
            f"{type(calib).__name__}"
        )
    if not batches or all(np.shape(b)[:1] == (0,) for b in batches):
        raise ValueError("empty calibration data: 0 samples")
    first = _sample_shape(batches[0], 0)
    start = 0
    for i, b in enumerate(batches):
        start += _check_batch(b, i, first, start)
    return batches


def _check_batch_size(batch_size: Any) -> None:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _sample_shape(b: Any, i: int) -> tuple[int, ...]:
    if not _is_array(b) or np.ndim(b) == 0:
        raise TypeError(
            f"calibration batch {i} must be an array with a batch axis, got {type(b).__name__}"
        )
    return tuple(b.shape[1:])


def _check_batch(b: Any, i: int, first: tuple[int, ...], start: int, where: str = "") -> int:
    """Validate batch ``i`` (samples ``start``...) against per-sample shape ``first``;
    return its number of samples. ``where`` qualifies the batch in messages."""
    if _sample_shape(b, i) != first:
        raise ValueError(
            f"calibration batch {i}{where} has per-sample shape "
            f"{tuple(b.shape[1:])}, batch 0 has {first}"
        )
    if b.shape[0] == 0:
        raise ValueError(f"empty calibration data: batch {i}{where} has 0 samples")
    if not (jnp.issubdtype(b.dtype, jnp.floating) or jnp.issubdtype(b.dtype, jnp.integer)):
        raise TypeError(f"calibration batch {i}{where} has dtype {b.dtype}; expected real "
                        "numbers (float or integer inputs)")  # fmt: skip
    if jnp.issubdtype(b.dtype, jnp.inexact):
        host = np.asarray(b).reshape(b.shape[0], -1)
        bad = ~np.isfinite(host).all(axis=1)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(
                f"calibration data contains NaN or Inf: {int(bad.sum())} "
                f"sample(s) of batch {i}{where}, first at sample {start + j}"
            )
        _check_float32_range(host, i, where)
    return int(b.shape[0])


def _check_float32_range(host: np.ndarray, i: int, where: str) -> None:
    """The model runs in float32 (unless 64-bit JAX is on): values it cannot hold, or that XLA
    flushes to zero (below float32's normal range), would silently change the data."""
    if jax.config.jax_enable_x64 and host.dtype == np.float64:
        return
    big = float(np.max(np.abs(host), initial=0.0))
    f32 = np.finfo(np.float32)
    if big > float(f32.max):
        raise ValueError(f"calibration batch {i}{where} holds values up to {big:.3g}, beyond "
                         "float32's range (3.4e38), and the model runs in float32")  # fmt: skip
    if 0.0 < big < float(f32.tiny):
        raise ValueError(
            f"calibration batch {i}{where} holds only values below float32's normal range (max "
            f"|x| = {big:.3g} < 1.2e-38), which XLA flushes to zero: rescale the inputs"
        )


def fingerprint(batch: Any) -> tuple[float, float]:
    """A cheap content fingerprint: the float64 sum and a position-weighted sum of ``batch``.

    Equal batches give equal fingerprints; a batch with other samples, other values or its
    samples in another order gives different ones (up to a float coincidence).
    """
    flat = np.asarray(batch, np.float64).reshape(-1)
    weights = (np.arange(flat.size) % 7) + 1.0
    return float(flat.sum()), float(flat @ weights)


class Calibration:
    """Calibration batches, as a validated list or streamed from a callable.

    ``calib`` is an array (split into ``batch_size`` batches), a list of arrays (one batch
    each), or a zero-argument callable returning a fresh iterator of batches. A callable is
    called once per pass (once per quantized layer; the first pass also supplies the batch
    used to trace the model), so only one batch is held at a time: memory does not grow with
    the number of samples. Every pass must yield the same batches in the same order (same
    sample count, else ValueError). Streamed batches are validated as they arrive (shape,
    empty, NaN/Inf naming the batch and the sample).
    """

    def __init__(self, calib: Any, batch_size: int = 256):
        self._factory: Callable[[], Any] | None = None
        self._batches: list[Any] | None = None
        self._pending: Iterator[Any] | None = None
        self.calls = 0
        self._counts: tuple[int, int] | None = None  # (batches, samples) of the first pass
        self._prints: list[tuple[float, float]] = []  # fingerprint of each batch of pass 1
        if callable(calib) and not _is_array(calib):
            self._factory = calib
            self._pending = self._open()
            first = next(self._pending, None)
            if first is None:
                raise ValueError("empty calibration data: calib() yielded no batches")
            self._shape = _sample_shape(first, 0)
            _check_batch(first, 0, self._shape, 0, " (first pass of calib())")
            self._pending = itertools.chain([first], self._pending)
            self.first = first
        else:
            self._batches = calibration_batches(calib, batch_size)
            self.first = self._batches[0]

    def _open(self) -> Iterator[Any]:
        self.calls += 1
        source = self._factory()
        try:
            return iter(source)
        except TypeError:
            raise TypeError(
                f"calib() must return an iterable of batches (arrays); got {type(source).__name__}"
            ) from None

    def _check_same(self, i: int, batch: Any, n_pass: int) -> None:
        """Record batch ``i``'s fingerprint on the first pass; compare on every later one."""
        fp = fingerprint(batch)
        if self._counts is None:
            self._prints.append(fp)
        elif i >= len(self._prints) or fp != self._prints[i]:
            raise ValueError(
                f"calib() yielded a different batch {i} on pass {n_pass} than on pass 1 (its "
                "contents changed); it must yield the same batches in the same order on every "
                "call, or each layer would be calibrated on other data (seed its sampling)"
            )

    def __iter__(self) -> Iterator[Any]:
        """One pass over the batches."""
        if self._batches is not None:
            yield from self._batches
            return
        it, self._pending = (self._pending or self._open()), None
        n_pass, start, i = self.calls, 0, -1
        where = f" (pass {n_pass} of calib())"
        for i, b in enumerate(it):
            start += _check_batch(b, i, self._shape, start, where)
            self._check_same(i, b, n_pass)
            yield b
        counts = (i + 1, start)
        if self._counts is None:
            self._counts = counts
        elif counts != self._counts:
            raise ValueError(
                f"calib() yielded {counts[1]} samples in {counts[0]} batches on "
                f"pass {n_pass} but {self._counts[1]} in {self._counts[0]} on "
                "pass 1; it must yield the same batches on every call"
            )


__all__ = ["Calibration", "calibration_batches", "fingerprint"]
