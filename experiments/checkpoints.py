"""Float-model checkpoints of a training workdir (orbax).

Layout inside a workdir::

    workdir/checkpoints/<epoch>/   orbax CheckpointManager; {params, batch_stats, opt_state,
                                   step, epoch}, the last few epochs kept
    workdir/float/                 orbax StandardCheckpointer; {params, batch_stats}

(Quantized models are saved by ``gpfq_jax.save_quantized`` instead.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gpfq_jax.atomic import atomic_path

if TYPE_CHECKING:  # training imports this module
    from experiments.training import TrainState

PyTree = Any
FLOAT_DIR = "float"
CKPT_DIR = "checkpoints"


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
    """Write ``{"params", "batch_stats"}`` to ``workdir/float`` atomically (a previous
    checkpoint there is replaced only once the new one is complete). Returns the path."""
    final = Path(workdir).resolve() / FLOAT_DIR
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as ckptr, atomic_path(final, directory=True) as tmp:
        ckptr.save(tmp, tree)
        ckptr.wait_until_finished()
    return final


def has_float_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` (a ``float/`` dir or a train.py workdir) holds a float checkpoint."""
    path = Path(path)
    return any((p / "_CHECKPOINT_METADATA").exists() for p in (path, path / FLOAT_DIR))


def load_float_variables(workdir: str | os.PathLike) -> dict[str, PyTree]:
    """Load ``{"params", "batch_stats"}`` saved by :func:`save_float_variables`.

    ``workdir`` is the training workdir (containing ``float/``) or the ``float`` path itself.
    Returns jax arrays, ready for ``model.apply(variables, x)``.
    """
    workdir = Path(workdir).resolve()
    candidates = [workdir / FLOAT_DIR, workdir]
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


__all__ = [
    "CKPT_DIR",
    "FLOAT_DIR",
    "checkpoint_manager",
    "has_float_checkpoint",
    "load_float_variables",
    "restore_train_checkpoint",
    "save_float_variables",
    "save_train_checkpoint",
]
