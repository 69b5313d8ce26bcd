"""The float model a quantization experiment starts from: where its checkpoint is, training one
when allowed, and the ``train_summary.json`` that describes it."""

from __future__ import annotations

import json
from pathlib import Path

from absl import logging
from ml_collections import ConfigDict

from experiments import checkpoints, training
from experiments.paths import REPO


def checkpoint_candidates(config: ConfigDict, workdir: Path) -> list[Path]:
    """Where the float checkpoint may be, in order of preference: ``config.float_checkpoint``
    (relative paths against the current directory, then the repository), then
    ``<workdir>/float``."""
    out = []
    if config.get("float_checkpoint"):
        p = Path(config.float_checkpoint).expanduser()
        out += [p] if p.is_absolute() else [Path.cwd() / p, REPO / p]
    return [*dict.fromkeys(out), workdir / checkpoints.FLOAT_DIR]


def train_command(config_file: str, workdir: Path) -> str:
    return f"python train.py --config={config_file} --workdir={workdir}"


def find_or_train(config: ConfigDict, workdir: Path, config_file: str) -> Path:
    """The float checkpoint to quantize; trains one into ``workdir`` if allowed
    (``config.train_if_missing``) and none is found, else exits naming the train.py command."""
    candidates = checkpoint_candidates(config, workdir)
    found = next((p for p in candidates if checkpoints.has_float_checkpoint(p)), None)
    if found is not None:
        return found
    if config.get("train_if_missing", False):
        logging.info(
            "no float checkpoint at %s: training first into %s",
            ", ".join(map(str, candidates)),
            workdir,
        )
        training.train_and_evaluate(config, workdir)
        return workdir / checkpoints.FLOAT_DIR
    raise SystemExit(
        "error: no float checkpoint found; looked at "
        + ", ".join(map(str, candidates))
        + ". Train one first:\n  "
        + train_command(config_file, workdir)
        + "\n(or set --config.float_checkpoint=PATH, or --config.train_if_missing=True)"
    )


def train_summary(path: Path) -> dict | None:
    """train_summary.json beside (or one level above) a float checkpoint, if any."""
    for p in (path / "train_summary.json", path.parent / "train_summary.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def check_split(config: ConfigDict, summary: dict | None) -> None:
    """Warn if the checkpoint was trained with another val split (val would not be held out)."""
    if not summary:
        return
    trained = summary.get("config", {})
    for key in ("dataset", "seed", "val_size"):
        if key in trained and trained[key] != config.get(key):
            logging.warning(
                "float checkpoint was trained with %s=%r but this run uses %r: "
                "validation images may have been seen in training",
                key,
                trained[key],
                config.get(key),
            )


__all__ = [
    "check_split",
    "checkpoint_candidates",
    "find_or_train",
    "train_command",
    "train_summary",
]
