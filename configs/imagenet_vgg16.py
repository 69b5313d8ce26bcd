"""ImageNet (ILSVRC2012), VGG-16 (torchvision layout): whole-model GPFQ at scale.

Reference: JMLR 2021 / SIMODS 2023 ImageNet experiments (configuration D, no BatchNorm).

The paper's settings (``:quick`` for calib_size 256). quantize.py cannot run this config
yet: ``experiments.data`` has no imagenet2012 loader and quantize.py does not read ``weights``.
ImageNet-shape timing with random weights: ``python benchmarks/scale.py``. Library use:
``experiments.imagenet_models`` + ``gpfq_jax.quantize_params`` on your own images and weights.

ImageNet is not available on this machine; how to provide it and weights (a Flax checkpoint
for ``experiments.imagenet_models.VGG16``): ``configs.default.imagenet``.
classifier_0's rows must be permuted from torchvision's (C, H, W) flatten order to (H, W, C).
"""

import ml_collections

from configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    # classifier_0 has 25088 inputs: H, G, F take 2.5 GB each, hence smaller batches.
    return default.imagenet(
        "vgg16",
        {"use_bn": False},
        variant,
        zzs_c=0.975,  # SIMODS constant
        calib_batch_size=32,
        eval_batch_size=100,
        learning_rate=0.01,
        weight_decay=5e-4,
    )
