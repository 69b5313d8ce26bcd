"""The Flax adapter: whole Linen and NNX models, layer by layer.

tracing (the one abstract pass and the interception mechanism), capture (layer inputs and
kernels), bn_fold, rules, calibration, targets (the float and the partially quantized model
of one framework), blocks / frontier / activation_cache (running one block at a time),
layer_step / schedule / resume (the order of work), results, driver (``quantize_params``),
checkpoints (``save_quantized`` / ``load_quantized`` / ``size_report``), bit_allocation
(``allocate_bits``: per-layer bit widths under a bits-per-weight budget).
"""

from gpfq_jax.flax.bit_allocation import BitAllocation, LayerAllocation, allocate_bits
from gpfq_jax.flax.blocks import BlockStructureError
from gpfq_jax.flax.checkpoint_format import read_metadata
from gpfq_jax.flax.checkpoints import load_quantized, save_quantized
from gpfq_jax.flax.driver import quantize_params
from gpfq_jax.flax.qwix_serving import load_qwix, to_qwix
from gpfq_jax.flax.results import DriverReport, LayerRecord, QuantizeResult
from gpfq_jax.flax.rules import Rule
from gpfq_jax.flax.sizes import size_report
from gpfq_jax.flax.tracing import LayerInfo, discover_layers, trace_model

__all__ = [
    "BitAllocation",
    "BlockStructureError",
    "DriverReport",
    "LayerAllocation",
    "LayerInfo",
    "LayerRecord",
    "QuantizeResult",
    "Rule",
    "allocate_bits",
    "discover_layers",
    "load_quantized",
    "load_qwix",
    "quantize_params",
    "read_metadata",
    "save_quantized",
    "size_report",
    "to_qwix",
    "trace_model",
]
