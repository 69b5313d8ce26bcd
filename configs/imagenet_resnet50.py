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


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """``variant``: "" (the paper's setting) or "quick" (256 calibration images)."""
    if variant not in ("", "quick"):
        raise ValueError(f"unknown variant {variant!r}; use '' or 'quick'")
    c = ml_collections.ConfigDict()
    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir (manual_dir inside)
    c.weights = ml_collections.config_dict.placeholder(str)  # Flax checkpoint; None: random init
    c.image_size = 224  # center crop after resizing the short side to 256
    c.model = ml_collections.ConfigDict({"name": "resnet50", "kwargs": {}})
    c.seed = 0
    c.batch_size = 256
    c.eval_batch_size = 250
    c.num_epochs = 90
    c.optimizer = "sgd"  # "adamw" | "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9  # sgd only
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.0
    c.augment = False
    c.val_size = 0
    c.limit_train = ml_collections.config_dict.placeholder(int)  # None: all
    c.checkpoints_to_keep = 3

    c.quant = ml_collections.ConfigDict()
    # m = 2048 as for ResNet-18 in the SIMODS paper; 256 for the quick run.
    c.quant.calib_size = 256 if variant == "quick" else 2048
    c.quant.calib_batch_size = 64
    c.quant.methods = ("gpfq", "rtn", "gptq")
    c.quant.bits = (3, 4, 5)
    c.quant.grids = ("zzs", "int")
    c.quant.scale = "search"
    c.quant.c = 1.81  # the SIMODS code's zzs constant for ResNet-50 (center of the search)
    c.quant.per_channel = True  # int grid; zzs is per layer by definition
    return c
