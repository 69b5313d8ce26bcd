"""gpfq_jax: GPFQ post-training weight quantization for JAX/Flax.

``gpfq_jax.core`` holds the algorithm as pure functions on arrays (no Flax import);
``gpfq_jax.flax`` quantizes whole Linen and NNX models and saves them. The names below are
the user-facing API; the Flax ones are imported on first use, so that ``import gpfq_jax`` and
``gpfq_jax.core`` stay free of Flax.
"""

import importlib

from gpfq_jax.core.alphabets import QuantSpec, dequantize, make_alphabet, step_size
from gpfq_jax.core.bit_budget import solve_budget
from gpfq_jax.core.fisher import fisher_diagonal
from gpfq_jax.core.gpfq import gpfq_data_form, gpfq_gram_form
from gpfq_jax.core.gptq import gptq_codes, gptq_codes_from_factor, gptq_factor, qronos_factor
from gpfq_jax.core.layer import LayerResult, quantize_from_stats, quantize_layer
from gpfq_jax.core.output_error import output_error_sq
from gpfq_jax.core.patches import ConvGeometry
from gpfq_jax.core.rtn import rtn_codes
from gpfq_jax.core.stats import LayerStats, StatsAccumulator, stats_from_data

__version__ = "0.1.0"

# Flax-side names -> the module that defines them (imported lazily, PEP 562).
_FLAX_NAMES = {
    "quantize_params": "gpfq_jax.flax.driver",
    "QuantizeResult": "gpfq_jax.flax.results",
    "LayerRecord": "gpfq_jax.flax.results",
    "DriverReport": "gpfq_jax.flax.results",
    "BlockStructureError": "gpfq_jax.flax.blocks",
    "Rule": "gpfq_jax.flax.rules",
    "save_quantized": "gpfq_jax.flax.checkpoints",
    "load_quantized": "gpfq_jax.flax.checkpoints",
    "size_report": "gpfq_jax.flax.sizes",
    "to_qwix": "gpfq_jax.flax.qwix_serving",
    "load_qwix": "gpfq_jax.flax.qwix_serving",
    "allocate_bits": "gpfq_jax.flax.bit_allocation",
    "BitAllocation": "gpfq_jax.flax.bit_allocation",
}


def __getattr__(name: str):
    if name in _FLAX_NAMES:
        return getattr(importlib.import_module(_FLAX_NAMES[name]), name)
    raise AttributeError(f"module 'gpfq_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


__all__ = [
    "BitAllocation",
    "BlockStructureError",
    "ConvGeometry",
    "DriverReport",
    "LayerRecord",
    "LayerResult",
    "LayerStats",
    "QuantSpec",
    "QuantizeResult",
    "Rule",
    "StatsAccumulator",
    "allocate_bits",
    "dequantize",
    "gpfq_data_form",
    "gpfq_gram_form",
    "gptq_codes",
    "gptq_codes_from_factor",
    "gptq_factor",
    "qronos_factor",
    "load_quantized",
    "load_qwix",
    "make_alphabet",
    "output_error_sq",
    "quantize_from_stats",
    "quantize_layer",
    "quantize_params",
    "rtn_codes",
    "save_quantized",
    "size_report",
    "solve_budget",
    "fisher_diagonal",
    "stats_from_data",
    "step_size",
    "to_qwix",
]
