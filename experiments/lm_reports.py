"""Markdown reports of the language-model experiment (``results.md``, ``layer_errors.md``).

Each function renders an LM results dict (as ``results.json`` holds it) into text; nothing
here computes or writes. Perplexity gaps are reported as the share of RTN's perplexity
increase over float that a method removes: ``1 - (ppl - float) / (ppl_rtn - float)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from experiments.reports import fmt_ppl as _ppl
from experiments.reports import layer_widths, mixed_label, mixed_layer_lines, mixed_table
from experiments.runs import is_mixed, successful, uniform


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def point_label(run: dict) -> str:
    """ "4-bit g64" or "4-bit per channel"."""
    groups = f"g{run['group_size']}" if run.get("group_size") else "per channel"
    return f"{run['bits']}-bit {groups}"


def _points(runs: list[dict]) -> list[tuple]:
    """(bits, group size, grid) of the runs, in run order."""
    return list(dict.fromkeys((r["bits"], r.get("group_size"), r["grid"]) for r in runs))


def _key(r: dict) -> tuple:
    return (r["bits"], r.get("group_size"), r["grid"])


def recovered(ppl: float, rtn: float, float_ppl: float) -> float | None:
    """Share of RTN's perplexity increase over float that ``ppl`` removes (None if RTN has
    no increase)."""
    gap = rtn - float_ppl
    return None if gap <= 0 else 1 - (ppl - float_ppl) / gap


def perplexity_table(results: dict) -> str:
    """One row per (bits, groups, grid), one column per method: perplexity, with the share
    of RTN's increase removed in brackets; then bits per weight (steps included)."""
    runs = uniform(results["runs"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cell = {(*_key(r), r["method"]): r for r in runs}
    fl = results["float"]["perplexity"]
    head = ["point", "grid", "bits/weight", *methods]
    lines = [_row(head), _row(["---"] * len(head))]
    for bits, gs, grid in _points(runs):
        rtn = cell.get((bits, gs, grid, "rtn"))
        cells, bpw = [], "-"
        for m in methods:
            r = cell.get((bits, gs, grid, m))
            if r is None:
                cells.append("-")
                continue
            bpw = f"{r['bits_per_weight']:.3f}"
            share = None
            if rtn is not None and m != "rtn":
                share = recovered(r["perplexity"], rtn["perplexity"], fl)
            cells.append(_ppl(r["perplexity"]) + ("" if share is None else f" ({share:.0%})"))
        label = point_label({"bits": bits, "group_size": gs})
        lines.append(_row([label, grid, bpw, *cells]))
    return "\n".join(lines)


def runs_table(results: dict) -> str:
    """Every run: perplexity, bits per weight, mean layer error, seconds, checkpoint size."""
    head = ["run", "steps", "calib. windows", "perplexity", "bits/weight", "mean rel. error",
            "quantize s", "capture s",
            "stats s", "quant s", "memory MB", "checkpoint MB", "peak RSS GB"]  # fmt: skip
    lines = [_row(head), _row(["---"] * len(head))]
    for r in results["runs"]:
        if "error" in r:
            lines.append(_row([r["name"], f"FAILED: {r['error']}", *[""] * (len(head) - 2)]))
            continue
        s, errs = r["seconds"], [lay["rel_error"] for lay in r["layers"]]
        disk = r["size"].get("quantized_disk_bytes")
        lines.append(_row([
            r["name"] + (" (resumed)" if r.get("resumed") else ""), r["scale"],
            r["calibration_windows"],
            _ppl(r["perplexity"]), f"{r['bits_per_weight']:.3f}",
            f"{sum(errs) / len(errs):.4f}", f"{s['total']:.0f}", f"{s['capture']:.0f}",
            f"{s['stats']:.0f}", f"{s['quant']:.0f}", f"{r['size']['quantized_bytes'] / 1e6:.1f}",
            "-" if disk is None else f"{disk / 1e6:.1f}", f"{r['peak_rss_bytes'] / 2**30:.2f}",
        ]))  # fmt: skip
    return "\n".join(lines)


def sizes_line(results: dict) -> str:
    """The float model's size in memory and as an orbax checkpoint on disk (MB = 1e6 bytes)."""
    done = successful(results["runs"])
    text = (f"Float model: {done[0]['size']['float_bytes'] / 1e6:.1f} MB in memory"
            if done else "Float model:")  # fmt: skip
    ckpt = results.get("float_checkpoint")
    if ckpt:
        text += (
            f"; its orbax checkpoint `{ckpt['path']}`: {ckpt['disk_bytes'] / 1e6:.1f} MB on disk"
        )
    return text + ". Each run's sizes are in the runs table."


def mixed_section(results: dict) -> list[str]:
    """The "Mixed precision" lines of results.md (none without budget or split runs)."""
    if not any(is_mixed(r) for r in successful(results["runs"])):
        return []
    return [
        "## Mixed precision",
        "",
        "Budget runs choose each layer's width under an average bits per weight (steps and "
        "zero points included; bits/weight is the achieved one); split runs put the first "
        "half of the blocks at one width and the rest at the other. The error sum is over "
        "the layers of the run (sequential quantization).",
        "",
        mixed_table(results),
        "",
    ]


def results_markdown(results: dict) -> str:
    """The readable report of an LM experiment (``results.md``)."""
    cal, ev, fl = results["calibration"], results["evaluation"], results["float"]
    done = [r for r in successful(results["runs"]) if not r.get("resumed")]
    lines = [
        f"# {results['model']}: post-training weight quantization",
        "",
        f"Model: `{results['model_file']}` ({results['params']:,} parameters), linear layers "
        "quantized, embeddings and norms float.",
        f"Calibration: {cal['windows']} windows of {cal['window']} tokens "
        f"({cal['tokens']:,} tokens; seed {cal['seed']}) from "
        + ", ".join(f"`{n}`" for n in cal["novels"])
        + f"; batches of {cal['batch_size']} windows.",
        f"Evaluation: perplexity on the first {ev['windows']} windows of {ev['window']} tokens "
        f"of `{ev['novel']}` from character {ev['start_char']:,} "
        f"({ev['predicted_tokens']:,} predicted tokens). Steps: {results['step_rule']}.",
        f"Float perplexity: **{fl['perplexity']:.3f}**.",
        sizes_line(results),
        "",
        "## Perplexity",
        "",
        "In brackets: the share of RTN's perplexity increase over float that the method "
        "removes. Bits per weight count codes, steps and zero points of the linear layers.",
        "",
        perplexity_table(results),
        "",
        *mixed_section(results),
        "## Runs",
        "",
        "Seconds are the whole-model quantization (captures, statistics, quantization, "
        "compilation), not the evaluation. Peak RSS is the process's peak so far.",
        "",
        runs_table(results),
        "",
        f"Wall time of the script: {results.get('seconds_total', 0):.0f} s "
        f"({len(done)} runs quantized in this invocation).",
    ]
    failed = [r for r in results["runs"] if "error" in r]
    if failed:
        lines += ["", f"{len(failed)} run(s) failed: " + ", ".join(r["name"] for r in failed)]
    return "\n".join(lines) + "\n"


def layer_kind(name: str) -> str:
    """The layer's role without its block index: "layers_3/attn/q_proj" -> "attn/q_proj"."""
    return re.sub(r"^layers_\d+/", "", name)


def layer_error_markdown(results: dict) -> str:
    """Per-layer relative output error of every run: means by layer role, then every layer
    (rows) x run (columns), one table per (bits, groups, grid) point."""
    runs = uniform(results["runs"])
    lines = [f"# {results['model']}: relative output error per layer", ""]
    for point in _points(runs):
        group = [r for r in runs if _key(r) == point]
        names = [lay["layer"] for lay in group[0]["layers"]]
        head = ["layer", *(r["method"] for r in group)]
        errs = [{lay["layer"]: lay["rel_error"] for lay in r["layers"]} for r in group]
        lines += [f"## {point_label(group[0])} {point[2]}", ""]
        kinds = list(dict.fromkeys(layer_kind(n) for n in names))
        lines += [_row(["mean over blocks", *head[1:]]), _row(["---"] * len(head))]
        for kind in kinds:
            members = [n for n in names if layer_kind(n) == kind]
            means = [sum(e.get(n, 0.0) for n in members) / len(members) for e in errs]
            lines.append(_row([kind, *(f"{m:.4f}" for m in means)]))
        lines += ["", _row(head), _row(["---"] * len(head))]
        for n in names:
            lines.append(_row([n, *(f"{e[n]:.4f}" if n in e else "-" for e in errs)]))
        lines.append("")
    return "\n".join(lines + mixed_layer_lines(results))


__all__ = [
    "layer_error_markdown",
    "layer_kind",
    "layer_widths",
    "mixed_label",
    "mixed_layer_lines",
    "mixed_section",
    "mixed_table",
    "perplexity_table",
    "point_label",
    "recovered",
    "results_markdown",
    "runs_table",
    "uniform",
]
