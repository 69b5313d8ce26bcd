"""Quick first run: MNIST MLP 784-500-300-10 for 3 epochs (under a minute on 2 CPU cores).

python train.py --config=configs/default.py --workdir=workdirs/default
"""

import ml_collections

from experiments.config_defaults import experiment


def get_config() -> ml_collections.ConfigDict:
    # No committed checkpoint: <workdir>/float, trained there first (3 epochs) if missing.
    return experiment(
        "mnist",
        "mlp",
        {"features": (500, 300)},
        num_epochs=3,
        train_if_missing=True,
        quant_overrides={"calib_batch_size": 1000},
    )
