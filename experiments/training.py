"""Training a float model: train state, optimizer, step, evaluation, and the loop.

``train_and_evaluate(config, workdir)`` is what ``train.py`` runs; ``quantize.py`` uses
:func:`evaluate`. Images are NHWC. Checkpoints: ``experiments.checkpoints``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from ml_collections import ConfigDict
from tqdm import tqdm

from experiments import checkpoints as ckpt
from experiments import data, paths
from experiments.models import create_model
from gpfq_jax.atomic import write_json_atomic

__all__ = [
    "TrainState",
    "create_train_state",
    "evaluate",
    "make_optimizer",
    "train_and_evaluate",
    "train_step",
]

PyTree = Any


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm statistics (empty dict for models without BN)."""

    batch_stats: PyTree


# --------------------------------------------------------------------------- optimizer


def _decay_mask(params: PyTree) -> PyTree:
    """Weight decay on kernels only (ndim >= 2), not on biases or BatchNorm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int = 0,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """Cosine-decay (with linear warmup) SGD-with-Nesterov-momentum or AdamW.

    ``optimizer`` is "sgd" or "adamw". Weight decay is decoupled and skips biases/BN.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps - 1)
    if warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, total_steps, end_value=0.0
        )
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
    if optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)
    if optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=momentum, nesterov=True),
        )
    raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adamw'")


def create_train_state(
    model: nn.Module,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    tx: optax.GradientTransformation,
) -> TrainState:
    """Initialise variables with a dummy batch of ``input_shape`` (e.g. (1, 28, 28, 1))."""
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )


# --------------------------------------------------------------------------- steps


