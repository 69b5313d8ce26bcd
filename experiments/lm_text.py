"""Language-model text: Jane Austen's six novels, tokenized, cut into fixed-length windows.

Files: ``<data_dir>/text/austen/{name}.txt`` (plain UTF-8, one line per printed line; see
``../shared/data/README.md``), the data directory from the ``data_dir`` argument or
``$GPFQ_DATA_DIR`` (:func:`experiments.data.resolve_data_dir`).

Split: *Emma* is the evaluation text (from character :data:`EVAL_START_CHAR` on, past the
title page and the first pages); calibration windows come from the five other novels
(:data:`CALIB_NOVELS`) and never from Emma (:func:`calibration_windows` refuses it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.data import DATA_DIR_ENV, resolve_data_dir

NOVELS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
EVAL_NOVEL = "emma"
CALIB_NOVELS = tuple(name for name in NOVELS if name != EVAL_NOVEL)
EVAL_START_CHAR = 5000
SUBDIR = ("text", "austen")


def austen_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/text/austen``; FileNotFoundError naming ``$GPFQ_DATA_DIR`` if absent."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise FileNotFoundError(
            f"no data directory: pass data_dir=... or set {DATA_DIR_ENV} to a folder holding "
            "text/austen/*.txt (e.g. ../shared/data)"
        )
    folder = root.joinpath(*SUBDIR)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (expected <data_dir>/text/austen/)")
    return folder


def load_novel(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The text of one novel (a name in :data:`NOVELS`)."""
    if name not in NOVELS:
        raise ValueError(f"unknown novel {name!r}; expected one of {NOVELS}")
    return (austen_dir(data_dir) / f"{name}.txt").read_text(encoding="utf-8")


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids (n,) int32 of ``text`` (a ``tokenizers.Tokenizer``; no special tokens added
    beyond what its post-processor adds)."""
    return np.asarray(tokenizer.encode(text).ids, np.int32)


def novel_tokens(
    tokenizer: Any, names: Sequence[str], data_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """``{name: token ids (n,) int32}`` of whole novels."""
    return {name: encode(tokenizer, load_novel(name, data_dir)) for name in names}


def eval_tokens(
    tokenizer: Any,
    data_dir: str | os.PathLike | None = None,
    start_char: int = EVAL_START_CHAR,
) -> np.ndarray:
    """The evaluation novel from character ``start_char`` on, tokenized: (n,) int32."""
    return encode(tokenizer, load_novel(EVAL_NOVEL, data_dir)[start_char:])


def eval_windows(
    tokens: np.ndarray, window: int = 512, max_tokens: int | None = None
) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of ``tokens``.

    Args:
      tokens: (n,) token ids.
      window: tokens per window.
      max_tokens: use at most this many tokens (None: all).
    Returns:
      (n_windows, window) int32, ``n_windows = min(n, max_tokens) // window``; a last partial
      window is dropped.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (one predicted token), got {window}")
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"{len(tokens)} tokens make no window of {window}")
    return tokens[: n * window].reshape(n, window)


def window_grid(token_streams: Mapping[str, np.ndarray], window: int) -> list[tuple[str, int]]:
    """Every candidate calibration window as (stream name, start): starts 0, window, 2 *
    window, ... inside each stream, streams in sorted name order."""
    return [
        (name, start)
        for name in sorted(token_streams)
        for start in range(0, len(token_streams[name]) - window + 1, window)
    ]


def calibration_windows(
    token_streams: Mapping[str, np.ndarray], n: int, window: int, seed: int
) -> np.ndarray:
    """``n`` distinct, non-overlapping windows drawn from the streams (uniformly over all of
    :func:`window_grid`'s windows, without replacement).

    Args:
      token_streams: ``{novel name: token ids (length,)}``; the evaluation novel (Emma) is
        refused.
      n: number of windows.
      window: tokens per window.
      seed: seeds the ``numpy.random.Generator`` (the same seed and streams give the same
        windows, in the same order).
    Returns:
      (n, window) int32, in draw order.
    """
    if EVAL_NOVEL in token_streams:
        raise ValueError(f"calibration text must not include the evaluation novel {EVAL_NOVEL!r}")
    grid = window_grid(token_streams, window)
    if n > len(grid):
        raise ValueError(f"{n} windows of {window} asked, the streams hold {len(grid)}")
    picks = np.random.default_rng(seed).choice(len(grid), size=n, replace=False)
    rows = [token_streams[grid[i][0]][grid[i][1] : grid[i][1] + window] for i in picks]
    return np.asarray(rows, np.int32).reshape(n, window)


__all__ = [
    "CALIB_NOVELS",
    "EVAL_NOVEL",
    "EVAL_START_CHAR",
    "NOVELS",
    "austen_dir",
    "calibration_windows",
    "encode",
    "eval_tokens",
    "eval_windows",
    "load_novel",
    "novel_tokens",
    "window_grid",
]
