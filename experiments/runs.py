"""The paper's experiments: calibration sampling, the run grid, result tables, plots, and the
width sweep. ``quantize.py`` is the command-line driver; everything here is a plain function
(arrays and dicts in, dicts/strings/files out) so that it can be tested without the CLI.

A *run* is one (method, grid, bits) triple quantizing the whole model. Results are dicts that
go into ``results.json`` as they are; :func:`results_markdown`, :func:`plot_accuracy_vs_bits`
and :func:`plot_layer_errors` render them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.training import write_text_atomic
from gpfq_jax.core.alphabets import QuantSpec, describe, make_alphabet
from gpfq_jax.core.layer import quantize_from_stats
from gpfq_jax.core.stats import stats_from_data
from gpfq_jax.flax.driver import quantize_params
from gpfq_jax.flax.results import QuantizeResult

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
    """One whole-model quantization: ``method`` on the ``grid`` alphabet at ``bits``."""

    method: str
    grid: str
    bits: Bits

    @property
    def name(self) -> str:
        return f"{self.method}_{self.grid}_{self.bits}"


def run_grid(
    methods: Iterable[str],
    grids: Iterable[str],
    bits: Iterable[Bits],
    extra: Iterable[Sequence[Any]] = (),
) -> list[Run]:
    """methods x (grids x bits, then the ``extra`` (grid, bits) pairs), without duplicates."""
    pairs = [(g, _bits(b)) for g in grids for b in bits]
    pairs += [(g, _bits(b)) for g, b in extra]
    runs = [Run(m, g, b) for m in methods for g, b in pairs]
    return list(dict.fromkeys(runs))


def _bits(b: Any) -> Bits:
    return "ternary" if b == "ternary" else int(b)


def bits_x(bits: Bits) -> float:
    """Position of a bit width on a numeric axis (ternary: log2 3)."""
    return TERNARY_X if bits == "ternary" else float(bits)


def same_alphabet(run: Run, earlier: Iterable[Run]) -> Run | None:
    """An earlier run of the same method and grid with the same alphabet (the "int" grid at
    2 bits is ternary), whose result ``run`` can reuse; None if there is none."""
    alphabet = make_alphabet(run.bits, run.grid)
    return next(
        (
            e
            for e in earlier
            if (e.method, e.grid) == (run.method, run.grid)
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
    return QuantSpec(bits=run.bits, grid=run.grid, scale=scale, c=c, per_channel=per_channel)


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


def run_summary(res: QuantizeResult) -> dict[str, Any]:
    """Per-layer records and the capture/stats/quant time split of a quantize_params result."""
    layers = [
        {**{k: v for k, v in r.summary().items() if k in _LAYER_KEYS}, **_c_summary(r.c)}
        for r in res.layers
    ]
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
    quantize: Callable[[QuantSpec], QuantizeResult],
    evaluate: Callable[[Any, str], float],
    *,
    scale: str | None,
    c: float = 1.0,
    per_channel: bool | None = None,
    c_grid_val: Sequence[float] | None = None,
) -> tuple[dict[str, Any], QuantizeResult]:
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
        "method": run.method,
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
) -> Callable[[QuantSpec], QuantizeResult]:
    """``spec -> quantize_params(model, variables, calib, spec, method, **kwargs)``."""
    return lambda spec: quantize_params(model, variables, calib, spec, method, **kwargs)


# --------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _bits_label(bits: Bits) -> str:
    return "ternary" if bits == "ternary" else f"{bits}-bit"


def _ok(runs: Iterable[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def accuracy_table(results: dict, key: str = "test_accuracy") -> str:
    """Markdown table: one row per (method, grid), one column per bit width, cells = accuracy
    in percent; a float row on top ("-" where a run is missing or failed)."""
    runs = _ok(results["runs"])
    cols = sorted({r["bits"] for r in runs}, key=bits_x)
    rows = list(dict.fromkeys((r["method"], r["grid"]) for r in runs))
    cell = {(r["method"], r["grid"], r["bits"]): r[key] for r in runs}
    fl = results["float"].get(key)
    head = ["method", *(_bits_label(b) for b in cols)]
    lines = [
        _md_row(head),
        _md_row(["---"] * len(head)),
        _md_row(["float", *([_pct(fl)] * len(cols))]),
    ]
    for m, g in rows:
        lines.append(_md_row([f"{m.upper()} {g}", *(_pct(cell.get((m, g, b))) for b in cols)]))
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Markdown table of every run: levels, storage bits, val/test accuracy, per-layer relative
    error, chosen c (mean over channels) and the capture/stats/quant seconds."""
    head = [
        "run",
        "levels",
        "storage bits",
        "val %",
        "test %",
        "rel. error per layer",
        "mean c",
        "total s",
        "capture s",
        "stats s",
        "quant s",
    ]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for r in results["runs"]:
        if "error" in r:
            lines.append(_md_row([r["name"], f"FAILED: {r['error']}", *[""] * (len(head) - 2)]))
            continue
        if "same_as" in r:
            lines.append(
                _md_row(
                    [r["name"], f"same alphabet as {r['same_as']}: reused", *[""] * (len(head) - 2)]
                )
            )
            continue
        s = r["seconds"]
        errs = " / ".join(f"{lay['rel_error']:.3f}" for lay in r["layers"])
        c = " / ".join(f"{lay['c']:.2f}" for lay in r["layers"])
        lines.append(
            _md_row(
                [
                    r["name"],
                    r["levels"],
                    r["storage_bits"],
                    _pct(r["val_accuracy"]),
                    _pct(r["test_accuracy"]),
                    errs,
                    c,
                    f"{s['total']:.1f}",
                    f"{s['capture']:.1f}",
                    f"{s['stats']:.1f}",
                    f"{s['quant']:.1f}",
                ]
            )
        )
    return "\n".join(lines)


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def results_markdown(results: dict) -> str:
    """The readable report of a whole-model experiment (``results.md``)."""
    f, cal = results["float"], results["calibration"]
    runs = [r for r in _ok(results["runs"]) if "same_as" not in r]
    total = sum(r["seconds"].get("c_selection", r["seconds"]["total"]) for r in runs)
    c_grid = any("c_selection" in r["seconds"] for r in runs)
    lines = [
        f"# {results['model']} on {results['dataset']}: post-training quantization",
        "",
        f"Dataset: {results['dataset_source']}",
        f"Float checkpoint: `{results['float_checkpoint']}`",
        f"Calibration: {cal['size']} images from the {cal['split']} split "
        f"(seed {cal['seed']}, batches of {cal['batch_size']}"
        + (
            f", {cal['patch_fraction']:.0%} of conv patches"
            if cal.get("patch_fraction", 1) < 1
            else ""
        )
        + f"); step constant: {results['c_selection']}.",
        f"Float accuracy: test {_pct(f['test_accuracy'])}%, val {_pct(f.get('val_accuracy'))}%.",
        "",
        "## Test accuracy (%)",
        "",
        accuracy_table(results),
        "",
        "## Validation accuracy (%)",
        "",
        accuracy_table(results, "val_accuracy"),
        "",
        "## Runs",
        "",
        "Seconds are the whole-model quantization (captures + statistics + quantization, "
        "compilation included), not the evaluation.",
        "",
        runs_table(results),
        "",
        f"Total quantization time: {total:.1f} s over {len(runs)} runs "
        + ("(every c tried on validation counted) " if c_grid else "")
        + f"(wall time of the whole script: {results.get('seconds_total', 0):.0f} s).",
    ]
    if any("same_as" in r for r in results["runs"]):
        lines += [
            "",
            'Note: the "int" grid at 2 bits is {-1, 0, 1} x step, the same alphabet '
            'as ternary (its row repeats the ternary run); "int_full" 2-bit has the '
            "4 levels {-2, -1, 0, 1} x step.",
        ]
    failed = [r for r in results["runs"] if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed: " + ", ".join(r["name"] for r in failed)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def save_figure_atomic(fig: Any, path: str | os.PathLike) -> None:
    """``fig.savefig`` (png) via a temporary sibling and ``os.replace``; closes ``fig``."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"gpfq": "C0", "rtn": "C1", "gptq": "C2"}
_MARKERS = {"int": "o", "int_full": "s", "ls": "^", "zzs": "D"}


def plot_accuracy_vs_bits(results: dict, path: str | os.PathLike) -> None:
    """Test accuracy vs bits, one line per (method, grid); float as a horizontal line."""
    plt = _pyplot()
    runs = _ok(results["runs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, g in dict.fromkeys((r["method"], r["grid"]) for r in runs):
        pts = sorted(
            (bits_x(r["bits"]), 100 * r["test_accuracy"])
            for r in runs
            if (r["method"], r["grid"]) == (m, g)
        )
        ax.plot(
            *zip(*pts),
            marker=_MARKERS.get(g, "x"),
            color=_COLORS.get(m),
            linestyle="-" if g == "int" else ":",
            label=f"{m.upper()} {g}",
        )
    ax.axhline(100 * results["float"]["test_accuracy"], color="k", linestyle="--", label="float")
    xs = sorted({r["bits"] for r in runs}, key=bits_x)
    ax.set_xticks([bits_x(b) for b in xs], ["tern." if b == "ternary" else str(b) for b in xs])
    ax.set_xlabel("bits")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['model']} / {results['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)


def plot_layer_errors(results: dict, path: str | os.PathLike) -> None:
    """Per-layer relative error, one panel per (grid, bits), one line per method."""
    plt = _pyplot()
    runs = [r for r in _ok(results["runs"]) if "same_as" not in r]
    panels = sorted(
        dict.fromkeys((r["grid"], r["bits"]) for r in runs),
        key=lambda p: (p[0] != "int", p[0], bits_x(p[1])),
    )
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (g, b) in zip(axes.flat, panels):
        for r in runs:
            if (r["grid"], r["bits"]) != (g, b):
                continue
            errs = [lay["rel_error"] for lay in r["layers"]]
            ax.plot(
                range(len(errs)),
                errs,
                marker="o",
                color=_COLORS.get(r["method"]),
                label=r["method"].upper(),
            )
        names = [lay["layer"] for lay in runs[0]["layers"]]
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{g} {_bits_label(b)}", fontsize=9)
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure_atomic(fig, path)


# --------------------------------------------------------------------------- width sweep


def gaussian_layer(m: int, n: int, neurons: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """X ~ N(0, 1) (m, n) and weights W ~ N(0, 1) (n, neurons)."""
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kx, (m, n)), jax.random.normal(kw, (n, neurons))


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def width_sweep(
    widths: Sequence[int],
    m: int,
    neurons: int,
    seeds: Sequence[int],
    spec: QuantSpec,
    methods: Sequence[str] = ("gpfq", "rtn", "gptq"),
    max_width: dict[str, int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One Dense layer on Gaussian data: relative error ||XW - XQ||/||XW|| vs width N.

    For each N and seed, draws (X, W) with :func:`gaussian_layer`, computes the statistics
    once and quantizes with every method (same alphabet); ``max_width[method]`` skips larger
    N for that method. Returns per-N means/stds per method (None where skipped), the raw
    errors, the log-log slope of the means per method and seconds per method.
    """
    from tqdm.auto import tqdm

    max_width = max_width or {}
    errors: dict[str, list[list[float]]] = {meth: [[] for _ in widths] for meth in methods}
    seconds = {meth: 0.0 for meth in methods}
    bar = tqdm(total=len(widths) * len(seeds), desc="width sweep", disable=not progress)
    for i, n in enumerate(widths):
        for seed in seeds:
            x, w = gaussian_layer(m, n, neurons, seed)
            stats = stats_from_data(x, x, jnp.float32)
            for meth in methods:
                if n > max_width.get(meth, n):
                    continue
                t0 = time.perf_counter()
                errors[meth][i].append(quantize_from_stats(w, stats, spec, meth).rel_error)
                seconds[meth] += time.perf_counter() - t0
            bar.update(1)
    bar.close()
    mean = {meth: [float(np.mean(e)) if e else None for e in errs] for meth, errs in errors.items()}
    std = {meth: [float(np.std(e)) if e else None for e in errs] for meth, errs in errors.items()}
    return {
        "widths": list(widths),
        "m": m,
        "neurons": neurons,
        "seeds": list(seeds),
        "spec": describe(spec),
        "methods": list(methods),
        "max_width": dict(max_width),
        "errors": errors,
        "mean": mean,
        "std": std,
        "slope": {meth: _slope(widths, mean[meth]) for meth in methods},
        "seconds": seconds,
    }


def _slope(
    widths: Sequence[int], values: Sequence[float | None], min_width: int = 0
) -> float | None:
    """Log-log slope over the widths >= ``min_width`` that have a value (None if < 2)."""
    pts = [(n, v) for n, v in zip(widths, values) if v is not None and n >= min_width]
    return loglog_slope(*zip(*pts)) if len(pts) >= 2 else None


def tail_slopes(result: dict, min_width: int) -> dict[str, float | None]:
    """Per-method log-log slopes over the widths N >= ``min_width`` only."""
    return {
        meth: _slope(result["widths"], result["mean"][meth], min_width)
        for meth in result["methods"]
    }


def width_sweep_markdown(result: dict) -> str:
    """The width sweep as a markdown table (mean relative error per N) plus fitted slopes."""
    methods = result["methods"]
    head = ["N", *(f"{m.upper()} rel. error" for m in methods), "GPFQ / RTN"]
    lines = [
        "# Width sweep: relative error of one layer vs its width N (Gaussian data)",
        "",
        f"X ~ N(0, 1) with m = {result['m']} samples, {result['neurons']} neurons with "
        f"N(0, 1) weights, seeds {result['seeds']}; alphabet: {result['spec']['grid']} "
        f"{result['spec']['bits']} ({result['spec']['levels']} levels), step rule "
        f"{result['spec']['scale']}, per_channel={result['spec']['per_channel']}.",
        "",
        _md_row(head),
        _md_row(["---"] * len(head)),
    ]
    for i, n in enumerate(result["widths"]):
        cells = [_mean_std(result, m, i) for m in methods]
        ratio = (
            f"{result['mean']['gpfq'][i] / result['mean']['rtn'][i]:.3f}"
            if {"gpfq", "rtn"} <= set(methods)
            else "-"
        )
        lines.append(_md_row([n, *cells, ratio]))
    lines += [
        "",
        "Fitted log-log slopes of the mean (relative error ~ N^slope), all N: "
        + _slopes(result["slope"]),
    ]
    if "tail_slope" in result:
        lines.append(f"Over N >= m = {result['m']} only: " + _slopes(result["tail_slope"]))
    skipped = {m: w for m, w in result.get("max_width", {}).items() if w < max(result["widths"])}
    if skipped:
        lines.append(
            "Skipped (too slow): "
            + ", ".join(f"{m.upper()} above N = {w}" for m, w in skipped.items())
        )
    lines.append(
        "Quantization seconds per method (all N and seeds): "
        + ", ".join(f"{m.upper()} {result['seconds'][m]:.1f}" for m in methods)
    )
    return "\n".join(lines) + "\n"


def _mean_std(result: dict, method: str, i: int) -> str:
    mean, std = result["mean"][method][i], result["std"][method][i]
    return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"


def _fmt_slope(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _slopes(slopes: dict[str, float | None]) -> str:
    return ", ".join(f"{m.upper()} {_fmt_slope(v)}" for m, v in slopes.items())


def _theory_curve(result: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """sqrt(m log N / N) over N >= m, scaled to GPFQ's mean error at the largest width."""
    if "gpfq" not in result["methods"] or result["mean"]["gpfq"][-1] is None:
        return None
    n = np.asarray([w for w in result["widths"] if w >= result["m"]], float)
    if len(n) < 2:
        return None
    shape = np.sqrt(np.log(n) / n)
    return n, shape * result["mean"]["gpfq"][-1] / shape[-1]


def plot_width_sweep(result: dict, path: str | os.PathLike) -> None:
    """Log-log relative error vs N per method, fitted slopes in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for meth in result["methods"]:
        pts = [
            (n, mu, sd)
            for n, mu, sd in zip(result["widths"], result["mean"][meth], result["std"][meth])
            if mu is not None
        ]
        n, mu, sd = (np.asarray(a, float) for a in zip(*pts))
        label = f"{meth.upper()} (slope {_fmt_slope(result['slope'][meth])}"
        if "tail_slope" in result:
            label += f"; N >= m: {_fmt_slope(result['tail_slope'][meth])}"
        ax.errorbar(
            n, mu, yerr=sd, marker="o", capsize=2, color=_COLORS.get(meth), label=label + ")"
        )
    ax.axvline(result["m"], color="gray", linestyle=":", label=f"N = m = {result['m']}")
    ref = _theory_curve(result)
    if ref is not None:
        ax.plot(*ref, color="gray", linestyle="--", label="∝ sqrt(m log N / N) (theory)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("layer width N (input features)")
    ax.set_ylabel("relative error ||XW - XQ|| / ||XW||")
    ax.set_title(
        f"Gaussian X, m = {result['m']}: {result['spec']['grid']} {result['spec']['bits']}"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path)


__all__ = [
    "Run",
    "run_grid",
    "same_alphabet",
    "reused_record",
    "make_spec",
    "bits_x",
    "calibration_indices",
    "calibration_images",
    "execute_run",
    "quantizer",
    "run_summary",
    "accuracy_table",
    "runs_table",
    "results_markdown",
    "write_text_atomic",
    "save_figure_atomic",
    "plot_accuracy_vs_bits",
    "plot_layer_errors",
    "gaussian_layer",
    "loglog_slope",
    "width_sweep",
    "width_sweep_markdown",
    "plot_width_sweep",
]
