"""ImageNet (ILSVRC2012), ResNet-50 (torchvision layout): whole-model GPFQ at scale.

Reference: SIMODS 2023 code: 4 bits 74.34 top-1 with last-layer bias correction, float 76.13.

    python quantize.py --config=configs/imagenet_resnet50.py --config.weights=/path/to/ckpt
    python quantize.py --config=configs/imagenet_resnet50.py:quick   # calib_size 256

ImageNet is NOT available on this machine (and is never downloaded by this project). A user
who has it loads it with tensorflow-datasets: imagenet2012 requires a manual download of the
ILSVRC2012 tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) into
``~/tensorflow_datasets/downloads/manual/`` (or any folder passed as tfds ``manual_dir``),
then ``tfds.builder("imagenet2012", data_dir=...)`` prepares it; set ``data_dir`` here.

No pretrained Flax weights are shipped. ``weights`` is the path to a user-provided Flax
checkpoint of ``{"params", "batch_stats"}`` for ``gpfq_jax.imagenet_models.ResNet50``; a user
converts their own (e.g. from torchvision: module names follow torchvision's state-dict keys,
conv kernels go OIHW -> HWIO, dense kernels are transposed).
``weights=None`` means random weights from ``gpfq_jax.imagenet_models.init_variables`` and
``synthetic_images`` inputs: for timing and memory only, accuracies are meaningless.
Import ``gpfq_jax.imagenet_models`` before ``gpfq_jax.models.create_model`` (it registers
"resnet50" on import), or call ``create_imagenet_model`` directly.
Training fields mirror the other configs (torchvision's recipe) so the shared scripts parse
this file; training on ImageNet is not intended here.
"""

import ml_collections

from gpfq_jax.config_defaults import imagenet


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    return imagenet("resnet50", {}, variant, zzs_c=1.81)  # SIMODS code's zzs constant
