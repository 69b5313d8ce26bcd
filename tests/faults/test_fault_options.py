"""Bad flags and options: QuantSpec fields, quantize_layer / quantize_from_stats options,
quantize_params arguments and models. Each raises the documented type naming the argument and
the bad value, before any work is done."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _faultkit import (
    MLP,
    check,
    error_cases,
    expect_error,
    fault,
    linen_variables,
    nnx_model,
    normal,
    qp,
)

import gpfq_jax as gq
from gpfq_jax.core import StatsAccumulator
from gpfq_jax.flax.blocks import BlockStructureError

W = normal((6, 4), seed=2)
X = normal((20, 6), seed=3)
NAN, INF = float("nan"), float("inf")
KEY = jax.random.PRNGKey(0)


def S(**kw):
    return lambda: gq.QuantSpec(**kw)


def L(**kw):
    return lambda: gq.quantize_layer(W, X, **kw)


BITS = r"bits must be an integer in 2\.\.8 or 'ternary', got "

SPEC = error_cases(
    ("bits-0", S(bits=0), ValueError, BITS + "0$"),
    ("bits-1", S(bits=1), ValueError, BITS + "1$"),
    ("bits-9", S(bits=9), ValueError, BITS + "9$"),
    ("bits-minus-1", S(bits=-1), ValueError, BITS + "-1$"),
    ("bits-4.5", S(bits=4.5), ValueError, BITS + r"4\.5$"),
    ("bits-nan", S(bits=NAN), ValueError, BITS + "nan$"),
    ("bits-True", S(bits=True), ValueError, BITS + "True$"),
    ("bits-None", S(bits=None), ValueError, BITS + "None$"),
    ("bits-str-4", S(bits="4"), ValueError, BITS + "'4'$"),
    ("grid-unknown", S(grid="foo"), ValueError, r"unknown grid 'foo'; expected one of \('int'"),
    ("grid-upper-case", S(grid="INT"), ValueError, r"unknown grid 'INT'"),
    ("grid-None", S(grid=None), ValueError, r"unknown grid None"),
    ("grid-int", S(grid=1), ValueError, r"unknown grid 1;"),
    ("grid-list", S(grid=["int"]), ValueError, r"unknown grid \['int'\]"),
    ("scale-unknown", S(scale="foo"), ValueError, r"unknown scale 'foo'; expected one of \(None"),
    ("scale-int", S(scale=1), ValueError, r"unknown scale 1;"),
    ("scale-True", S(scale=True), ValueError, r"unknown scale True;"),
    ("rounding-unknown", S(rounding="up"), ValueError, r"unknown rounding 'up'; expected one of"),
    ("rounding-None", S(rounding=None), ValueError, r"unknown rounding None"),
    ("sparsity-unknown", S(sparsity="l2"), ValueError, r"unknown sparsity 'l2'; expected one of"),
    ("sparsity-True", S(sparsity=True), ValueError, r"unknown sparsity True"),
    ("sparsity-0", S(sparsity=0), ValueError, r"unknown sparsity 0;"),
    ("c-0", S(c=0), ValueError, r"c must be a finite number > 0, got 0$"),
    ("c-minus-1", S(c=-1), ValueError, r"c must be a finite number > 0, got -1$"),
    ("c-nan", S(c=NAN), ValueError, r"c must be a finite number > 0, got nan$"),
    ("c-inf", S(c=INF), ValueError, r"c must be a finite number > 0, got inf$"),
    ("c-str", S(c="1"), TypeError, r"c must be a real number, got '1'$"),
    ("c-True", S(c=True), TypeError, r"c must be a real number, got True$"),
    ("c-None", S(c=None), TypeError, r"c must be a real number, got None$"),
    ("lam-negative", S(lam=-1), ValueError, r"lam must be a finite number >= 0, got -1$"),
    ("lam-nan", S(lam=NAN), ValueError, r"lam must be a finite number >= 0, got nan$"),
    ("lam-inf", S(lam=INF), ValueError, r"lam must be a finite number >= 0, got inf$"),
    ("lam-str", S(lam="0"), TypeError, r"lam must be a real number, got '0'$"),
    ("per_channel-no", S(per_channel="no"), TypeError,
     r"per_channel must be True, False or None, got 'no'$"),
    ("per_channel-1", S(per_channel=1), TypeError, r"per_channel must be .*got 1$"),
    ("per_channel-0", S(per_channel=0), TypeError, r"per_channel must be .*got 0$"),
    ("search_grid-empty", S(search_grid=()), ValueError,
     r"search_grid must be a non-empty sequence of positive multipliers"),
    ("search_grid-negative", S(search_grid=[1.0, -1.0]), ValueError,
     r"search_grid entry must be a finite number > 0, got -1\.0$"),
    ("search_grid-zero", S(search_grid=[0.0]), ValueError,
     r"search_grid entry must be a finite number > 0, got 0\.0$"),
    ("search_grid-inf", S(search_grid=[INF]), ValueError,
     r"search_grid entry must be a finite number > 0, got inf$"),
    ("search_grid-nan", S(search_grid=[NAN]), ValueError, r"search_grid entry .*got nan$"),
    ("search_grid-str", S(search_grid="abc"), TypeError,
     r"search_grid must be a sequence of numbers, got 'abc'$"),
    ("search_grid-number", S(search_grid=2.0), TypeError,
     r"search_grid must be a sequence of numbers, got 2\.0$"),
    ("search_grid-str-entry", S(search_grid=["a"]), TypeError,
     r"search_grid entry must be a real number, got 'a'$"),
    ("search_grid-bool-entry", S(search_grid=[True]), TypeError,
     r"search_grid entry must be a real number, got True$"),
    ("group_size-0", S(group_size=0), ValueError,
     r"group_size must be a positive int or None, got 0$"),
    ("group_size-negative", S(group_size=-1), ValueError, r"group_size must be .*got -1$"),
    ("group_size-2.5", S(group_size=2.5), TypeError, r"group_size must be .*got 2\.5$"),
    ("group_size-True", S(group_size=True), TypeError, r"group_size must be .*got True$"),
    ("group_size-str", S(group_size="8"), TypeError, r"group_size must be .*got '8'$"),
    ("spec-unknown-field", lambda: gq.QuantSpec(bitz=4), TypeError, r"unexpected keyword.*bitz"),
)  # fmt: skip


@fault("options")
@pytest.mark.parametrize("call, exc, pattern", SPEC)
def test_quant_spec(call, exc, pattern):
    expect_error(call, exc, pattern)


METHOD = r"unknown method {}; expected one of \('gpfq', 'rtn', 'gptq', 'qronos'\)"
DAMP_V = r"damp must be a finite number >= 0 \(GPTQ's damping\), got "
DAMP_T = r"damp must be a real number >= 0, got "
BLOCK = r"block_size must be a positive integer or None, got "

LAYER = error_cases(
    ("method-unknown", L(method="foo"), ValueError, METHOD.format("'foo'")),
    ("method-upper-case", L(method="GPFQ"), ValueError, METHOD.format("'GPFQ'")),
    ("method-None", L(method=None), ValueError, METHOD.format("None")),
    ("damp-negative", L(method="gptq", damp=-1), ValueError, DAMP_V + "-1$"),
    ("damp-nan", L(method="gptq", damp=NAN), ValueError, DAMP_V + "nan$"),
    ("damp-inf", L(method="gptq", damp=INF), ValueError, DAMP_V + "inf$"),
    ("damp-str", L(method="gptq", damp="x"), TypeError, DAMP_T + "'x'$"),
    ("damp-None", L(method="gptq", damp=None), TypeError, DAMP_T + "None$"),
    ("damp-True", L(method="gptq", damp=True), TypeError, DAMP_T + "True$"),
    ("damp-negative-with-gpfq", L(damp=-0.5), ValueError, DAMP_V + r"-0\.5$"),
    ("block_size-0", L(block_size=0), ValueError, BLOCK + "0$"),
    ("block_size-negative", L(block_size=-1), ValueError, BLOCK + "-1$"),
    ("block_size-2.5", L(block_size=2.5), ValueError, BLOCK + r"2\.5$"),
    ("block_size-True", L(block_size=True), ValueError, BLOCK + "True$"),
    ("block_size-str", L(method="gptq", block_size="4"), ValueError, BLOCK + "'4'$"),
    ("act_order-yes", L(method="gptq", act_order="yes"), TypeError,
     r"act_order must be True or False, got 'yes'$"),
    ("act_order-1", L(method="gptq", act_order=1), TypeError, r"act_order must be .*got 1$"),
    ("key-int", L(key=0), TypeError, r"key must be a JAX PRNG key .*got 0$"),
    ("key-str", L(key="k"), TypeError, r"key must be a JAX PRNG key .*got 'k'$"),
    ("spec-str", L(spec="int4"), TypeError, r"spec must be a QuantSpec or a dict, got str$"),
    ("spec-int", L(spec=4), TypeError, r"spec must be a QuantSpec or a dict, got int$"),
    ("spec-dict-bad-bits", L(spec={"bits": 9}), ValueError, BITS + "9$"),
    ("spec-dict-unknown-field", L(spec={"bitz": 4}), TypeError, r"unexpected keyword.*'bitz'"),
    ("stochastic-without-key", L(spec=gq.QuantSpec(rounding="stochastic")), ValueError,
     r"rounding='stochastic' needs a PRNG key"),
    ("gptq-stochastic", L(method="gptq", key=KEY, spec=gq.QuantSpec(rounding="stochastic")),
     ValueError, r"gptq supports rounding='nearest' without sparsity only"),
    ("gptq-sparsity-l1", L(method="gptq", spec=gq.QuantSpec(sparsity="l1", lam=0.1)),
     ValueError, r"gptq supports rounding='nearest' without sparsity only"),
    ("gptq-sparsity-l0", L(method="gptq", spec={"sparsity": "l0"}), ValueError,
     r"gptq supports rounding='nearest' without sparsity only"),
    ("mesh-unknown", L(mesh="foo"), ValueError, r"mesh must be a jax\.sharding\.Mesh, 'auto' or "
     r"None; got 'foo'"),
    ("from_stats-not-stats", lambda: gq.quantize_from_stats(W, {"hess": 1}), TypeError,
     r"stats must be LayerStats \(see StatsAccumulator\), got dict"),
    ("accumulator-patch_fraction-0", lambda: StatsAccumulator(6, patch_fraction=0), ValueError,
     r"patch_fraction must be in \(0, 1\], got 0$"),
    ("accumulator-patch_fraction-1.5", lambda: StatsAccumulator(6, patch_fraction=1.5),
     ValueError, r"patch_fraction must be in \(0, 1\], got 1\.5$"),
    ("accumulator-patch_fraction-str", lambda: StatsAccumulator(6, patch_fraction="x"),
     TypeError, r"patch_fraction must be a number in \(0, 1\], got 'x'$"),
)  # fmt: skip


@fault("options")
@pytest.mark.parametrize("call, exc, pattern", LAYER)
def test_layer_options(call, exc, pattern):
    expect_error(call, exc, pattern)


def P(**kw):
    return lambda: qp(**kw)


FLAG = r"{} must be True or False, got {}$"
PF_V = r"patch_fraction must be in \(0, 1\], got "
BATCH = r"batch_size must be a positive integer, got "
SDT = r"stats_dtype must be float32 or float64, got "
BLOCKS = r"blocks must be 'auto', None or a list of regex strings, got "

PARAMS = error_cases(
    ("fold_batchnorm-yes", P(fold_batchnorm="yes"), TypeError,
     FLAG.format("fold_batchnorm", "'yes'")),
    ("fold_batchnorm-None", P(fold_batchnorm=None), TypeError,
     FLAG.format("fold_batchnorm", "None")),
    ("bias_correction-1", P(bias_correction=1), TypeError, FLAG.format("bias_correction", "1")),
    ("progress-no", P(progress="no"), TypeError, FLAG.format("progress", "'no'")),
    ("progress-None", P(progress=None), TypeError, FLAG.format("progress", "None")),
    ("act_order-yes", P(act_order="yes"), TypeError, FLAG.format("act_order", "'yes'")),
    ("seed-1.5", P(seed=1.5), TypeError, r"seed must be an integer, got 1\.5$"),
    ("seed-str", P(seed="0"), TypeError, r"seed must be an integer, got '0'$"),
    ("seed-True", P(seed=True), TypeError, r"seed must be an integer, got True$"),
    ("patch_fraction-0", P(patch_fraction=0), ValueError, PF_V + "0$"),
    ("patch_fraction-1.5", P(patch_fraction=1.5), ValueError, PF_V + r"1\.5$"),
    ("patch_fraction-negative", P(patch_fraction=-0.5), ValueError, PF_V + r"-0\.5$"),
    ("patch_fraction-nan", P(patch_fraction=NAN), ValueError, PF_V + "nan$"),
    ("patch_fraction-str", P(patch_fraction="x"), TypeError,
     r"patch_fraction must be a number in \(0, 1\], got 'x'$"),
    ("batch_size-0", P(batch_size=0), ValueError, BATCH + "0$"),
    ("batch_size-negative", P(batch_size=-1), ValueError, BATCH + "-1$"),
    ("batch_size-2.5", P(batch_size=2.5), ValueError, BATCH + r"2\.5$"),
    ("batch_size-True", P(batch_size=True), ValueError, BATCH + "True$"),
    ("batch_size-str", P(batch_size="8"), ValueError, BATCH + "'8'$"),
    ("batch_size-None", P(batch_size=None), ValueError, BATCH + "None$"),
    ("stats_dtype-int32", P(stats_dtype=jnp.int32), ValueError, SDT + "int32$"),
    ("stats_dtype-float16", P(stats_dtype=jnp.float16), ValueError, SDT + "float16$"),
    ("stats_dtype-bfloat16", P(stats_dtype=jnp.bfloat16), ValueError, SDT + "bfloat16$"),
    ("stats_dtype-float64-without-x64", P(stats_dtype=jnp.float64), ValueError,
     r"stats_dtype=float64 needs 64-bit JAX.*jax_enable_x64"),
    ("apply_kwargs-list", P(apply_kwargs=[("train", False)]), TypeError,
     r"apply_kwargs must be a dict or None, got list$"),
    ("apply_kwargs-str", P(apply_kwargs="train"), TypeError,
     r"apply_kwargs must be a dict or None, got str$"),
    ("apply_kwargs-unknown-argument", P(apply_kwargs={"train": False}), ValueError,
     r"running the model on a calibration batch of shape \(32, 6\).*apply_kwargs=\{'train': "
     r"False\}.*unexpected keyword argument 'train'"),
    ("method-unknown", P(method="foo"), ValueError, METHOD.format("'foo'")),
    ("spec-str", P(spec="int4"), TypeError, r"spec must be a QuantSpec or a dict, got str$"),
    ("mesh-unknown", P(mesh="foo"), ValueError, r"mesh must be a jax\.sharding\.Mesh"),
    ("damp-negative-names-layer", P(damp=-1), ValueError, r"layer 'Dense_0': " + DAMP_V + "-1$"),
    ("block_size-0-names-layer", P(block_size=0), ValueError, r"layer 'Dense_0': " + BLOCK + "0$"),
    ("key-int", P(key=3), TypeError, r"PRNG key.*\b3$"),
    ("nnx-with-variables", lambda: qp(nnx_model(), linen_variables()), TypeError,
     r"for an NNX model pass variables=None \(the model holds its own state\); got dict$"),
    ("linen-without-variables", lambda: qp(MLP(), None), TypeError,
     r"a Linen model needs its variables dict \(with 'params'\); got NoneType$"),
    ("linen-variables-without-params", lambda: qp(MLP(), {"batch_stats": {}}), TypeError,
     r"a Linen model needs its variables dict \(with 'params'\); got dict$"),
    ("linen-variables-list", lambda: qp(MLP(), [1, 2]), TypeError,
     r"a Linen model needs its variables dict \(with 'params'\); got list$"),
    ("model-function", lambda: qp(lambda x: x, None), TypeError,
     r"model must be a flax\.linen Module or a flax\.nnx Module, got function$"),
    ("model-object", lambda: qp(object(), None), TypeError,
     r"model must be a flax\.linen Module or a flax\.nnx Module, got object$"),
    ("model-class-not-instance", lambda: qp(MLP, linen_variables()), TypeError,
     r"model must be a flax\.linen Module or a flax\.nnx Module, got"),
    ("shared_stats-1", P(shared_stats=1), TypeError, FLAG.format("shared_stats", "1")),
    ("blocks-int", P(blocks=5), TypeError, BLOCKS + "5$"),
    ("blocks-unknown-str", P(blocks="layers"), TypeError, BLOCKS + "'layers'$"),
    ("blocks-list-of-int", P(blocks=[1]), TypeError, BLOCKS + r"\[1\]$"),
    ("blocks-bad-regex", P(blocks=["("]), ValueError, r"blocks pattern '\(' is not a valid regex"),
    ("blocks-matching-nothing", P(blocks=["layers_\\d+"]), BlockStructureError,
     r"blocks pattern 'layers_\\\\d\+' matches no module holding quantizable layers; the "
     r"layers are not inside submodules$"),
    ("cache_bytes-negative", P(cache_bytes=-1), ValueError, r"cache_bytes must be >= 0, got -1$"),
    ("cache_bytes-float", P(cache_bytes=1.5), TypeError,
     r"cache_bytes must be an integer number of bytes, got 1\.5$"),
    ("resume_dir-int", P(resume_dir=3), TypeError, r"resume_dir must be a path or None, got int$"),
    ("resume_dir-a-file", lambda: qp(resume_dir=__file__), ValueError,
     r"resume_dir .*test_fault_options\.py is a file, not a directory$"),
)  # fmt: skip


@fault("options")
@pytest.mark.parametrize("call, exc, pattern", PARAMS)
def test_quantize_params_options(call, exc, pattern):
    expect_error(call, exc, pattern)


@fault("options", "result")
@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"bits": np.int64(3)}, id="bits-numpy-int"),
        pytest.param({"bits": "ternary"}, id="bits-ternary"),
        pytest.param({"bits": float(np.log2(3))}, id="bits-log2-3"),
        pytest.param({"c": np.float32(0.5)}, id="c-numpy-float"),
        pytest.param({"search_grid": np.array([0.5, 1.0])}, id="search_grid-numpy"),
        pytest.param({"per_channel": np.bool_(False)}, id="per_channel-numpy-bool"),
    ],
)
def test_equivalent_option_values_accepted(kw):
    """Numpy scalars and the documented aliases are accepted and mean the same as Python's."""
    spec = gq.QuantSpec(**kw)
    plain = gq.QuantSpec(**{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in kw.items()})
    check(spec.to_dict() == plain.to_dict(), f"{spec} != {plain}")
    got, ref = gq.quantize_layer(W, X, spec=spec), gq.quantize_layer(W, X, spec=plain)
    check(np.array_equal(got.codes, ref.codes), "codes differ")
    check(got.rel_error == ref.rel_error, f"rel_error {got.rel_error} != {ref.rel_error}")
