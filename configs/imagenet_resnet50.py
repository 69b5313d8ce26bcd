"""ImageNet (ILSVRC2012), ResNet-50 (torchvision layout): whole-model GPFQ at scale.

Reference: SIMODS 2023 code: 4 bits 74.34 top-1 with last-layer bias correction, float 76.13.

The paper's settings (``:quick`` for calib_size 256). quantize.py cannot run this config
yet: ``experiments.data`` has no imagenet2012 loader and quantize.py does not read ``weights``.
ImageNet-shape timing with random weights: ``python benchmarks/scale.py``. Library use:
``experiments.imagenet_models`` + ``gpfq_jax.quantize_params`` on your own images and weights.

ImageNet is not available on this machine; how to provide it and weights (a Flax checkpoint
for ``experiments.imagenet_models.ResNet50``): ``configs.default.imagenet``.
"""

import ml_collections

from configs import default


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    return default.imagenet("resnet50", {}, variant, zzs_c=1.81)  # SIMODS code's zzs constant
