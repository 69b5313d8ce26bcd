"""The algorithm core: pure functions on arrays, no Flax.

alphabets (grids, steps, rounding, dequantization), gpfq (the recurrence: data form and
blocked Gram form), gptq and rtn (the baselines), patches (conv geometry, patch rows, kernel
grouping), stats (streaming H, G, F), output_error (the error identity), layer (one-layer
quantization with the step search), bit_budget (per-layer bit widths under a storage budget:
a multiple-choice knapsack), fisher (the diagonal Fisher's loss estimate that weighs it),
sharding (placing a layer on several devices).
"""

from gpfq_jax.core.alphabets import (
    Alphabet,
    QuantSpec,
    bits_per_weight,
    dequantize,
    expand_groups,
    make_alphabet,
    quantize_values,
    round_to_codes,
    step_size,
    steps_and_zero_points,
)
from gpfq_jax.core.bit_budget import BudgetSolution, brute_force_budget, budget_units, solve_budget
from gpfq_jax.core.code_dtypes import int_dtype, storage_layout
from gpfq_jax.core.fisher import fisher_diagonal, fisher_error
from gpfq_jax.core.general import matrix_layout, quantize_view
from gpfq_jax.core.gpfq import default_block_size, gpfq_data_form, gpfq_gram_form
from gpfq_jax.core.gptq import (
    GptqFactor,
    gptq_codes,
    gptq_codes_from_factor,
    gptq_factor,
    qronos_factor,
)
from gpfq_jax.core.layer import METHODS, LayerResult, quantize_from_stats, quantize_layer
from gpfq_jax.core.output_error import ErrorTerms, error_given_terms, error_terms, output_error_sq
from gpfq_jax.core.patches import (
    ConvGeometry,
    MatrixView,
    conv_row_count,
    conv_rows,
    conv_rows_at,
    dense_rows,
    grouped_kernel,
    ungrouped_kernel,
    unview_kernel,
    view_kernel,
    view_rows,
)
from gpfq_jax.core.rtn import rtn_codes
from gpfq_jax.core.stats import (
    LayerStats,
    StatsAccumulator,
    accumulate,
    init_stats,
    stats_from_data,
)

__all__ = [
    "Alphabet",
    "BudgetSolution",
    "ConvGeometry",
    "ErrorTerms",
    "GptqFactor",
    "LayerResult",
    "LayerStats",
    "METHODS",
    "MatrixView",
    "QuantSpec",
    "StatsAccumulator",
    "accumulate",
    "bits_per_weight",
    "brute_force_budget",
    "budget_units",
    "fisher_diagonal",
    "fisher_error",
    "conv_row_count",
    "conv_rows",
    "conv_rows_at",
    "default_block_size",
    "dense_rows",
    "dequantize",
    "error_given_terms",
    "error_terms",
    "expand_groups",
    "gpfq_data_form",
    "gpfq_gram_form",
    "gptq_codes",
    "gptq_codes_from_factor",
    "gptq_factor",
    "qronos_factor",
    "grouped_kernel",
    "init_stats",
    "int_dtype",
    "storage_layout",
    "make_alphabet",
    "matrix_layout",
    "output_error_sq",
    "quantize_from_stats",
    "quantize_layer",
    "quantize_values",
    "quantize_view",
    "round_to_codes",
    "rtn_codes",
    "solve_budget",
    "stats_from_data",
    "step_size",
    "steps_and_zero_points",
    "ungrouped_kernel",
    "unview_kernel",
    "view_kernel",
    "view_rows",
]
