"""CIFAR-10 (JPEG q75 copy), ResNet-20 (He et al. 2016, 1x1 projection shortcuts), 0.27M params.

python train.py --config=configs/cifar10_resnet20.py --workdir=workdirs/cifar10_resnet20
The committed checkpoint (checkpoints/cifar10_resnet20): 3 epochs with --config.num_epochs=3,
then resumed in the same workdir with --config.num_epochs=7 (a cosine warm restart at epoch 3);
~5 min/epoch on 2 CPU cores. Raise --config.num_epochs for accuracy (30+ for ~91%).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.experiment(
        "cifar10",  # "cifar10_exact" for the 4000/1000 exact subset
        "resnet20",
        {"widths": (16, 32, 64), "blocks": 3},
        batch_size=64,  # small batches run fastest per image on CPU
        num_epochs=7,
        optimizer="sgd",
        learning_rate=0.1,
        weight_decay=5e-4,
        warmup_epochs=0.5,
        augment=True,
        float_checkpoint="checkpoints/cifar10_resnet20",
        # 2-bit "int" is the ternary alphabet; the 4-level 2-bit grid is reported as well
        quant_overrides={
            "extra_runs": (("int_full", 2),),
            # 25% of the conv patches (the SIMODS code's setting): ~3.5 instead of
            # ~6 min per run on 2 CPU cores at m = 5,000
            "patch_fraction": 0.25,
        },
    )
