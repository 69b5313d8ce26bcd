"""The README's first run, and the defaults every config in configs/ shares.

    python quantize.py --config=configs/default.py --workdir=workdirs/default

:func:`get_config` quantizes the COMMITTED float MNIST MLP (``checkpoints/mnist_mlp``, see its
``train_summary.json``) with GPFQ, RTN and GPTQ at ternary and 4 bits, calibrating on 5,000
training images instead of mnist_mlp.py's 25,000: 6 runs, under a minute on 2 CPU cores (26 s
measured). It does not train: without the checkpoint it stops and names the train.py command.

The other configs call :func:`experiment` (or :func:`imagenet`) with what makes them
different (Flax examples' style: ``from configs import default``); everything else, and what
each field means, is defined once here. Mixed precision is off by default; e.g.
``--config.quant.budgets="((3.0, None),)"`` adds one run per method x grid whose layer widths
are chosen under 3.0 bits per weight (steps included).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict


def quant(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``quant`` sub-config read by quantize.py."""
    q = ml_collections.ConfigDict()
    q.calib_size = 5000
    q.calib_batch_size = 500
    q.methods = ("gpfq", "rtn", "gptq")
    q.bits = ("ternary", 2, 3, 4)
    q.grids = ("int",)
    # Besides grids x bits, these (grid, bits) pairs are run for every method.
    q.extra_runs = ()
    # Mixed precision (experiments/quantization.py docstring): (bits per weight, group size)
    # pairs, each adding one run per method x grid after the uniform runs ("gpfq_int_b3.0";
    # group size None: the grid's per-channel or per-layer steps). Each layer's width comes from
    # budget_candidates so that the average storage (codes, float32 steps, zero points) stays
    # within the budget: per channel the steps add 32 / fan_in bits per weight, so the floor
    # (every layer at 2 bits) is a little above 2. E.g. ((3.0, None), (2.5, None)).
    q.budgets = ()
    q.budget_candidates = (2, 3, 4, 8)
    # fisher_budgets: budgets as above whose widths minimise the loss increase the diagonal
    # Fisher predicts, 1/2 sum F (Q - W)^2 (gpfq_jax.core.fisher), instead of the summed layer
    # errors ("gpfq_int_b3.0fisher"). F: mean squared gradient of the cross-entropy, one per
    # image, over the first fisher_samples calibration images (training split, own labels).
    q.fisher_budgets = ()
    q.fisher_samples = 1000
    q.scale = "search"  # c chosen per layer from the calibration statistics
    q.c = 1.0  # centre of the search (or the constant itself for a fixed rule)
    # None: the grid's default (per channel for int/int_full, per layer for ls/zzs)
    q.per_channel = config_dict.placeholder(bool)
    # A tuple of c values: the grid's base rule with the c of best VALIDATION accuracy.
    q.c_grid_val = config_dict.placeholder(tuple)
    q.seed = 0  # calibration draw from the training split
    # Fraction of conv patch rows kept per calibration batch for the statistics: 1.0 uses
    # every patch; the SIMODS code kept 0.25 of them. Dense layers always keep every row.
    q.patch_fraction = 1.0
    q.fold_batchnorm = False
    q.bias_correction = False
    q.save_quantized = True
    q.update(overrides)
    return q


def experiment(
    dataset: str,
    model: str,
    model_kwargs: dict,
    *,
    quant_overrides: dict | None = None,
    **overrides: Any,
) -> ml_collections.ConfigDict:
    """A train.py + quantize.py config: defaults (AdamW MLP training) updated by ``overrides``."""
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.data_dir = config_dict.placeholder(str)  # None -> $GPFQ_DATA_DIR (then tfds)
    c.model = ml_collections.ConfigDict({"name": model, "kwargs": model_kwargs})
    c.seed = 0
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 20
    c.optimizer = "adamw"  # "adamw" | "sgd"
    c.learning_rate = 1e-3
    c.momentum = 0.9  # sgd only
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.0
    c.augment = False  # random crop (4 px) + horizontal flip; CIFAR only
    c.val_size = 5000
    c.limit_train = config_dict.placeholder(int)  # None: all
    c.checkpoints_to_keep = 3
    # quantize.py: the float model (committed; from train.py, see its train_summary.json).
    # None or missing: <workdir>/float, trained there first if train_if_missing, else an
    # error naming the train.py command.
    c.float_checkpoint = config_dict.placeholder(str)
    c.train_if_missing = False
    c.update(overrides)
    c.quant = quant(**(quant_overrides or {}))
    return c


def imagenet(
    model: str,
    model_kwargs: dict,
    variant: str,
    *,
    zzs_c: float,
    calib_batch_size: int = 64,
    **overrides: Any,
) -> ml_collections.ConfigDict:
    """ImageNet (tfds imagenet2012, manual download) whole-model configs.

    ``variant``: "" (m = 2048 calibration images, as the SIMODS paper) or "quick" (256).
    ``zzs_c``: the SIMODS code's constant for the "zzs" grid (centre of the step search).

    ImageNet is NOT available on this machine (and is never downloaded by this project). A
    user who has it loads it with tensorflow-datasets: imagenet2012 requires a manual download
    of the ILSVRC2012 tars (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) into
    ``~/tensorflow_datasets/downloads/manual/`` (or any folder passed as tfds ``manual_dir``),
    then ``tfds.builder("imagenet2012", data_dir=...)`` prepares it; set ``data_dir``.

    No pretrained Flax weights are shipped. ``weights`` is the path to a user-provided Flax
    checkpoint of ``{"params", "batch_stats"}``; a user converts their own (e.g. from
    torchvision: module names follow torchvision's state-dict keys, conv kernels go
    OIHW -> HWIO, dense kernels are transposed). ``weights=None`` means random weights from
    ``experiments.imagenet_models.init_variables`` and ``synthetic_images`` inputs: for timing
    and memory only. Import ``experiments.imagenet_models`` before
    ``experiments.models.create_model`` (it registers the names on import). Training fields
    mirror the other configs (torchvision's recipe); training on ImageNet is not intended here.
    """
    if variant not in ("", "quick"):
        raise ValueError(f"unknown variant {variant!r}; use '' or 'quick'")
    defaults = dict(
        batch_size=256,
        eval_batch_size=250,
        num_epochs=90,
        optimizer="sgd",
        learning_rate=0.1,
        val_size=0,
    )
    c = experiment(
        "imagenet2012",
        model,
        model_kwargs,
        **{**defaults, **overrides},
        quant_overrides={
            "calib_size": 256 if variant == "quick" else 2048,
            "calib_batch_size": calib_batch_size,
            "bits": (3, 4, 5),
            "grids": ("zzs", "int"),
            "c": zzs_c,
            "per_channel": True,
        },
    )  # int grid; zzs is per layer
    c.weights = config_dict.placeholder(str)  # Flax checkpoint; None: random init
    c.image_size = 224  # center crop after resizing the short side to 256
    return c


def get_config() -> ml_collections.ConfigDict:
    """Quick run on the committed MNIST MLP (the README's first command)."""
    return experiment(
        "mnist",
        "mlp",
        {"features": (500, 300)},
        num_epochs=20,  # as configs/mnist_mlp.py (the checkpoint's training settings)
        float_checkpoint="checkpoints/mnist_mlp",
        quant_overrides={"calib_size": 5000, "calib_batch_size": 1000, "bits": ("ternary", 4)},
    )
