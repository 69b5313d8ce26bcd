"""The width sweep: one Dense layer's relative quantization error vs its width N on Gaussian
data (no checkpoint or dataset). ``width_sweep_experiment(config, workdir)`` is what
``quantize.py --config=configs/width_sweep.py`` runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

import gpfq_jax as gq
from experiments import paths, plots, reports
from gpfq_jax.atomic import write_json_atomic, write_text_atomic
from gpfq_jax.core.alphabets import describe


def width_sweep_experiment(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """The sweep of ``config.sweep``: width_sweep.{json,md,png} in ``workdir``; the result."""
    t_start = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    s = config.sweep
    spec = gq.QuantSpec(
        bits=s.bits, grid=s.grid, scale=s.scale, c=s.get("c", 1.0), per_channel=s.get("per_channel")
    )
    max_width = {"gptq": s.gptq_max_width} if s.get("gptq_max_width") else None
    result = width_sweep(
        list(s.widths), s.m, s.neurons, list(s.seeds), spec, tuple(s.methods), max_width
    )
    result["tail_slope"] = tail_slopes(result, s.m)
    result.update(
        seconds_total=time.time() - t_start,
        config=paths.relative_config(config.to_dict(), workdir),
        command=paths.command_line(workdir),
        machine={"cpus": os.cpu_count(), "jax": jax.__version__},
    )
    write_json_atomic(workdir / "width_sweep.json", result)
    write_text_atomic(workdir / "width_sweep.md", reports.width_sweep_markdown(result))
    plots.plot_width_sweep(result, workdir / "width_sweep.png")
    return result


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
    spec: gq.QuantSpec,
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
            stats = gq.stats_from_data(x, x, jnp.float32)
            for meth in methods:
                if n > max_width.get(meth, n):
                    continue
                t0 = time.perf_counter()
                errors[meth][i].append(gq.quantize_from_stats(w, stats, spec, meth).rel_error)
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


__all__ = [
    "gaussian_layer",
    "loglog_slope",
    "tail_slopes",
    "width_sweep",
    "width_sweep_experiment",
]
