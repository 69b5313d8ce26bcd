"""Fashion-MNIST, the JMLR MLP 784-500-300-10 with BatchNorm.

python train.py --config=configs/fashion_mnist_mlp.py --workdir=workdirs/fashion_mnist_mlp
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    # data: $GPFQ_DATA_DIR, then /usr/share/datasets/fashion-mnist (Debian package)
    return default.experiment(
        "fashion_mnist",
        "mlp",
        {"features": (500, 300)},
        num_epochs=30,  # ~2 s/epoch on 2 CPU cores
        float_checkpoint="checkpoints/fashion_mnist_mlp",
        quant_overrides={
            "calib_size": 25000,
            "calib_batch_size": 1000,
            "extra_runs": (("ls", "ternary"), ("int_full", 2)),
        },
    )
