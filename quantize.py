"""Quantize a trained float model with GPFQ, RTN and GPTQ and report accuracies.

    python quantize.py --config=configs/mnist_mlp.py --workdir=workdirs/results/mnist_mlp \
        [--config.quant.bits="(3, 4)" --config.quant.methods="('gpfq',)" ...]
    python quantize.py --config=configs/width_sweep.py --workdir=workdirs/results/width_sweep

Float checkpoint: ``config.float_checkpoint`` (a train.py workdir or its ``float/``; relative
paths are tried against the current directory, then the repository) if present, else
``<workdir>/float``; if neither exists, trains into ``<workdir>`` when
``config.train_if_missing`` is True, else exits naming the paths and the train.py command.
Calibration images are a seeded draw (``quant.seed``) of ``quant.calib_size`` images from the
TRAINING split. Every method x (grids x bits + extra_runs) run is quantized, evaluated on the
validation and test splits and saved. Written into ``--workdir`` (atomically, after each
run): results.json, results.md, accuracy_vs_bits.png, layer_errors.png and
quantized/<method>_<grid>_<bits>/ (gq.save_quantized). A failed run is recorded with its
error and the others go on; the float checkpoint is only read.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

import gpfq_jax as gq
import train  # defines train.py's flags; ours below replace them (same names)
from experiments import data
from experiments import runs as ex
from experiments import training as tr
from experiments.models import create_model

REPO = Path(__file__).resolve().parent
TRAIN_KEYS = ("test_accuracy", "val_accuracy", "epochs", "seconds", "dataset_source")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True, allow_override=True
)
flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (results, plots, quantized checkpoints).",
    allow_override=True,
)
flags.mark_flags_as_required(["config", "workdir"])


# --------------------------------------------------------------------------- float model


def float_checkpoint_candidates(config: ConfigDict, workdir: Path) -> list[Path]:
    """Where the float checkpoint may be, in order of preference."""
    out = []
    if config.get("float_checkpoint"):
        p = Path(config.float_checkpoint).expanduser()
        out += [p] if p.is_absolute() else [Path.cwd() / p, REPO / p]
    return [*dict.fromkeys(out), workdir / tr.FLOAT_DIR]


def has_checkpoint(path: Path) -> bool:
    """True if ``path`` (a float/ dir or a train.py workdir) holds a float checkpoint."""
    return any((p / "_CHECKPOINT_METADATA").exists() for p in (path, path / tr.FLOAT_DIR))


def train_command(config_file: str, workdir: Path) -> str:
    return f"python train.py --config={config_file} --workdir={workdir}"


def float_checkpoint(config: ConfigDict, workdir: Path, config_file: str) -> Path:
    """The float checkpoint to quantize; trains one into ``workdir`` if allowed and missing."""
    candidates = float_checkpoint_candidates(config, workdir)
    found = next((p for p in candidates if has_checkpoint(p)), None)
    if found is not None:
        return found
    if config.get("train_if_missing", False):
        logging.info(
            "no float checkpoint at %s: training first into %s",
            ", ".join(map(str, candidates)),
            workdir,
        )
        train.train_and_evaluate(config, workdir)
        return workdir / tr.FLOAT_DIR
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


# --------------------------------------------------------------------------- outputs


def write_outputs(workdir: Path, results: dict) -> None:
    """results.json, results.md and the two plots, each replaced atomically."""
    tr.write_json_atomic(workdir / "results.json", results)
    ex.write_text_atomic(workdir / "results.md", ex.results_markdown(results))
    if any("error" not in r for r in results["runs"]):
        ex.plot_accuracy_vs_bits(results, workdir / "accuracy_vs_bits.png")
        ex.plot_layer_errors(results, workdir / "layer_errors.png")


def save_run(workdir: Path, name: str, res: gq.QuantizeResult) -> Path:
    """Quantized checkpoint of one run; overwrites only inside ``workdir/quantized``."""
    path = workdir / "quantized" / name
    assert path.resolve().parent == (workdir / "quantized").resolve(), path
    return gq.save_quantized(path, res, overwrite=True)


# --------------------------------------------------------------------------- experiments


def quantize_experiment(config: ConfigDict, workdir: Path, config_file: str) -> dict:
    """The whole-model experiment: every run of the config; returns the results dict."""
    t_start = time.time()
    q = config.quant
    ckpt = float_checkpoint(config, workdir, config_file)
    summary = train_summary(ckpt)
    check_split(config, summary)
    ds = data.load_dataset(
        config.dataset, data_dir=config.get("data_dir"), val_size=config.val_size, seed=config.seed
    )
    logging.info("%r", ds)
    model = create_model(config.model.name, **config.model.kwargs.to_dict())
    variables = tr.load_float_variables(ckpt)
    preprocess = functools.partial(data.normalize, name=config.dataset)
    splits = {"val": (ds.x_val, ds.y_val), "test": (ds.x_test, ds.y_test)}

    def evaluate(v: Any, split: str) -> float | None:
        x, y = splits[split]
        if not len(x):
            return None
        return tr.evaluate(model, v, x, y, batch_size=config.eval_batch_size, preprocess=preprocess)

    seed = q.get("seed", 0)
    calib = preprocess(ex.calibration_images(ds.x_train, q.calib_size, seed))
    runs = ex.run_grid(q.methods, q.grids, q.bits, q.get("extra_runs") or ())
    c_grid = q.get("c_grid_val")
    results = {
        "dataset": config.dataset,
        "dataset_source": ds.source,
        "model": config.model.name,
        "float_checkpoint": str(ckpt),
        "float_train_summary": summary and {k: summary.get(k) for k in TRAIN_KEYS},
        "float": {
            "val_accuracy": evaluate(variables, "val"),
            "test_accuracy": evaluate(variables, "test"),
        },
        "calibration": {
            "size": int(q.calib_size),
            "seed": seed,
            "split": "train",
            "batch_size": q.calib_batch_size,
            "pool": len(ds.x_train),
            "patch_fraction": q.get("patch_fraction", 1.0),
        },
        "c_selection": (
            f"best validation accuracy over c in {list(c_grid)}"
            if c_grid
            else f"scale={q.scale!r} (search: chosen per layer from its calibration statistics)"
            if q.scale == "search"
            else f"scale={q.scale!r}, c={q.get('c', 1.0)}"
        ),
        "runs": [],
        "complete": False,
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "config": config.to_dict(),
    }
    logging.info("float: %s", results["float"])
    options = {
        "batch_size": q.calib_batch_size,
        "progress": False,
        "fold_batchnorm": q.get("fold_batchnorm", False),
        "bias_correction": q.get("bias_correction", False),
        "seed": seed,
        "patch_fraction": results["calibration"]["patch_fraction"],
    }
    done: dict[ex.Run, dict] = {}
    for run in tqdm(runs, desc="runs", unit="run", dynamic_ncols=True):
        twin = ex.same_alphabet(run, done)
        if twin is not None:
            results["runs"].append(ex.reused_record(done[twin], run))
            continue
        try:
            record, res = ex.execute_run(
                run,
                ex.quantizer(model, variables, calib, run.method, **options),
                evaluate,
                scale=q.scale,
                c=q.get("c", 1.0),
                per_channel=q.get("per_channel"),
                c_grid_val=c_grid,
            )
            if q.get("save_quantized", True):
                record["checkpoint"] = str(save_run(workdir, run.name, res))
            logging.info(
                "%s: val %s test %.4f (%.1f s)",
                run.name,
                record["val_accuracy"],
                record["test_accuracy"],
                record["seconds"]["total"],
            )
            done[run] = record
        except Exception as e:  # keep going; the failure is recorded in the results
            logging.exception("run %s failed", run.name)
            record = {
                "name": run.name,
                "method": run.method,
                "grid": run.grid,
                "bits": run.bits,
                "error": f"{type(e).__name__}: {e}",
            }
        results["runs"].append(record)
        results["seconds_total"] = time.time() - t_start
        write_outputs(workdir, results)
    results["complete"] = True
    results["seconds_total"] = time.time() - t_start
    write_outputs(workdir, results)
    return results


def width_sweep_experiment(config: ConfigDict, workdir: Path) -> dict:
    """The width sweep (no checkpoint): width_sweep.{json,md,png} in ``workdir``."""
    t_start = time.time()
    s = config.sweep
    spec = gq.QuantSpec(
        bits=s.bits, grid=s.grid, scale=s.scale, c=s.get("c", 1.0), per_channel=s.get("per_channel")
    )
    max_width = {"gptq": s.gptq_max_width} if s.get("gptq_max_width") else None
    result = ex.width_sweep(
        list(s.widths), s.m, s.neurons, list(s.seeds), spec, tuple(s.methods), max_width
    )
    result["tail_slope"] = ex.tail_slopes(result, s.m)
    result.update(
        seconds_total=time.time() - t_start,
        config=config.to_dict(),
        command=shlex.join([os.path.basename(sys.executable), *sys.argv]),
        machine={"cpus": os.cpu_count(), "jax": jax.__version__},
    )
    tr.write_json_atomic(workdir / "width_sweep.json", result)
    ex.write_text_atomic(workdir / "width_sweep.md", ex.width_sweep_markdown(result))
    ex.plot_width_sweep(result, workdir / "width_sweep.png")
    return result


def enable_compilation_cache() -> None:
    """Persist XLA compilations across invocations (``$GPFQ_CACHE_DIR``/xla, default
    ~/.cache/gpfq_jax/xla) unless ``JAX_COMPILATION_CACHE_DIR`` already chose a directory."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(data.resolve_cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    enable_compilation_cache()
    logging.get_absl_handler().addFilter(train._QuietOrbax())
    config, workdir = FLAGS.config, Path(FLAGS.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    experiment = config.get("experiment", "quantize")
    if experiment == "width_sweep":
        result = width_sweep_experiment(config, workdir)
        print(ex.width_sweep_markdown(result))
    elif experiment == "quantize":
        results = quantize_experiment(
            config, workdir, config_flags.get_config_filename(FLAGS["config"])
        )
        print(ex.accuracy_table(results))
        if any("error" in r for r in results["runs"]):
            sys.exit(1)
    else:
        raise app.UsageError(
            f"unknown config.experiment {experiment!r}; expected 'quantize' or 'width_sweep'"
        )


if __name__ == "__main__":
    app.run(main)
