"""Plots (matplotlib, Agg backend, png): accuracy (or perplexity) vs bits, with mixed-precision
runs as points (one code path for both experiments), per-layer error, the width sweep.

Each function renders a results dict into a png written atomically (``gpfq_jax.atomic``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from experiments.reports import fmt_slope
from experiments.runs import bits_label, bits_x, is_mixed, successful, uniform
from gpfq_jax.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """``fig.savefig`` (png) to ``path`` atomically; closes ``fig``."""
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


_COLORS = {"gpfq": "C0", "rtn": "C1", "gptq": "C2", "qronos": "C5", "gpfq-act": "C4",
           "gptq-act": "C3", "qronos-act": "C6"}  # fmt: skip
_MARKERS = {"int": "o", "int_full": "s", "ls": "^", "zzs": "D"}


def plot_accuracy_vs_bits(results: dict, path: str | os.PathLike) -> None:
    """Test accuracy vs bits, one line per (method, grid, group size) of the uniform runs;
    float as a horizontal line. With mixed-precision (budget) runs, every run sits at its
    bits per weight (steps included) and the budget runs are points (:func:`_mixed_points`)."""
    plt = _pyplot()
    runs = uniform(results["runs"])
    mixed = [r for r in successful(results["runs"]) if is_mixed(r)]
    x = (lambda r: r["bits_per_weight"]) if mixed else (lambda r: bits_x(r["bits"]))  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    line = lambda r: (r["method"], r["grid"], r.get("group_size"))  # noqa: E731
    for m, g, gs in dict.fromkeys(line(r) for r in runs):
        pts = sorted((x(r), 100 * r["test_accuracy"]) for r in runs if line(r) == (m, g, gs))
        ax.plot(
            *zip(*pts),
            marker=_MARKERS.get(g, "x"),
            color=_COLORS.get(m),
            linestyle="-" if g == "int" else ":",
            label=f"{m.upper()} {g}" + (f" g{gs}" if gs else ""),
        )
    _mixed_points(ax, mixed, lambda r: 100 * r["test_accuracy"])
    ax.axhline(100 * results["float"]["test_accuracy"], color="k", linestyle="--", label="float")
    if mixed:
        ax.set_xlabel("bits per weight (codes + steps + zero points)")
    else:
        xs = sorted({r["bits"] for r in runs}, key=bits_x)
        ax.set_xticks([bits_x(b) for b in xs], ["tern." if b == "ternary" else str(b) for b in xs])
        ax.set_xlabel("bits")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['model']} / {results['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _mixed_points(ax: Any, runs: list[dict], y: Any) -> None:
    """Mixed-precision runs as points at their achieved bits per weight and ``y(record)``
    (star: budget, plus: split), one legend entry per (method, grid, kind)."""
    for m, g, budget in dict.fromkeys((r["method"], r["grid"], "budget" in r) for r in runs):
        pts = [(r["bits_per_weight"], y(r)) for r in runs
               if (r["method"], r["grid"], "budget" in r) == (m, g, budget)]  # fmt: skip
        ax.scatter(*zip(*pts), marker="*" if budget else "P", s=70 if budget else 45,
                   color=_COLORS.get(m), edgecolors="k", linewidths=0.4, zorder=3,
                   label=f"{m.upper()} {g} {'budget' if budget else 'split'}")  # fmt: skip


def plot_layer_errors(results: dict, path: str | os.PathLike) -> None:
    """Per-layer relative error, one panel per (grid, bits), one line per method (budget runs:
    one panel per (grid, groups), one line per run)."""
    plt = _pyplot()
    runs = [r for r in successful(results["runs"]) if "same_as" not in r]
    panel = lambda r: (r["grid"], r["bits"], r.get("group_size") or 0)  # noqa: E731
    at = lambda b: math.inf if b == "mixed" else bits_x(b)  # noqa: E731
    panels = sorted(
        dict.fromkeys(panel(r) for r in runs),
        key=lambda p: (p[0] != "int", p[0], at(p[1]), p[2]),
    )
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (g, b, gs) in zip(axes.flat, panels):
        for r in runs:
            if panel(r) != (g, b, gs):
                continue
            errs = [lay["rel_error"] for lay in r["layers"]]
            mixed = is_mixed(r)
            ax.plot(
                range(len(errs)),
                errs,
                marker="o",
                color=None if mixed else _COLORS.get(r["method"]),
                label=r["name"] if mixed else r["method"].upper(),
            )
        names = [lay["layer"] for lay in runs[0]["layers"]]
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        width = "mixed" if b == "mixed" else bits_label(b)
        ax.set_title(f"{g} {width}" + (f" g{gs}" if gs else ""), fontsize=9)
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, path)


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
        label = f"{meth.upper()} (slope {fmt_slope(result['slope'][meth])}"
        if "tail_slope" in result:
            label += f"; N >= m: {fmt_slope(result['tail_slope'][meth])}"
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
    save_figure(fig, path)


def plot_perplexity_vs_bits(results: dict, path: str | os.PathLike) -> None:
    """Perplexity (log scale) vs bits per weight (steps included), one line per (method,
    grid) of the uniform runs; mixed-precision runs as points at their achieved bits per
    weight (star: budget, plus: split), one legend entry per (method, grid, kind); float as
    a horizontal line."""
    plt = _pyplot()
    runs = uniform(results["runs"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, g in dict.fromkeys((r["method"], r["grid"]) for r in runs):
        pts = sorted(
            (r["bits_per_weight"], r["perplexity"])
            for r in runs
            if (r["method"], r["grid"]) == (m, g)
        )
        ax.plot(*zip(*pts), marker="o" if g == "int" else "s", color=_COLORS.get(m),
                linestyle="-" if g == "int" else ":", label=f"{m.upper()} {g}")  # fmt: skip
    mixed = [r for r in successful(results["runs"]) if is_mixed(r)]
    _mixed_points(ax, mixed, lambda r: r["perplexity"])
    ax.axhline(results["float"]["perplexity"], color="k", linestyle="--", label="float")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + steps + zero points)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{results['model']}: perplexity on {results['evaluation']['novel']}",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_lm_layer_errors(results: dict, path: str | os.PathLike) -> None:
    """Per-layer relative error in forward order, one panel per (bits, groups, grid) point
    (mixed-precision runs: one panel per (groups, grid), one line per run), one line per
    method (log scale)."""
    plt = _pyplot()
    runs = successful(results["runs"])
    points = list(dict.fromkeys((r["bits"], r.get("group_size"), r["grid"]) for r in runs))
    ncols = min(len(points), 2)
    nrows = math.ceil(len(points) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3 * nrows), squeeze=False)
    for ax, (bits, gs, grid) in zip(axes.flat, points):
        for r in runs:
            if (r["bits"], r.get("group_size"), r["grid"]) != (bits, gs, grid):
                continue
            errs = [lay["rel_error"] for lay in r["layers"]]
            mixed = is_mixed(r)
            ax.plot(errs, color=None if mixed else _COLORS.get(r["method"]), linewidth=0.8,
                    label=r["name"] if mixed else r["method"].upper())  # fmt: skip
        ax.set_yscale("log")
        width = "mixed" if bits == "mixed" else f"{bits}-bit"
        ax.set_title(f"{width} {f'g{gs}' if gs else 'per channel'} {grid}", fontsize=9)
        ax.set_xlabel("layer (forward order)")
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(points) :]:
        ax.set_visible(False)
    fig.tight_layout()
    save_figure(fig, path)


__all__ = [
    "plot_accuracy_vs_bits",
    "plot_layer_errors",
    "plot_lm_layer_errors",
    "plot_perplexity_vs_bits",
    "plot_width_sweep",
    "save_figure",
]
