"""gpfq_jax: GPFQ post-training weight quantization for JAX/Flax.

Core (pure functions on arrays): alphabets, the GPFQ recurrence (data form and blocked Gram
form), streaming layer statistics, RTN and GPTQ baselines, and one-layer quantization.
"""

from gpfq_jax.alphabets import (
    Alphabet,
    QuantSpec,
    codes_to_values,
    make_alphabet,
    quantize_values,
    round_to_codes,
    step_size,
)
from gpfq_jax.baselines import gptq_codes, rtn_codes
from gpfq_jax.gpfq import gpfq_data_form, gpfq_gram_form
from gpfq_jax.layer import LayerResult, quantize_from_stats, quantize_layer
from gpfq_jax.stats import (
    ConvGeometry,
    LayerStats,
    StatsAccumulator,
    accumulate,
    conv_rows,
    dense_rows,
    init_stats,
    output_error_sq,
    stats_from_data,
)

__version__ = "0.1.0"
from gpfq_jax.export import load_quantized, save_quantized, size_report  # noqa: E402
from gpfq_jax.quantize_model import LayerRecord, QuantizeResult, quantize_params  # noqa: E402
from gpfq_jax.rules import Rule  # noqa: E402
