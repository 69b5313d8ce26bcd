"""CIFAR-10 (JPEG q75 copy), ResNet-20 (He et al. 2016, 1x1 projection shortcuts), 0.27M params.

python train.py --config=configs/cifar10_resnet20.py --workdir=workdirs/cifar10_resnet20
Epoch count sized for ~35 minutes on 2 CPU cores; raise --config.num_epochs for accuracy.
"""

import ml_collections

from gpfq_jax.config_defaults import experiment


def get_config() -> ml_collections.ConfigDict:
    return experiment(
        "cifar10",  # "cifar10_exact" for the 4000/1000 exact subset
        "resnet20", {"widths": (16, 32, 64), "blocks": 3},
        batch_size=64,  # small batches run fastest per image on CPU
        num_epochs=4,  # ~9 min/epoch on 2 shared CPU cores; 30+ for ~91%
        optimizer="sgd", learning_rate=0.1, weight_decay=5e-4, warmup_epochs=0.5,
        augment=True, float_checkpoint="checkpoints/cifar10_resnet20")
