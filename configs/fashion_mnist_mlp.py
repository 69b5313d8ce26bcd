"""Fashion-MNIST, the JMLR MLP 784-500-300-10 with BatchNorm.

python train.py --config=configs/fashion_mnist_mlp.py --workdir=workdirs/fashion_mnist_mlp
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "fashion_mnist"
    # None -> $GPFQ_DATA_DIR, then /usr/share/datasets/fashion-mnist (Debian package)
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.model = ml_collections.ConfigDict({"name": "mlp", "kwargs": {"features": (500, 300)}})
    c.seed = 0
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 30  # ~2 s/epoch on 2 CPU cores
    c.optimizer = "adamw"  # "adamw" | "sgd"
    c.learning_rate = 1e-3
    c.momentum = 0.9  # sgd only
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.0
    c.augment = False  # random crop (4 px) + horizontal flip; CIFAR only
    c.val_size = 5000
    c.limit_train = ml_collections.config_dict.placeholder(int)  # None: all
    c.checkpoints_to_keep = 3
    # quantize.py: the float model (committed; from train.py, see its train_summary.json).
    # Missing: <workdir>/float, else an error naming the train.py command.
    c.float_checkpoint = "checkpoints/fashion_mnist_mlp"
    c.train_if_missing = False

    c.quant = ml_collections.ConfigDict()
    c.quant.calib_size = 25000
    c.quant.calib_batch_size = 1000
    c.quant.methods = ("gpfq", "rtn", "gptq")
    c.quant.bits = ("ternary", 2, 3, 4)
    c.quant.grids = ("int",)
    # Besides grids x bits, these (grid, bits) pairs are run for every method.
    c.quant.extra_runs = (("ls", "ternary"), ("int_full", 2))
    c.quant.scale = "search"  # c chosen per layer from the calibration statistics
    c.quant.c = 1.0  # centre of the search (or the constant itself for a fixed rule)
    # None: the grid's default (per channel for int/int_full, per layer for ls/zzs)
    c.quant.per_channel = ml_collections.config_dict.placeholder(bool)
    # A tuple of c values: the grid's base rule with the c of best VALIDATION accuracy.
    c.quant.c_grid_val = ml_collections.config_dict.placeholder(tuple)
    c.quant.seed = 0  # calibration draw from the training split
    c.quant.patch_fraction = 1.0  # fraction of rows (conv patches) kept per calibration batch
    c.quant.fold_batchnorm = False
    c.quant.bias_correction = False
    c.quant.save_quantized = True
    return c
