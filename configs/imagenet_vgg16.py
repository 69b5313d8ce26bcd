"""ImageNet (ILSVRC2012), VGG-16 (torchvision layout): whole-model GPFQ at scale.

Reference: JMLR 2021 / SIMODS 2023 ImageNet experiments (configuration D, no BatchNorm).

    python quantize.py --config=configs/imagenet_vgg16.py --config.weights=/path/to/ckpt
    python quantize.py --config=configs/imagenet_vgg16.py:quick   # calib_size 256

ImageNet is NOT available on this machine (and is never downloaded by this project). A user
who has it loads it with tensorflow-datasets: imagenet2012 requires a manual download of the
ILSVRC2012 tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) into
``~/tensorflow_datasets/downloads/manual/`` (or any folder passed as tfds ``manual_dir``),
then ``tfds.builder("imagenet2012", data_dir=...)`` prepares it; set ``data_dir`` here.

No pretrained Flax weights are shipped. ``weights`` is the path to a user-provided Flax
checkpoint of ``{"params", "batch_stats"}`` for ``gpfq_jax.imagenet_models.VGG16``; a user
converts their own (e.g. from torchvision: module names follow torchvision's state-dict keys,
conv kernels go OIHW -> HWIO, dense kernels are transposed).
classifier_0's rows must also be permuted from torchvision's (C, H, W) flatten order
to this model's (H, W, C).
``weights=None`` means random weights from ``gpfq_jax.imagenet_models.init_variables`` and
``synthetic_images`` inputs: for timing and memory only, accuracies are meaningless.
Import ``gpfq_jax.imagenet_models`` before ``gpfq_jax.models.create_model`` (it registers
"vgg16" on import), or call ``create_imagenet_model`` directly.
Training fields mirror the other configs (torchvision's recipe) so the shared scripts parse
this file; training on ImageNet is not intended here.
"""

import ml_collections

from gpfq_jax.config_defaults import imagenet


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    # classifier_0 has 25088 inputs: H, G, F take 2.5 GB each, hence smaller batches.
    return imagenet("vgg16", {"use_bn": False}, variant, zzs_c=0.975,  # SIMODS constant
                    calib_batch_size=32, eval_batch_size=100, learning_rate=0.01,
                    weight_decay=5e-4)
