"""MNIST, JMLR MLP 784-500-300-10 with BatchNorm (the JMLR paper's first experiment).

python train.py --config=configs/mnist_mlp.py --workdir=workdirs/mnist_mlp
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.experiment(
        "mnist",
        "mlp",
        {"features": (500, 300)},
        num_epochs=20,  # ~2 s/epoch on 2 CPU cores
        float_checkpoint="checkpoints/mnist_mlp",
        quant_overrides={
            "calib_size": 25000,
            "calib_batch_size": 1000,
            "extra_runs": (("ls", "ternary"), ("int_full", 2)),
        },
    )
