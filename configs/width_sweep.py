"""Width sweep: one layer's relative quantization error vs its width N (Gaussian data).

python quantize.py --config=configs/width_sweep.py --workdir=workdirs/results/width_sweep

GPFQ theory (Lybrand & Saab, JMLR 2021): for X ~ N(0, 1) with m samples held fixed, GPFQ's
relative error ||XW - XQ|| / ||XW|| decays like sqrt(m log N / N) as N grows past m
(over-parametrization); round-to-nearest's stays flat. The decay needs N >> m, so m is chosen
well below the largest width: m = 256 puts N = 2^5 .. 2^12 at N/m = 1/8 .. 16 (both regimes).
With m = 2048 (--config.sweep.m=2048) only the onset shows (N/m <= 2).
No checkpoint or dataset is needed.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "width_sweep"
    c.sweep = ml_collections.ConfigDict()
    c.sweep.m = 256  # calibration samples (rows of X), fixed while N grows
    c.sweep.widths = tuple(2**k for k in range(5, 13))  # N = 32 .. 4096
    c.sweep.neurons = 32  # output units, N(0, 1) weights
    c.sweep.seeds = (0, 1, 2)
    c.sweep.methods = ("gpfq", "rtn", "gptq")
    # GPTQ is O(N^3) and slow at N = 4096 with the c search (~6 min per seed on 2 cores):
    # it is run up to this width only (reference).
    c.sweep.gptq_max_width = 2048
    # The same alphabet for every method: ternary {-1, 0, 1} x step, one step per neuron,
    # its constant searched on the layer's own statistics (each method gets its best c).
    c.sweep.bits = "ternary"
    c.sweep.grid = "int"
    c.sweep.scale = "search"
    c.sweep.c = 1.0
    c.sweep.per_channel = True
    return c