@functools.partial(jax.jit, donate_argnums=0)
def train_step(
    state: TrainState, x: jax.Array, y: jax.Array, rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch. x: (B, H, W, C) float32, y: (B,) int labels.

    ``rng`` is the base dropout key; it is folded with the step so batches differ.
    Returns the new state and {"loss", "accuracy"} of the batch (before the update).
    """
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return state, {"loss": loss, "accuracy": acc}


@functools.partial(jax.jit, static_argnums=0)
def _count_correct(model: nn.Module, variables: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model.apply(variables, x, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0))


def evaluate(
    model: nn.Module,
    variables: Mapping[str, PyTree],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1000,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``model.apply(variables, x, train=False)``.

    x: (n, H, W, C) model inputs (already normalized float32, or raw uint8 together with
    ``preprocess``, e.g. ``lambda b: data.normalize(b, name)``, applied per batch);
    y: (n,) int labels. The last batch is padded, so one compilation serves all batches.
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate: empty evaluation set")
    if len(y) != n:
        raise ValueError(f"evaluate: {n} inputs but {len(y)} labels")
    batch_size = min(batch_size, n)
    variables = dict(variables)
    correct = 0
    for start in range(0, n, batch_size):
        xb = np.asarray(x[start : start + batch_size])
        yb = np.asarray(y[start : start + batch_size], np.int32)
        if preprocess is not None:
            xb = preprocess(xb)
        pad = batch_size - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.full((pad,), -1, np.int32)])
        correct += int(_count_correct(model, variables, jnp.asarray(xb), jnp.asarray(yb)))
    return correct / n


# --------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train ``config``'s model, checkpointing each epoch into ``workdir``; returns the summary.

    Writes ``checkpoints/`` (resumed from when present), ``metrics.json`` (one dict per
    epoch), ``float/`` and ``train_summary.json`` into ``workdir`` (see ``train.py``).
    """
    t_start = time.time()
    data.resolve_data_dir(config.data_dir)  # a given data directory must exist: fail first
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
    model = create_model(config.model.name, **config.model.kwargs.to_dict())
    state, dropout_rng = initial_state(config, model, ds)
    mngr = ckpt.checkpoint_manager(workdir, max_to_keep=config.checkpoints_to_keep)
    state, start_epoch = ckpt.restore_train_checkpoint(mngr, state)
    if start_epoch:
        logging.info("resumed from %s at epoch %d", mngr.directory, start_epoch)
    metrics_path = workdir / "metrics.json"
    history = read_metrics(metrics_path, start_epoch)
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
        state, record = run_epoch(config, model, ds, state, epoch, dropout_rng)
        ckpt.save_train_checkpoint(mngr, state, epoch)
        history.append(record)
        write_json_atomic(metrics_path, history)
    mngr.close()
    if history and history[-1]["epoch"] == config.num_epochs:
        final = {k: history[-1][k] for k in ("val_accuracy", "test_accuracy") if k in history[-1]}
    else:
        final = evaluate_splits(config, model, ds, state)
    float_path = ckpt.save_float_variables(workdir, variables_of(state))
    summary = train_summary(
        config, ds, state, history, start_epoch, final, time.time() - t_start, workdir
    )
    write_json_atomic(workdir / "train_summary.json", summary)
    logging.info(
        "done: test %.4f val %s -> %s",
        summary["test_accuracy"],
        summary["val_accuracy"],
        float_path,
    )
    return summary


def epoch_size(config: ConfigDict, n_train: int) -> tuple[int, int]:
    """(batch size, steps per epoch): full batches only, at most one batch of all images."""
    batch_size = min(config.batch_size, n_train)
    return batch_size, n_train // batch_size


def initial_state(
    config: ConfigDict, model: nn.Module, ds: data.Dataset
) -> tuple[TrainState, jax.Array]:
    """The freshly initialised train state (optimizer scheduled over the whole run) and the
    base dropout key, both from ``config.seed``."""
    _, steps_per_epoch = epoch_size(config, len(ds.x_train))
    tx = make_optimizer(
        config.optimizer,
        config.learning_rate,
        config.weight_decay,
        total_steps=config.num_epochs * steps_per_epoch,
        warmup_steps=int(config.warmup_epochs * steps_per_epoch),
        momentum=config.momentum,
    )
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(model, init_rng, (1, *ds.x_train.shape[1:]), tx)
    return state, dropout_rng


def read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    """Earlier metrics, keeping only epochs covered by the restored checkpoint."""
    if not path.exists():
        return []
    return [m for m in json.loads(path.read_text()) if m.get("epoch", 0) <= upto_epoch]


def variables_of(state: TrainState) -> dict[str, PyTree]:
    return {"params": state.params, "batch_stats": state.batch_stats}


def evaluate_splits(
    config: ConfigDict, model: nn.Module, ds: data.Dataset, state: TrainState
) -> dict[str, float]:
    """Test accuracy, and validation accuracy when there is a validation split."""
    ev = functools.partial(
        evaluate,
        model,
        variables_of(state),
        batch_size=config.eval_batch_size,
        preprocess=functools.partial(data.normalize, name=config.dataset),
    )
    out = {"test_accuracy": ev(ds.x_test, ds.y_test)}
    if len(ds.x_val):
        out["val_accuracy"] = ev(ds.x_val, ds.y_val)
    return out


def run_epoch(
    config: ConfigDict,
    model: nn.Module,
    ds: data.Dataset,
    state: TrainState,
    epoch: int,
    dropout_rng: jax.Array,
) -> tuple[TrainState, dict[str, Any]]:
    """Train one epoch and evaluate; returns the new state and the epoch's metrics record."""
    t0 = time.time()
    state, sums, steps = train_epoch(config, ds, state, epoch, dropout_rng)
    train_seconds = time.time() - t0
    record = {
        "epoch": epoch,
        "step": int(state.step),
        "train_loss": sums["loss"] / steps,
        "train_accuracy": sums["accuracy"] / steps,
        **evaluate_splits(config, model, ds, state),
        "train_seconds": train_seconds,
        "epoch_seconds": time.time() - t0,
    }
    logging.info(
        "epoch %d: loss %.4f train %.4f val %s test %.4f (%.1f s)",
        epoch,
        record["train_loss"],
        record["train_accuracy"],
        record.get("val_accuracy"),
        record["test_accuracy"],
        record["epoch_seconds"],
    )
    return state, record


def train_epoch(
    config: ConfigDict, ds: data.Dataset, state: TrainState, epoch: int, dropout_rng: jax.Array
) -> tuple[TrainState, dict[str, float], int]:
    """One pass over the shuffled training images (seeded by ``config.seed`` and ``epoch``),
    with a progress bar; returns the state, the summed batch loss/accuracy and the steps."""
    batch_size, steps = epoch_size(config, len(ds.x_train))
    preprocess = functools.partial(data.normalize, name=config.dataset)
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
    desc = f"epoch {epoch}/{config.num_epochs}"
    bar = tqdm(it, total=steps, desc=desc, mininterval=2.0, dynamic_ncols=True)
    pending = []
    for i, (xb, yb) in enumerate(bar, 1):
        if config.augment:
            xb = data.augment_crop_flip(xb, np_rng)
        state, m = train_step(state, preprocess(xb), yb, dropout_rng)
        pending.append(m)
        if i % 20 == 0 or i == steps:  # fetch metrics now and then, not every step
            for m in jax.device_get(pending):
                sums["loss"] += float(m["loss"])
                sums["accuracy"] += float(m["accuracy"])
            pending = []
            bar.set_postfix(loss=f"{sums['loss'] / i:.4f}", acc=f"{sums['accuracy'] / i:.4f}")
    bar.close()
    return state, sums, steps


def train_summary(
    config: ConfigDict,
    ds: data.Dataset,
    state: TrainState,
    history: list[dict[str, Any]],
    start_epoch: int,
    final: dict[str, float],
    seconds: float,
    workdir: Path,
) -> dict[str, Any]:
    """train_summary.json: what was trained on what, final accuracies, times; paths relative
    (``experiments.paths``)."""
    return {
        "dataset": config.dataset,
        "dataset_source": paths.relative_source(ds.source, data.resolve_data_dir(config.data_dir)),
        "model": config.model.name,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "epochs": config.num_epochs,
        "resumed_from_epoch": start_epoch,
        "val_accuracy": final.get("val_accuracy"),
        "test_accuracy": final["test_accuracy"],
        "seconds": seconds,
        "train_seconds_total": sum(m["epoch_seconds"] for m in history),
        "float_checkpoint": paths.relative_path(workdir / ckpt.FLOAT_DIR, workdir),
        "n_train": len(ds.x_train),
        "n_val": len(ds.x_val),
        "n_test": len(ds.x_test),
        "jax_backend": jax.default_backend(),
        "config": paths.relative_config(config.to_dict(), workdir),
    }
