"""ImageNet (ILSVRC2012), ResNet-18 (torchvision layout): whole-model GPFQ at scale.

Reference: SIMODS 2023 code, m = 2048: 3/4/5 bits 65.81 / 68.13 / 69.04 top-1, float 69.76.

The paper's settings (``:quick`` for calib_size 256). quantize.py cannot run this config
yet: ``experiments.data`` has no imagenet2012 loader and quantize.py does not read ``weights``.
ImageNet-shape timing with random weights: ``python benchmarks/scale.py``. Library use:
``experiments.imagenet_models`` + ``gpfq_jax.quantize_params`` on your own images and weights.

ImageNet is not available on this machine; how to provide it and weights (a Flax checkpoint
for ``experiments.imagenet_models.ResNet18``): ``configs.default.imagenet``.
"""

import ml_collections

from configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    return default.imagenet("resnet18", {}, variant, zzs_c=1.16)  # SIMODS code's zzs constant
