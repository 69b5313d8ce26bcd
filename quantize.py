"""Quantize a trained float model with GPFQ, RTN and GPTQ and report accuracies.

    python quantize.py --config=configs/mnist_mlp.py --workdir=workdirs/results/mnist_mlp \
        [--config.quant.bits="(3, 4)" --config.quant.methods="('gpfq',)" ...]
    python quantize.py --config=configs/width_sweep.py --workdir=workdirs/results/width_sweep
    python quantize.py --config=configs/smollm2.py --workdir=workdirs/smollm2

Float checkpoint: ``config.float_checkpoint`` (a train.py workdir or its ``float/``; relative
paths are tried against the current directory, then the repository) if present, else
``<workdir>/float``; if neither exists, trains into ``<workdir>`` when
``config.train_if_missing`` is True, else exits naming the paths and the train.py command.
Calibration images are a seeded draw (``quant.seed``) of ``quant.calib_size`` images from the
TRAINING split. Every method x (grids x bits + extra_runs) run is quantized, evaluated on the
validation and test splits and saved. Written into ``--workdir`` (atomically, after each
run): results.json, results.md, accuracy_vs_bits.png, layer_errors.png and
quantized/<method>_<grid>_<bits>/ (gq.save_quantized). A failed run is recorded with its
error, the others go on, and the exit status is 1; the float checkpoint is only read.
Rerun with the same workdir and setup, quantize.py keeps the finished runs of results.json
(marked "resumed") and does the rest; use a new workdir (or delete results.json) to redo them.

The work is done by ``experiments.quantization.quantize_experiment(config, workdir)``
(``config.experiment = "quantize"``, the default) or
``experiments.width_sweep.width_sweep_experiment(config, workdir)`` ("width_sweep") or
``experiments.lm_quantization.lm_experiment(config, workdir)`` ("lm": configs/smollm2.py,
perplexity instead of accuracy).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import cli, lm_quantization, lm_reports, quantization, reports, width_sweep

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Output directory (results, plots, quantized checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    cli.enable_compilation_cache()
    config, workdir = FLAGS.config, cli.checked_workdir(FLAGS.workdir)
    experiment = config.get("experiment", "quantize")
    if experiment == "width_sweep":
        result = width_sweep.width_sweep_experiment(config, workdir)
        print(reports.width_sweep_markdown(result))
    elif experiment == "lm":
        results = lm_quantization.lm_experiment(config, workdir)
        print(lm_reports.perplexity_table(results))
        if any("error" in r for r in results["runs"]):
            sys.exit(1)
    elif experiment == "quantize":
        config_file = config_flags.get_config_filename(FLAGS["config"])
        results = quantization.quantize_experiment(config, workdir, config_file)
        print(reports.accuracy_table(results))
        if any("error" in r for r in results["runs"]):
            sys.exit(1)
    else:
        raise app.UsageError(
            f"unknown config.experiment {experiment!r}; expected 'quantize', 'lm' or 'width_sweep'"
        )


if __name__ == "__main__":
    cli.run(main)
