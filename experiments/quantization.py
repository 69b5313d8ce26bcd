"""The whole-model quantization experiment that ``quantize.py`` runs.

``quantize_experiment(config, workdir)`` quantizes a float model with every method x (grids x
bits + extra_runs) run of ``config.quant``, evaluates each on the validation and test splits,
saves it and writes, atomically after every run, ``results.json``, ``results.md``,
``accuracy_vs_bits.png``, ``layer_errors.png`` and ``quantized/<run>/`` into ``workdir``. A
failed run is recorded with its error and the others go on; the float checkpoint is only read.

Mixed precision: each (bits per weight, group size) pair of ``quant.budgets`` (and of
``quant.fisher_budgets``, whose widths minimise the diagonal Fisher's loss estimate over the
first ``quant.fisher_samples`` calibration images: ``gpfq_int_b3.0fisher``) adds one run per
method x grid after the uniform ones (``gpfq_int_b3.0``), whose layer widths
``gq.quantize_params(budget_bits=, budget_candidates=quant.budget_candidates)`` chooses under
that average (codes, float32 steps and zero points). Its record holds ``budget``,
``allocation`` and each layer's ``bits`` (as in the LM experiment, ``runs.mixed_fields``);
every record holds ``bits_per_weight`` (achieved, steps included). results.md gets a "Mixed
precision" section; the accuracy plot then puts every run at its bits per weight, budget runs
as stars. An infeasible budget is a failed run whose error names the minimum.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict
from tqdm import tqdm

import gpfq_jax as gq
from experiments import checkpoints, data, float_model, paths, plots, reports, runs, training
from experiments.models import create_model
from gpfq_jax.atomic import to_json, write_json_atomic, write_text_atomic
from gpfq_jax.flax.driver import default_apply_kwargs

TRAIN_KEYS = ("test_accuracy", "val_accuracy", "epochs", "seconds", "dataset_source")


@dataclasses.dataclass
class Setup:
    """What every run of an experiment shares: the float model, the data, the calibration."""

    model: nn.Module
    variables: Any
    ds: data.Dataset
    calib: np.ndarray
    preprocess: Callable[[np.ndarray], np.ndarray]
    eval_batch_size: int
    fisher: runs.FisherCache  # of the cross-entropy of one calibration image and its label

    def evaluate(self, variables: Any, split: str) -> float | None:
        """Accuracy of ``variables`` on "val" or "test" (None for an empty split)."""
        splits = {"val": (self.ds.x_val, self.ds.y_val), "test": (self.ds.x_test, self.ds.y_test)}
        x, y = splits[split]
        if not len(x):
            return None
        return training.evaluate(
            self.model, variables, x, y, batch_size=self.eval_batch_size, preprocess=self.preprocess
        )


def quantize_experiment(
    config: ConfigDict, workdir: str | Path, config_file: str = "CONFIG"
) -> dict[str, Any]:
    """Every run of ``config`` (see the module docstring); returns the results dict.

    ``config_file`` names the config in the train.py command printed when no float
    checkpoint is found (``experiments.float_model.find_or_train``).
    """
    t_start = time.time()
    data.resolve_data_dir(config.get("data_dir"))  # a given data directory must exist: fail first
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = float_model.find_or_train(config, workdir, config_file)
    summary = float_model.train_summary(ckpt)
    float_model.check_split(config, summary)
    setup = load_setup(config, ckpt)
    results = results_header(config, workdir, setup, ckpt, summary)
    logging.info("float: %s", results["float"])
    q = config.quant
    done: dict[runs.Run, dict] = {}
    finished = finished_runs(workdir, results)
    grid = runs.run_grid(q.methods, q.grids, q.bits, q.get("extra_runs") or (),
                         q.get("budgets") or (), q.get("budget_candidates"),
                         q.get("fisher_budgets") or ())  # fmt: skip
    results["runs"] = planned_records(finished, grid)
    for run in tqdm(grid, desc="runs", unit="run", dynamic_ncols=True):
        twin = runs.same_alphabet(run, done)
        if twin is not None:
            results["runs"].append(runs.reused_record(done[twin], run))
            continue
        record = finished.get(run.name)
        if record is None or not same_candidates(record, q):
            record = quantize_run(run, setup, q, workdir)
        if "error" not in record:
            done[run] = record
        add_record(results, record, t_start, lambda r: write_outputs(workdir, r))
    add_record(results, None, t_start, lambda r: write_outputs(workdir, r))
    return results


def add_record(
    results: dict, record: dict | None, t_start: float, write: Callable[[dict], None]
) -> None:
    """Append one run's ``record`` (None: mark the results complete), update the total time
    and ``write`` the results (atomically, so an interruption keeps every finished run)."""
    if record is None:
        results["complete"] = True
    else:
        results["runs"].append(record)
    results["seconds_total"] = time.time() - t_start
    write(results)


# What must match for an earlier run's result to be kept ("setup": the config without the
# list of runs, so a workdir gathers runs from several invocations). Keys added to the config
# that only list runs belong in RUN_LIST_KEYS, or every finished run of a workdir is redone.
RESUME_KEYS = ("dataset", "dataset_source", "model", "float_checkpoint", "float", "calibration",
               "c_selection", "setup")  # fmt: skip
RUN_LIST_KEYS = ("methods", "bits", "grids", "extra_runs", "points", "budgets",
                 "budget_candidates", "split_points", "fisher_budgets",
                 "fisher_samples")  # fmt: skip


def setup_config(config: ConfigDict) -> dict[str, Any]:
    """The config without its list of runs (``RUN_LIST_KEYS``)."""
    out = config.to_dict()
    out["quant"] = {k: v for k, v in out["quant"].items() if k not in RUN_LIST_KEYS}
    return out


def same_candidates(record: dict, q: ConfigDict) -> bool:
    """Whether a finished budget run chose from ``q.budget_candidates`` and, with the Fisher
    objective, from a Fisher over ``q.fisher_samples`` samples (others: True)."""
    alloc = record.get("allocation")
    if "fisher_samples" in record and record["fisher_samples"] != q.get("fisher_samples"):
        return False
    return alloc is None or alloc["candidates"] == sorted(q.budget_candidates)


def planned_records(finished: dict[str, dict], planned: list[runs.Run]) -> list[dict]:
    """The finished runs of the same setup that this invocation does not list: they stay in
    the results (a workdir gathers its grid over several invocations; nothing recorded is
    dropped)."""
    listed = {run.name for run in planned}
    return [r for name, r in finished.items() if name not in listed]


def finished_runs(
    workdir: Path, results: dict[str, Any], keys: tuple[str, ...] = RESUME_KEYS
) -> dict[str, dict]:
    """The successful runs of an earlier (maybe interrupted) ``results.json`` in ``workdir``
    whose recorded setup (the ``keys`` of ``results``) equals this one's, by run name, marked
    ``"resumed": True``; their saved checkpoints must still be there. Empty if there is none
    or anything differs."""
    path = workdir / "results.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    now = json.loads(to_json(results))
    if not isinstance(earlier, dict) or any(earlier.get(k) != now.get(k) for k in keys):
        logging.info("%s is from another setup: every run starts afresh", path)
        return {}
    kept = {}
    for record in earlier.get("runs", []):
        ckpt = record.get("checkpoint")
        if "error" in record or "same_as" in record:
            continue
        if ckpt and not paths.resolve_recorded(ckpt, workdir).is_dir():
            continue
        kept[record["name"]] = {**record, "resumed": True}
    if kept:
        logging.info("resuming: %d finished run(s) kept from %s", len(kept), path)
    return kept


def load_setup(config: ConfigDict, ckpt: Path) -> Setup:
    """The float model from ``ckpt``, the dataset, and the seeded calibration draw of
    ``quant.calib_size`` TRAINING images (preprocessed)."""
    ds = data.load_dataset(
        config.dataset, data_dir=config.get("data_dir"), val_size=config.val_size, seed=config.seed
    )
    logging.info("%r", ds)
    preprocess = functools.partial(data.normalize, name=config.dataset)
    q = config.quant
    model = create_model(config.model.name, **config.model.kwargs.to_dict())
    variables = checkpoints.load_float_variables(ckpt)
    picked = runs.calibration_indices(len(ds.x_train), q.calib_size, q.get("seed", 0))
    calib = preprocess(ds.x_train[picked])
    return Setup(model, variables, ds, calib, preprocess, config.eval_batch_size,
                 runs.FisherCache(image_loss(model, variables), variables["params"],
                                  list(zip(calib, ds.y_train[picked]))))  # fmt: skip


def image_loss(model: nn.Module, variables: Any) -> Callable[[Any, tuple], jax.Array]:
    """``(params, (image, label)) -> cross-entropy`` of one image in inference mode (the
    other variable collections, e.g. BatchNorm statistics, held at ``variables``')."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    kwargs = default_apply_kwargs(model)

    def loss(params: Any, sample: tuple) -> jax.Array:
        image, label = sample
        logits = model.apply({**rest, "params": params}, image[None], **kwargs)[0]
        return jax.nn.logsumexp(logits) - logits[label]

    return loss


def c_selection(q: ConfigDict) -> str:
    """How the step constant c is chosen, in words."""
    if q.get("c_grid_val"):
        return f"best validation accuracy over c in {list(q.c_grid_val)}"
    if q.scale == "search":
        return f"scale={q.scale!r} (search: chosen per layer from its calibration statistics)"
    return f"scale={q.scale!r}, c={q.get('c', 1.0)}"


def results_header(
    config: ConfigDict, workdir: Path, setup: Setup, ckpt: Path, summary: dict | None
) -> dict[str, Any]:
    """results.json before any run: the float model, data, calibration, machine, config."""
    q, ds = config.quant, setup.ds
    return {
        "dataset": config.dataset,
        "dataset_source": paths.relative_source(
            ds.source, data.resolve_data_dir(config.get("data_dir"))
        ),
        "model": config.model.name,
        "float_checkpoint": paths.relative_path(ckpt, workdir),
        "float_train_summary": summary and {k: summary.get(k) for k in TRAIN_KEYS},
        "float": {
            "val_accuracy": setup.evaluate(setup.variables, "val"),
            "test_accuracy": setup.evaluate(setup.variables, "test"),
        },
        "calibration": {
            "size": int(q.calib_size),
            "seed": q.get("seed", 0),
            "split": "train",
            "batch_size": q.calib_batch_size,
            "pool": len(ds.x_train),
            "patch_fraction": q.get("patch_fraction", 1.0),
        },
        "c_selection": c_selection(q),
        "runs": [],
        "complete": False,
        "command": paths.command_line(workdir),
        "machine": machine(),
        "config": paths.relative_config(config.to_dict(), workdir),
        "setup": paths.relative_config(setup_config(config), workdir),
    }


def machine() -> dict[str, Any]:
    """CPU count, platform, jax version and backend, as results.json records them."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def quantize_run(run: runs.Run, setup: Setup, q: ConfigDict, workdir: Path) -> dict[str, Any]:
    """Quantize, evaluate and save one run; its record (with ``error`` if it failed), with
    ``bits_per_weight`` (steps and zero points included) and, for a budget run, the fields of
    ``runs.mixed_fields``."""
    options = {
        "batch_size": q.calib_batch_size,
        "progress": False,
        "fold_batchnorm": q.get("fold_batchnorm", False),
        "bias_correction": q.get("bias_correction", False),
        "seed": q.get("seed", 0),
        "patch_fraction": q.get("patch_fraction", 1.0),
    }
    try:
        record, res = runs.execute_run(
            run,
            runs.quantizer(
                setup.model,
                setup.variables,
                setup.calib,
                run.method,
                act_order=run.act_order,
                **options,
                **runs.mixed_kwargs(run, setup, q),
            ),  # fmt: skip
            setup.evaluate,
            scale=q.scale,
            c=q.get("c", 1.0),
            per_channel=q.get("per_channel"),
            c_grid_val=q.get("c_grid_val"),
        )
        size = gq.size_report(res, setup.variables)
        record["bits_per_weight"] = runs.linear_bits_per_weight(size)
        if run.mixed:
            record.update(runs.mixed_fields(run, res, setup, q))
        if q.get("save_quantized", True):
            record["checkpoint"] = paths.relative_path(save_run(workdir, run.name, res), workdir)
    except Exception as e:  # keep going; the failure is recorded in the results
        logging.exception("run %s failed", run.name)
        return runs.failed_record(run, e)
    logging.info(
        "%s: val %s test %.4f (%.1f s)",
        run.name,
        record["val_accuracy"],
        record["test_accuracy"],
        record["seconds"]["total"],
    )
    return record


def save_run(workdir: Path, name: str, res: gq.QuantizeResult) -> Path:
    """Quantized checkpoint of one run; overwrites only inside ``workdir/quantized``."""
    path = workdir / "quantized" / name
    assert path.resolve().parent == (workdir / "quantized").resolve(), path
    return gq.save_quantized(path, res, overwrite=True)


def write_outputs(workdir: Path, results: dict) -> None:
    """results.json, results.md and the two plots, each replaced atomically."""
    write_json_atomic(workdir / "results.json", results)
    write_text_atomic(workdir / "results.md", reports.results_markdown(results))
    if runs.successful(results["runs"]):
        plots.plot_accuracy_vs_bits(results, workdir / "accuracy_vs_bits.png")
        plots.plot_layer_errors(results, workdir / "layer_errors.png")


__all__ = [
    "Setup",
    "add_record",
    "c_selection",
    "load_setup",
    "machine",
    "quantize_experiment",
    "quantize_run",
    "results_header",
    "finished_runs",
    "save_run",
    "write_outputs",
]
