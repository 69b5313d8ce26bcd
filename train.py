"""Train a float model for GPFQ experiments.

    python train.py --config=configs/mnist_mlp.py --workdir=workdirs/mnist_mlp \
        [--config.num_epochs=3 --config.limit_train=5000 ...]

Writes into ``--workdir``:
  checkpoints/          orbax CheckpointManager (last few epochs); an interrupted run resumes
                        from the latest one when started again with the same workdir
  metrics.json          list of per-epoch dicts (train loss/accuracy, val/test accuracy, seconds)
  float/                orbax checkpoint of {"params", "batch_stats"} (see
                        ``experiments.training.load_float_variables``)
  train_summary.json    final accuracies, config, seconds, dataset source
Data come from ``--config.data_dir`` or ``$GPFQ_DATA_DIR`` (see ``experiments.data``).
"""

from __future__ import annotations

import functools
import json
import logging as pylogging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

from experiments import data
from experiments import training as tr
from experiments.models import create_model

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the float model.")
flags.mark_flags_as_required(["config", "workdir"])


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Earlier metrics, keeping only epochs covered by the restored checkpoint."""
    if not path.exists():
        return []
    return [m for m in json.loads(path.read_text()) if m.get("epoch", 0) <= upto_epoch]


def train_and_evaluate(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train ``config``'s model, checkpointing each epoch into ``workdir``; returns the summary."""
    t_start = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        val_size=config.val_size,
        seed=config.seed,
        limit_train=config.limit_train,
    )
    logging.info("%r", ds)
    preprocess = functools.partial(data.normalize, name=config.dataset)
    model = create_model(config.model.name, **config.model.kwargs.to_dict())

    n_train = len(ds.x_train)
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    tx = tr.make_optimizer(
        config.optimizer,
        config.learning_rate,
        config.weight_decay,
        total_steps=config.num_epochs * steps_per_epoch,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        momentum=config.momentum,
    )
    rng = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    state = tr.create_train_state(model, init_rng, (1, *ds.x_train.shape[1:]), tx)

    mngr = tr.checkpoint_manager(workdir, max_to_keep=config.checkpoints_to_keep)
    state, start_epoch = tr.restore_train_checkpoint(mngr, state)
    if start_epoch:
        logging.info("resumed from %s at epoch %d", mngr.directory, start_epoch)
    metrics_path = workdir / "metrics.json"
    history = _read_metrics(metrics_path, start_epoch)

    def eval_all() -> dict[str, float]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        ev = functools.partial(
            tr.evaluate,
            model,
            variables,
            batch_size=config.eval_batch_size,
            preprocess=preprocess,
        )
        out = {"test_accuracy": ev(ds.x_test, ds.y_test)}
        if len(ds.x_val):
            out["val_accuracy"] = ev(ds.x_val, ds.y_val)
        return out

    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        t0 = time.time()
        np_rng = np.random.default_rng([config.seed, epoch])
        it = data.batches(
            ds.x_train,
            ds.y_train,
            batch_size,
            shuffle=True,
            seed=config.seed * 100_003 + epoch,
            drop_remainder=True,
        )
        sums = {"loss": 0.0, "accuracy": 0.0}
        bar = tqdm(
            it,
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.num_epochs}",
            mininterval=2.0,
            dynamic_ncols=True,
        )
        pending = []
        for i, (xb, yb) in enumerate(bar, 1):
            if config.augment:
                xb = tr.augment_crop_flip(xb, np_rng)
            state, m = tr.train_step(state, preprocess(xb), yb, dropout_rng)
            pending.append(m)
            if i % 20 == 0 or i == steps_per_epoch:
                for m in jax.device_get(pending):
                    sums["loss"] += float(m["loss"])
                    sums["accuracy"] += float(m["accuracy"])
                pending = []
                bar.set_postfix(loss=f"{sums['loss'] / i:.4f}", acc=f"{sums['accuracy'] / i:.4f}")
        bar.close()
        train_seconds = time.time() - t0
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": sums["loss"] / steps_per_epoch,
            "train_accuracy": sums["accuracy"] / steps_per_epoch,
            **eval_all(),
            "train_seconds": train_seconds,
            "epoch_seconds": time.time() - t0,
        }
        tr.save_train_checkpoint(mngr, state, epoch)
        history.append(record)
        tr.write_json_atomic(metrics_path, history)
        logging.info(
            "epoch %d: loss %.4f train %.4f val %s test %.4f (%.1f s)",
            epoch,
            record["train_loss"],
            record["train_accuracy"],
            record.get("val_accuracy"),
            record["test_accuracy"],
            record["epoch_seconds"],
        )
    mngr.close()

    final = (
        eval_all()
        if not history or history[-1]["epoch"] != config.num_epochs
        else {k: history[-1][k] for k in ("val_accuracy", "test_accuracy") if k in history[-1]}
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    float_path = tr.save_float_variables(workdir, variables)
    summary = {
        "dataset": config.dataset,
        "dataset_source": ds.source,
        "model": config.model.name,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "epochs": config.num_epochs,
        "resumed_from_epoch": start_epoch,
        "val_accuracy": final.get("val_accuracy"),
        "test_accuracy": final["test_accuracy"],
        "seconds": time.time() - t_start,
        "train_seconds_total": sum(m["epoch_seconds"] for m in history),
        "float_checkpoint": str(float_path),
        "n_train": n_train,
        "n_val": len(ds.x_val),
        "n_test": len(ds.x_test),
        "jax_backend": jax.default_backend(),
        "config": config.to_dict(),
    }
    tr.write_json_atomic(workdir / "train_summary.json", summary)
    logging.info(
        "done: test %.4f val %s -> %s",
        summary["test_accuracy"],
        summary["val_accuracy"],
        float_path,
    )
    return summary


class _QuietOrbax(pylogging.Filter):
    """Drop orbax's per-save INFO chatter; keep its warnings."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietOrbax())
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
