"""Train a float model for GPFQ experiments.

    python train.py --config=configs/mnist_mlp.py --workdir=workdirs/mnist_mlp \
        [--config.num_epochs=3 --config.limit_train=5000 ...]

Writes into ``--workdir``:
  checkpoints/          orbax CheckpointManager (last few epochs); an interrupted run resumes
                        from the latest one when started again with the same workdir
  metrics.json          list of per-epoch dicts (train loss/accuracy, val/test accuracy, seconds)
  float/                orbax checkpoint of {"params", "batch_stats"} (see
                        ``experiments.checkpoints.load_float_variables``)
  train_summary.json    final accuracies, config, seconds, dataset source (paths relative:
                        ``experiments.paths``)
Data come from ``--config.data_dir`` or ``$GPFQ_DATA_DIR`` (see ``experiments.data``). The
work is done by ``experiments.training.train_and_evaluate(config, workdir)``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from experiments import cli, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the float model.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    training.train_and_evaluate(FLAGS.config, cli.checked_workdir(FLAGS.workdir))


if __name__ == "__main__":
    cli.run(main)
