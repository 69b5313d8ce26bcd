"""MNIST, JMLR MLP 784-500-300-10 with BatchNorm (the JMLR paper's first experiment).

python train.py --config=configs/mnist_mlp.py --workdir=workdirs/mnist_mlp
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # None -> $GPFQ_DATA_DIR
    c.model = ml_collections.ConfigDict({"name": "mlp", "kwargs": {"features": (500, 300)}})
    c.seed = 0
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 20  # ~2 s/epoch on 2 CPU cores
    c.optimizer = "adamw"  # "adamw" | "sgd"
    c.learning_rate = 1e-3
    c.momentum = 0.9  # sgd only
    c.weight_decay = 1e-4
    c.warmup_epochs = 0.0
    c.augment = False  # random crop (4 px) + horizontal flip; CIFAR only
    c.val_size = 5000
    c.limit_train = ml_collections.config_dict.placeholder(int)  # None: all
    c.checkpoints_to_keep = 3

    c.quant = ml_collections.ConfigDict()
    c.quant.calib_size = 25000
    c.quant.calib_batch_size = 1000
    c.quant.methods = ("gpfq", "rtn", "gptq")
    c.quant.bits = ("ternary", 2, 3, 4)
    c.quant.grids = ("int",)
    c.quant.scale = "search"
    c.quant.per_channel = True
    return c
