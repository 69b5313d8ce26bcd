"""CIFAR-10 (JPEG q75 copy), ResNet-20 (He et al. 2016, 1x1 projection shortcuts), 0.27M params.

python train.py --config=configs/cifar10_resnet20.py --workdir=workdirs/cifar10_resnet20
Epoch count sized for ~35 minutes on 2 CPU cores; raise --config.num_epochs for accuracy.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"  # "cifar10_exact" for the 4000/1000 exact subset
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None -> $GPFQ_DATA_DIR
    c.model = ml_collections.ConfigDict(
        {"name": "resnet20", "kwargs": {"widths": (16, 32, 64), "blocks": 3}}
    )
    c.seed = 0
    c.batch_size = 64  # small batches run fastest per image on CPU
    c.eval_batch_size = 1000
    c.num_epochs = 4  # ~9 min/epoch on 2 shared CPU cores; 30+ for ~91%
    c.optimizer = "sgd"  # "adamw" | "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9  # sgd only
    c.weight_decay = 5e-4
    c.warmup_epochs = 0.5
    c.augment = True  # random crop (4 px) + horizontal flip
    c.val_size = 5000
    c.limit_train = ml_collections.config_dict.placeholder(int)  # None: all
    c.checkpoints_to_keep = 3
    # quantize.py: the float model (committed; from train.py, see its train_summary.json).
    # Missing: <workdir>/float, else an error naming the train.py command.
    c.float_checkpoint = "checkpoints/cifar10_resnet20"
    c.train_if_missing = False

    c.quant = ml_collections.ConfigDict()
    c.quant.calib_size = 5000
    c.quant.calib_batch_size = 500
    c.quant.methods = ("gpfq", "rtn", "gptq")
    c.quant.bits = ("ternary", 2, 3, 4)
    c.quant.grids = ("int",)
    # Besides grids x bits, these (grid, bits) pairs are run for every method.
    c.quant.extra_runs = ()
    c.quant.scale = "search"  # c chosen per layer from the calibration statistics
    c.quant.c = 1.0  # centre of the search (or the constant itself for a fixed rule)
    # None: the grid's default (per channel for int/int_full, per layer for ls/zzs)
    c.quant.per_channel = ml_collections.config_dict.placeholder(bool)
    # A tuple of c values: the grid's base rule with the c of best VALIDATION accuracy.
    c.quant.c_grid_val = ml_collections.config_dict.placeholder(tuple)
    c.quant.seed = 0  # calibration draw from the training split
    # Fraction of rows kept per calibration batch for the statistics: 1.0 uses every conv
    # patch; the SIMODS code kept 0.25 of them (about 2x faster here, but the driver then
    # also subsamples the Dense layers' rows).
    c.quant.patch_fraction = 1.0
    c.quant.fold_batchnorm = False
    c.quant.bias_correction = False
    c.quant.save_quantized = True
    return c
