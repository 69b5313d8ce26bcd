"""Markdown reports: the accuracy and run tables of ``results.md``, the mixed-precision tables
(shared with ``experiments.lm_reports``) and the width sweep's table.

Each function renders a results dict (as ``results.json`` / ``width_sweep.json`` hold it) into
text; nothing here computes or writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from experiments.runs import bits_label, bits_x, is_mixed, successful, uniform


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def fmt_ppl(x: float | None) -> str:
    """A perplexity: 2 decimals, 3 significant digits from 10,000 on, "-" for None."""
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def _bpw(r: dict) -> str:
    return f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"


def accuracy_table(results: dict, key: str = "test_accuracy") -> str:
    """Markdown table: one row per (method, grid), one column per bit width, cells = accuracy
    in percent; a float row on top ("-" where a run is missing or failed). Uniform runs only
    (the mixed-precision ones are in :func:`mixed_table`)."""
    runs = uniform(results["runs"])
    cols = sorted({r["bits"] for r in runs}, key=bits_x)
    rows = list(dict.fromkeys((r["method"], r["grid"], r.get("group_size")) for r in runs))
    cell = {(r["method"], r["grid"], r.get("group_size"), r["bits"]): r[key] for r in runs}
    fl = results["float"].get(key)
    head = ["method", *(bits_label(b) for b in cols)]
    lines = [
        _md_row(head),
        _md_row(["---"] * len(head)),
        _md_row(["float", *([_pct(fl)] * len(cols))]),
    ]
    for m, g, gs in rows:
        name = f"{m.upper()} {g}" + (f" g{gs}" if gs else "")
        lines.append(_md_row([name, *(_pct(cell.get((m, g, gs, b))) for b in cols)]))
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Markdown table of every run: levels, storage bits, bits per weight (steps included),
    val/test accuracy, per-layer relative error, chosen c (mean over channels) and the
    capture/stats/quant seconds ("mixed" levels and storage bits for a mixed-precision run)."""
    head = [
        "run",
        "levels",
        "storage bits",
        "bits/weight",
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
        mixed = is_mixed(r)
        lines.append(
            _md_row(
                [
                    r["name"],
                    "mixed" if mixed else r["levels"],
                    "mixed" if mixed else r["storage_bits"],
                    _bpw(r),
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


# --------------------------------------------------------------------------- mixed precision


def layer_widths(run: dict) -> dict[int, int]:
    """Bit width -> number of layers at it, of a mixed-precision run's record."""
    out: dict[int, int] = {}
    for lay in run["layers"]:
        out[lay["bits"]] = out.get(lay["bits"], 0) + 1
    return out


def mixed_label(run: dict) -> str:
    """ "budget 3.0", "budget 3.0, Fisher" (widths chosen by the Fisher objective) or "3 then
    2 bits" (first half of the blocks, then the rest)."""
    if run.get("budget") is not None:
        fisher = (run.get("allocation") or {}).get("objective") == "fisher"
        return f"budget {run['budget']}" + (", Fisher" if fisher else "")
    first, rest = run["split"]
    return f"{first} then {rest} bits"


# The scores of a mixed-precision table: (column, record key, format), shown when a run has it
# (perplexity in the LM experiment, val and test accuracy in the vision one).
_SCORES = (
    ("perplexity", "perplexity", fmt_ppl),
    ("val %", "val_accuracy", _pct),
    ("test %", "test_accuracy", _pct),
)


def mixed_table(results: dict) -> str:
    """The budget and split runs: budget, achieved bits per weight, scores (perplexity, or
    val and test accuracy), summed squared relative error of the run's layers, and the number
    of layers at each width."""
    runs = [r for r in successful(results["runs"]) if is_mixed(r)]
    widths = sorted({b for r in runs for b in layer_widths(r)})
    scores = [s for s in _SCORES if any(s[1] in r for r in runs)]
    head = ["run", "widths", "bits/weight", *(s[0] for s in scores), "sum rel. error²",
            *(f"layers at {b}" for b in widths)]  # fmt: skip
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for r in runs:
        count = layer_widths(r)
        lines.append(_md_row([
            r["name"], mixed_label(r), f"{r['bits_per_weight']:.3f}",
            *(fmt(r.get(key)) for _, key, fmt in scores),
            f"{sum(lay['rel_error'] ** 2 for lay in r['layers']):.4f}",
            *(count.get(b, 0) for b in widths),
        ]))  # fmt: skip
    return "\n".join(lines)


def mixed_layer_lines(results: dict) -> list[str]:
    """Every layer (rows) x mixed-precision run (columns): error (bits)."""
    runs = [r for r in successful(results["runs"]) if is_mixed(r)]
    if not runs:
        return []
    head = ["layer", *(r["name"] for r in runs)]
    cells = [{lay["layer"]: f"{lay['rel_error']:.4f} ({lay['bits']})" for lay in r["layers"]}
             for r in runs]  # fmt: skip
    lines = ["## Mixed precision: error (bits)", "", _md_row(head), _md_row(["---"] * len(head))]
    for n in dict.fromkeys(lay["layer"] for r in runs for lay in r["layers"]):
        lines.append(_md_row([n, *(c.get(n, "-") for c in cells)]))
    return lines + [""]


def uniform_neighbours_table(results: dict) -> str:
    """Each mixed-precision run beside the uniform runs of its method, grid and group size
    nearest its achieved bits per weight: the widest at or below it and the narrowest above
    it (cells: run, bits per weight, test accuracy; "-" where there is none)."""
    done = successful(results["runs"])
    flat = [r for r in uniform(done) if "bits_per_weight" in r and "same_as" not in r]
    line = lambda r: (r["method"], r["grid"], r.get("group_size"))  # noqa: E731

    def cell(u: dict | None) -> str:
        return "-" if u is None else f"{u['name']}: {_bpw(u)}, {_pct(u['test_accuracy'])}%"

    head = ["run", "bits/weight", "test %", "uniform at or below", "uniform above"]
    lines = [_md_row(head), _md_row(["---"] * len(head))]
    for r in (r for r in done if is_mixed(r)):
        same = [u for u in flat if line(u) == line(r)]
        bpw = r["bits_per_weight"]
        below = max((u for u in same if u["bits_per_weight"] <= bpw),
                    key=lambda u: u["bits_per_weight"], default=None)  # fmt: skip
        above = min((u for u in same if u["bits_per_weight"] > bpw),
                    key=lambda u: u["bits_per_weight"], default=None)  # fmt: skip
        lines.append(_md_row([r["name"], f"{bpw:.3f}", _pct(r["test_accuracy"]), cell(below),
                              cell(above)]))  # fmt: skip
    return "\n".join(lines)


def budget_section(results: dict) -> list[str]:
    """The "Mixed precision" lines of a vision results.md (none without budget runs): the
    budget runs, each beside its nearest uniform runs, and every layer's error and width."""
    if not any(is_mixed(r) for r in successful(results["runs"])):
        return []
    return [
        "## Mixed precision",
        "",
        "Budget runs choose each layer's width under an average bits per weight (codes, "
        "float32 steps and zero points, as size_report counts them; bits/weight is the "
        "achieved one, counted the same way for the uniform runs). The error sum is over the "
        "layers of the run (sequential quantization).",
        "",
        mixed_table(results),
        "",
        "The uniform runs of the same method, grid and groups nearest each budget run's "
        "bits per weight:",
        "",
        uniform_neighbours_table(results),
        "",
        *mixed_layer_lines(results),
    ]


def results_markdown(results: dict) -> str:
    """The readable report of a whole-model experiment (``results.md``)."""
    f, cal = results["float"], results["calibration"]
    runs = [r for r in successful(results["runs"]) if "same_as" not in r]
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
        *budget_section(results),
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


# --------------------------------------------------------------------------- width sweep


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


def fmt_slope(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def _slopes(slopes: dict[str, float | None]) -> str:
    return ", ".join(f"{m.upper()} {fmt_slope(v)}" for m, v in slopes.items())


__all__ = [
    "accuracy_table",
    "budget_section",
    "fmt_ppl",
    "fmt_slope",
    "layer_widths",
    "mixed_label",
    "mixed_layer_lines",
    "mixed_table",
    "results_markdown",
    "runs_table",
    "uniform_neighbours_table",
    "width_sweep_markdown",
]
