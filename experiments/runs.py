"""One quantization run and the grid of them: calibration sampling, the (method, grid, bits)
runs of a config, and quantizing + evaluating one run into a record.

A *run* is one (method, grid, bits) triple quantizing the whole model, or a mixed-precision
run (a bits-per-weight budget, or the LM experiment's split of the blocks). Its record is a
dict that goes into ``results.json`` as it is (``experiments.quantization`` and
``experiments.lm_quantization`` drive the runs; ``experiments.reports`` and
``experiments.plots`` render the records). Everything here is a plain function (arrays and
dicts in, dicts out), testable without the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import gpfq_jax as gq
from gpfq_jax.core.alphabets import QuantSpec, describe, make_alphabet

Bits = int | str
TERNARY_X = math.log2(3)  # where "ternary" sits on a bits axis


# --------------------------------------------------------------------------- calibration


def calibration_indices(n_train: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` distinct images, a seeded draw from ``range(n_train)``."""
    if not 0 < size <= n_train:
        raise ValueError(f"calib_size={size} must be between 1 and the {n_train} training images")
    return np.sort(np.random.default_rng(seed).choice(n_train, size, replace=False))


def calibration_images(x_train: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The calibration images: a seeded subset of the TRAINING split (never val or test)."""
    return x_train[calibration_indices(len(x_train), size, seed)]


# --------------------------------------------------------------------------- run grid


@dataclasses.dataclass(frozen=True)
class Run:
    """One whole-model quantization: ``method`` on the ``grid`` alphabet at ``bits``, with one
    step per ``group_size`` inputs (None: per channel or layer, as the grid says) and, for
    GPTQ, act-order (columns in descending order of the Hessian's diagonal).

    Mixed precision: with ``budget`` (bits per weight, steps included; both experiments)
    each layer's width is chosen under that average (``quantize_params(budget_bits=)``;
    ``bits`` is only the spec's placeholder, the largest candidate); with ``first_bits`` (the
    LM experiment) the first half of the blocks is at ``first_bits`` and the rest (and the
    layers outside the blocks) at ``bits``. ``fisher`` (a budget run): the widths minimise the
    loss increase the diagonal Fisher predicts (``quantize_params(budget_fisher=)``) instead
    of the summed layer output errors.
    """

    method: str
    grid: str
    bits: Bits
    group_size: int | None = None
    act_order: bool = False
    budget: float | None = None
    first_bits: int | None = None
    fisher: bool = False

    @property
    def label(self) -> str:
        """The method as configs and tables name it: "gptq" or "gptq-act"."""
        return f"{self.method}-act" if self.act_order else self.method

    @property
    def width(self) -> str:
        """The width part of the name: "4", "b3.0" (budget), "b3.0fisher" (a budget with the
        Fisher objective) or "3first2" (split)."""
        if self.budget is not None:
            return f"b{float(self.budget)!r}" + ("fisher" if self.fisher else "")
        if self.first_bits is not None:
            return f"{self.first_bits}first{self.bits}"
        return str(self.bits)

    @property
    def name(self) -> str:
        """ "gpfq_asym_4_g64", "gpfq_asym_b3.0_g64", "gpfq_asym_3first2_g64"."""
        groups = f"_g{self.group_size}" if self.group_size else ""
        return f"{self.label}_{self.grid}_{self.width}{groups}"

    @property
    def mixed(self) -> bool:
        """A budget or split run: its layers have different widths."""
        return self.budget is not None or self.first_bits is not None


def parse_method(label: str) -> tuple[str, bool]:
    """ "gpfq" -> ("gpfq", False); "gptq-act" -> ("gptq", True) (act-order)."""
    method, act, rest = label.partition("-")
    if act and rest != "act":
        raise ValueError(f"unknown method {label!r}; use a method name, optionally + '-act'")
    return method, bool(act)


def run_grid(
    methods: Iterable[str],
    grids: Iterable[str],
    bits: Iterable[Bits],
    extra: Iterable[Sequence[Any]] = (),
    budgets: Iterable[Sequence[Any]] = (),
    budget_candidates: Iterable[int] | None = None,
    fisher_budgets: Iterable[Sequence[Any]] = (),
) -> list[Run]:
    """methods x (grids x bits, then the ``extra`` (grid, bits) or (grid, bits, group_size)
    points), then every (bits per weight, group_size) of ``budgets`` x grids x methods (bits:
    the largest of ``budget_candidates``, a placeholder), then the same for ``fisher_budgets``
    (the Fisher objective), without duplicates. A method label may end in "-act" (act-order)."""
    points = [(g, parse_bits(b), None) for g in grids for b in bits]
    points += [(e[0], parse_bits(e[1]), e[2] if len(e) > 2 else None) for e in extra]
    labels = [parse_method(m) for m in methods]
    runs = [Run(m, g, b, gs, act_order=act) for m, act in labels for g, b, gs in points]
    top = budget_placeholder_bits(budget_candidates)
    runs += [
        Run(m, g, top, gs, act_order=act, budget=float(b), fisher=fisher)
        for group, fisher in ((budgets, False), (fisher_budgets, True))
        for b, gs in group
        for g in grids
        for m, act in labels
    ]
    return list(dict.fromkeys(runs))


def budget_placeholder_bits(candidates: Iterable[int] | None) -> int:
    """The ``bits`` a budget run holds before its allocation chooses the widths: the largest
    candidate (8 when none are given)."""
    return max(candidates or (8,))


def parse_bits(b: Any) -> Bits:
    """ "ternary" or an int bit width."""
    return "ternary" if b == "ternary" else int(b)


def bits_x(bits: Bits) -> float:
    """Position of a bit width on a numeric axis (ternary: log2 3)."""
    return TERNARY_X if bits == "ternary" else float(bits)


def bits_label(bits: Bits) -> str:
    """ "ternary" or "<b>-bit"."""
    return "ternary" if bits == "ternary" else f"{bits}-bit"


def successful(runs: Iterable[dict]) -> list[dict]:
    """The run records that did not fail."""
    return [r for r in runs if "error" not in r]


def is_mixed(record: dict) -> bool:
    """A record of a mixed-precision run (a bits-per-weight budget or a split of the blocks)."""
    return record.get("budget") is not None or record.get("split") is not None


def uniform(runs: list[dict]) -> list[dict]:
    """The successful runs at one width (not budget or split runs)."""
    return [r for r in successful(runs) if not is_mixed(r)]


def same_alphabet(run: Run, earlier: Iterable[Run]) -> Run | None:
    """An earlier run of the same method and grid with the same alphabet (the "int" grid at
    2 bits is ternary), whose result ``run`` can reuse; None if there is none. A mixed-precision
    run (whose ``bits`` is a placeholder) neither reuses nor is reused."""
    if run.mixed:
        return None
    alphabet = make_alphabet(run.bits, run.grid)
    return next(
        (
            e
            for e in earlier
            if not e.mixed
            and (e.method, e.grid, e.group_size, e.act_order)
            == (run.method, run.grid, run.group_size, run.act_order)
            and make_alphabet(e.bits, e.grid) == alphabet
        ),
        None,
    )


def reused_record(record: dict, run: Run) -> dict:
    """``record`` of an identical earlier run, renamed to ``run`` and marked ``same_as``."""
    return {**record, "name": run.name, "bits": run.bits, "same_as": record["name"]}


def make_spec(
    run: Run, scale: str | None, c: float = 1.0, per_channel: bool | None = None
) -> QuantSpec:
    """The run's QuantSpec; ``per_channel=None`` keeps the grid's default."""
    return QuantSpec(
        bits=run.bits,
        grid=run.grid,
        scale=scale,
        c=c,
        per_channel=per_channel,
        group_size=run.group_size,
    )


# --------------------------------------------------------------------------- mixed precision


def split_rules(run: Run, n_layers: int) -> list[gq.Rule]:
    """The rule of a split run: the first ``n_layers // 2`` blocks at ``run.first_bits``."""
    if n_layers < 2:
        raise ValueError(f"a split run needs at least 2 blocks, the model has {n_layers}")
    first = "|".join(str(i) for i in range(n_layers // 2))
    return [gq.Rule(f"^layers_({first})/", bits=run.first_bits)]


def mixed_kwargs(run: Run, setup: Any, q: Any) -> dict[str, Any]:
    """``quantize_params`` keywords of a mixed-precision run: a budget's ``budget_bits`` and
    ``budget_candidates`` (``q.budget_candidates``; with ``run.fisher``, ``budget_fisher``:
    ``setup.fisher(q.fisher_samples)``, a :class:`FisherCache`), or split rules (the LM
    experiment's blocks ``layers_<i>``; ``setup.model.config.n_layers`` of them); {} for a
    uniform run."""
    if run.budget is not None:
        out = {"budget_bits": run.budget, "budget_candidates": tuple(q.budget_candidates)}
        if run.fisher:
            out["budget_fisher"] = setup.fisher(q.fisher_samples)
        return out
    if run.first_bits is not None:
        return {"rules": split_rules(run, setup.model.config.n_layers)}
    return {}


def mixed_fields(
    run: Run, res: gq.QuantizeResult, setup: Any = None, q: Any = None
) -> dict[str, Any]:
    """The record fields of a mixed-precision run: ``budget`` and ``allocation`` (with the
    Fisher objective also ``fisher_samples`` and ``fisher_seconds``), or ``split`` [first
    bits, other bits] and ``first_blocks``; ``bits`` is "mixed". ``setup`` and ``q`` as for
    :func:`mixed_kwargs` (needed by split and Fisher runs)."""
    out: dict[str, Any] = {"bits": "mixed"}
    if run.fisher:
        out["fisher_samples"] = q.fisher_samples
        out["fisher_seconds"] = setup.fisher.seconds(q.fisher_samples)
    alloc = res.bit_allocation
    if alloc is not None:
        out["budget"] = run.budget
        out["allocation"] = {
            "budget_bits": alloc.budget_bits, "candidates": list(alloc.candidates),
            "bits_per_weight": alloc.bits_per_weight,
            "min_bits_per_weight": alloc.min_bits_per_weight,
            "total_error": alloc.total_error, "exact": alloc.exact, "seconds": alloc.seconds,
            "objective": alloc.objective,
            "layers": alloc.summary(),
        }  # fmt: skip
    if run.first_bits is not None:
        out["split"] = [run.first_bits, run.bits]
        out["first_blocks"] = setup.model.config.n_layers // 2
    return out


class FisherCache:
    """The diagonal Fisher of an experiment's loss w.r.t. its params (``gq.fisher_diagonal``),
    one gradient per calibration sample over the first ``n`` samples; computed once per ``n``.

    ``loss(params, sample)``: the loss of ONE sample (an LM window, an image with its label).
    """

    def __init__(self, loss: Callable[[Any, Any], Any], params: Any, samples: Sequence[Any]):
        self.loss, self.params, self.samples = loss, params, samples
        self._done: dict[int, tuple[Any, float]] = {}

    def __call__(self, n: int) -> Any:
        """The Fisher over the first ``n`` samples, shaped like the params."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.samples):
            raise ValueError(f"fisher_samples must be an int in 1..{len(self.samples)} (the "
                             f"calibration samples), got {n!r}")  # fmt: skip
        if n not in self._done:
            t0 = time.perf_counter()
            fisher = gq.fisher_diagonal(self.loss, self.params, self.samples[:n])
            self._done[n] = (fisher, time.perf_counter() - t0)
        return self._done[n][0]

    def seconds(self, n: int) -> float:
        """How long the Fisher over ``n`` samples took (0.0 if not computed)."""
        return self._done.get(n, (None, 0.0))[1]


def failed_record(run: Run, error: Exception) -> dict[str, Any]:
    """The record of a run that raised ``error``: what it was and the error, in words."""
    return {
        "name": run.name,
        "method": run.label,
        "grid": run.grid,
        "bits": "mixed" if run.mixed else run.bits,
        "group_size": run.group_size,
        **({"budget": run.budget} if run.budget is not None else {}),
        "error": f"{type(error).__name__}: {error}",
    }


def linear_bits_per_weight(size: dict) -> float:
    """Storage bits per quantized weight, steps and zero points included (``size``: a
    ``gq.size_report``)."""
    weights = sum(lay["params"] for lay in size["layers"])
    return 8 * (size["codes_bytes"] + size["scales_bytes"]) / weights


# --------------------------------------------------------------------------- one run


_LAYER_KEYS = (
    "layer",
    "kind",
    "shape",
    "rel_error",
    "rows",
    "bias_corrected",
    "seconds",
    "capture_seconds",
    "stats_seconds",
    "quant_seconds",
)


def _c_summary(c: Any) -> dict[str, Any]:
    """The step constant: ``c`` (its mean when chosen per channel) and ``c_range`` [min, max]."""
    c = np.asarray(c, np.float64)
    if c.ndim == 0:
        return {"c": float(c)}
    return {"c": float(c.mean()), "c_range": [float(c.min()), float(c.max())]}


def run_summary(res: gq.QuantizeResult) -> dict[str, Any]:
    """Per-layer records and the capture/stats/quant time split of a quantize_params result.
    When the layers' widths differ (a budget or rules chose them), each records its ``bits``."""
    layers = [
        {**{k: v for k, v in r.summary().items() if k in _LAYER_KEYS}, **_c_summary(r.c)}
        for r in res.layers
    ]
    if res.bit_allocation is not None or len({r.spec.bits for r in res.layers}) > 1:
        for lay, r in zip(layers, res.layers, strict=True):
            lay["bits"] = r.spec.bits
    first = res.layers[0]
    return {
        **{k: v for k, v in describe(first.spec).items() if k != "c"},
        "layers": layers,
        "seconds": {
            "total": res.seconds,
            "capture": sum(r.capture_seconds for r in res.layers),
            "stats": sum(r.stats_seconds for r in res.layers),
            "quant": sum(r.quant_seconds for r in res.layers),
        },
        "skipped": list(res.skipped),
        "folded": [list(f) for f in res.folded],
    }


def execute_run(
    run: Run,
    quantize: Callable[[QuantSpec], gq.QuantizeResult],
    evaluate: Callable[[Any, str], float],
    *,
    scale: str | None,
    c: float = 1.0,
    per_channel: bool | None = None,
    c_grid_val: Sequence[float] | None = None,
) -> tuple[dict[str, Any], gq.QuantizeResult]:
    """Quantize and evaluate one run.

    quantize(spec) -> QuantizeResult; evaluate(variables, split) -> accuracy for split in
    {"val", "test"}. With ``c_grid_val`` the step constant is not searched on calibration
    statistics: each c in the list is tried with the grid's base rule and the one with the
    best VALIDATION accuracy is kept (test accuracy is computed for the chosen one only).
    Returns (record, result of the chosen quantization).
    """
    start = time.perf_counter()
    if not c_grid_val:
        res = quantize(make_spec(run, scale, c, per_channel))
        val = evaluate(res.variables, "val")
        c_choice, curve = "search" if scale == "search" else "fixed", None
    else:
        rule = None if scale == "search" else scale
        best, curve = None, []
        for cv in c_grid_val:
            cand = quantize(make_spec(run, rule, float(cv), per_channel))
            acc = evaluate(cand.variables, "val")
            if acc is None:
                raise ValueError("c_grid_val needs a validation split (val_size > 0)")
            curve.append({"c": float(cv), "val_accuracy": acc, "seconds": cand.seconds})
            if best is None or acc > best[1]:
                best = (cand, acc)
        res, val = best
        c_choice = "val"
    record = {
        "name": run.name,
        "method": run.label,
        "group_size": run.group_size,
        **run_summary(res),
        "c_choice": c_choice,
        "val_accuracy": val,
        "test_accuracy": evaluate(res.variables, "test"),
        "wall_seconds": time.perf_counter() - start,
    }
    if curve is not None:
        record["c_val_curve"] = curve
        record["seconds"]["c_selection"] = sum(p["seconds"] for p in curve)
    return record, res


def quantizer(
    model: Any, variables: Any, calib: np.ndarray, method: str, **kwargs: Any
) -> Callable[[QuantSpec], gq.QuantizeResult]:
    """``spec -> gq.quantize_params(model, variables, calib, spec, method, **kwargs)``."""
    return lambda spec: gq.quantize_params(model, variables, calib, spec, method, **kwargs)


__all__ = [
    "Run",
    "bits_label",
    "bits_x",
    "budget_placeholder_bits",
    "calibration_images",
    "calibration_indices",
    "execute_run",
    "failed_record",
    "is_mixed",
    "linear_bits_per_weight",
    "make_spec",
    "FisherCache",
    "mixed_fields",
    "mixed_kwargs",
    "parse_bits",
    "parse_method",
    "quantizer",
    "reused_record",
    "run_grid",
    "run_summary",
    "same_alphabet",
    "split_rules",
    "successful",
    "uniform",
]
