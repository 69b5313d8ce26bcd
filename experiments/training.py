"""Reusable training pieces: train state, optimizer, steps, evaluation, checkpoints.

Images are NHWC. The training loop itself lives in ``train.py``; ``quantize.py`` uses
:func:`evaluate` and :func:`load_float_variables`.

Checkpoint layout inside a workdir::

    workdir/checkpoints/<epoch>/   orbax CheckpointManager; {params, batch_stats, opt_state,
                                   step, epoch}, the last few epochs kept
    workdir/float/                 orbax StandardCheckpointer; {params, batch_stats}
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

__all__ = [
    "write_text_atomic",
    "TrainState",
    "make_optimizer",
    "create_train_state",
    "train_step",
    "evaluate",
    "augment_crop_flip",
    "checkpoint_manager",
    "save_train_checkpoint",
    "restore_train_checkpoint",
    "save_float_variables",
    "load_float_variables",
    "write_json_atomic",
]

PyTree = Any
FLOAT_DIR = "float"
CKPT_DIR = "checkpoints"


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


# --------------------------------------------------------------------------- augmentation


def augment_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop with ``pad``-pixel zero padding plus random horizontal flip.

    x: (B, H, W, C) (any dtype); returns the same shape and dtype.
    """
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]  # (B, H)
    cols = dx[:, None] + np.arange(w)[None, :]  # (B, W)
    flip = rng.random(b) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    bi = np.arange(b)[:, None, None]
    return padded[bi, rows[:, :, None], cols[:, None, :]]


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str | os.PathLike, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """CheckpointManager over ``workdir/checkpoints`` keeping the last ``max_to_keep`` epochs."""
    path = Path(workdir).resolve() / CKPT_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(path, options=options)


def _train_tree(state: TrainState, epoch: int) -> dict[str, PyTree]:
    return {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "step": state.step,
        "epoch": jnp.asarray(epoch, jnp.int32),
    }


def save_train_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, epoch: int) -> None:
    """Save the train state after ``epoch`` (1-based) and wait until it is on disk."""
    mngr.save(epoch, args=ocp.args.StandardSave(_train_tree(state, epoch)))
    mngr.wait_until_finished()


def restore_train_checkpoint(
    mngr: ocp.CheckpointManager, state: TrainState
) -> tuple[TrainState, int]:
    """Restore the latest checkpoint into ``state``; returns (state, epoch), epoch 0 if none."""
    step = mngr.latest_step()
    if step is None:
        return state, 0
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _train_tree(state, 0))
    tree = mngr.restore(step, args=ocp.args.StandardRestore(target))
    state = state.replace(
        params=tree["params"],
        batch_stats=tree["batch_stats"],
        opt_state=tree["opt_state"],
        step=tree["step"],
    )
    return state, int(tree["epoch"])


def save_float_variables(workdir: str | os.PathLike, variables: Mapping[str, PyTree]) -> Path:
    """Write ``{"params", "batch_stats"}`` to ``workdir/float`` without a window in which a
    previous good checkpoint is half overwritten: orbax writes ``float.new`` atomically, then
    the directories are swapped by renames. Returns the checkpoint path.
    """
    workdir = Path(workdir).resolve()
    final, new, old = (
        workdir / FLOAT_DIR,
        workdir / f"{FLOAT_DIR}.new",
        workdir / f"{FLOAT_DIR}.old",
    )
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    for stale in (new, old):
        if stale.exists():
            shutil.rmtree(stale)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new, tree)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_float_variables(workdir: str | os.PathLike) -> dict[str, PyTree]:
    """Load ``{"params", "batch_stats"}`` saved by :func:`save_float_variables`.

    ``workdir`` is the training workdir (containing ``float/``) or the ``float`` path itself.
    Returns jax arrays, ready for ``model.apply(variables, x)``.
    """
    workdir = Path(workdir).resolve()
    candidates = [workdir / FLOAT_DIR, workdir / f"{FLOAT_DIR}.old", workdir]
    path = next((p for p in candidates if (p / "_CHECKPOINT_METADATA").exists()), None)
    if path is None:
        path = next((p for p in candidates if p.is_dir() and p.name == FLOAT_DIR), None)
    if path is None:
        raise FileNotFoundError(
            f"no float checkpoint under {workdir} (expected {workdir / FLOAT_DIR}); "
            "run train.py with --workdir pointing there first"
        )
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path)
    tree = jax.tree.map(jnp.asarray, tree)
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {}) or {}}


# --------------------------------------------------------------------------- json


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, Iterable):
        return list(o)
    return str(o)
