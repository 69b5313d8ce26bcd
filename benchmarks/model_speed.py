"""Whole-model speed benchmark: where ``quantize_params`` spends its time.

Run from the repository root::

    python benchmarks/model_speed.py            # full run (a few minutes on 2 cores)
    python benchmarks/model_speed.py --quick    # smoke run, shrunken sizes

Models (random weights, random Gaussian inputs, Linen):

- ``mlp``: Dense(width) x hidden -> Dense(10), ReLU.
- ``resnet``: a conv stem, residual blocks [conv-BN-relu-conv-BN + skip, relu] (BatchNorm in
  inference mode), global average pool, Dense(10).
- ``depth``: MLPs with 2, 4 and 8 hidden layers of the same width, to show how capture time
  grows with the layer index: capturing layer l runs the float and the partially quantized
  model up to l, so its cost per batch grows linearly with l (total capture cost is quadratic
  in depth), while statistics and quantization depend only on the layer's own shape.

Per layer the driver reports capture (forward passes; the first batch includes compiling the
layer's capture function, reported apart as ``capture_first_s``), statistics (accumulating
H, G, F) and quantization (``quantize_from_stats``, including its compilation for a new shape).
``capture_steady_per_batch_s`` = (capture_s - capture_first_s) / (batches - 1) is the
compile-free capture cost. The machine's load average is recorded: absolute times on a shared
machine are noisy.

Prints tables; writes JSON (default ``benchmarks/results/model_speed.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt as _f
from _report import loadavg

DEFAULT_OUT = Path("benchmarks/results/model_speed.json")
FULL = {
    "mlp": {"in": 784, "width": 512, "hidden": 3, "m": 4096, "batch": 512},
    "resnet": {"hw": 32, "width": 32, "blocks": 3, "m": 512, "batch": 64},
    "depth": {"in": 256, "width": 256, "depths": (2, 4, 8), "m": 4096, "batch": 512},
}
QUICK = {
    "mlp": {"in": 64, "width": 64, "hidden": 2, "m": 256, "batch": 64},
    "resnet": {"hw": 8, "width": 8, "blocks": 1, "m": 32, "batch": 16},
    "depth": {"in": 32, "width": 32, "depths": (2, 4, 8), "m": 256, "batch": 64},
}


def _models():
    import flax.linen as nn

    class MLP(nn.Module):
        width: int
        hidden: int

        @nn.compact
        def __call__(self, x):
            for _ in range(self.hidden):
                x = nn.relu(nn.Dense(self.width)(x))
            return nn.Dense(10)(x)

    class Block(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            bn = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
            h = nn.relu(bn()(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
            h = bn()(nn.Conv(self.width, (3, 3), use_bias=False)(h))
            return nn.relu(x + h)

    class ResNet(nn.Module):
        width: int
        blocks: int

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Conv(self.width, (3, 3))(x))
            for _ in range(self.blocks):
                x = Block(self.width)(x, train)
            return nn.Dense(10)(x.mean(axis=(1, 2)))

    return MLP, ResNet


def run_model(name: str, model: Any, x: np.ndarray, batch: int, spec: Any, method: str) -> dict:
    """Quantize ``model`` on ``x``; per-layer and total times."""
    import jax

    import gpfq_jax as gq

    variables = model.init(jax.random.PRNGKey(0), x[:1])
    t0 = time.perf_counter()
    res = gq.quantize_params(model, variables, x, spec, method, batch_size=batch, progress=False)
    wall = time.perf_counter() - t0
    n_batches = -(-x.shape[0] // batch)
    layers = []
    for i, r in enumerate(res.layers):
        steady = (
            (r.capture_seconds - r.capture_first_seconds) / (n_batches - 1)
            if n_batches > 1
            else None
        )
        layers.append(
            {
                "index": i,
                "layer": r.name,
                "kind": r.kind,
                "shape": list(r.shape),
                "rows": r.rows,
                "capture_s": r.capture_seconds,
                "capture_first_s": r.capture_first_seconds,
                "capture_steady_per_batch_s": steady,
                "stats_s": r.stats_seconds,
                "quant_s": r.quant_seconds,
                "total_s": r.seconds,
                "rel_error": r.rel_error,
            }
        )
    total = {
        k: sum(lay[k] for lay in layers)
        for k in ("capture_s", "capture_first_s", "stats_s", "quant_s", "total_s")
    }
    return {
        "model": name,
        "samples": int(x.shape[0]),
        "batch": batch,
        "batches": n_batches,
        "layers": layers,
        "total": total,
        "wall_s": wall,
        "overhead_s": wall - total["total_s"],
    }


def depth_fit(run: dict) -> dict:
    """Least-squares slope of steady capture time per batch vs layer index."""
    pts = [
        (lay["index"], lay["capture_steady_per_batch_s"])
        for lay in run["layers"]
        if lay["capture_steady_per_batch_s"] is not None
    ]
    if len(pts) < 2:
        return {"slope_s_per_layer": None, "intercept_s": None, "last_over_first": None}
    i, t = np.array(pts, dtype=float).T
    slope, intercept = np.polyfit(i, t, 1)
    return {
        "slope_s_per_layer": float(slope),
        "intercept_s": float(intercept),
        "last_over_first": float(t[-1] / t[0]) if t[0] > 0 else None,
    }


def layer_table(run: dict) -> str:
    head = (
        "| # | layer | kind | shape | rows | capture s | (1st batch) | steady/batch s | "
        "stats s | quant s | total s |"
    )
    lines = [
        f"### {run['model']} ({run['samples']} samples, {run['batches']} batches)",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for lay in run["layers"]:
        lines.append(
            f"| {lay['index']} | {lay['layer']} | {lay['kind']} | "
            f"{'x'.join(map(str, lay['shape']))} | {lay['rows']} | "
            f"{_f(lay['capture_s'])} | {_f(lay['capture_first_s'])} | "
            f"{_f(lay['capture_steady_per_batch_s'], '{:.4f}')} | "
            f"{_f(lay['stats_s'])} | {_f(lay['quant_s'])} | {_f(lay['total_s'])} |"
        )
    t = run["total"]
    lines.append(
        f"| | **total** | | | | {_f(t['capture_s'])} | {_f(t['capture_first_s'])} | | "
        f"{_f(t['stats_s'])} | {_f(t['quant_s'])} | {_f(t['total_s'])} |"
    )
    lines.append(
        f"\nwall {run['wall_s']:.2f} s (driver overhead outside layers "
        f"{run['overhead_s']:.2f} s: discovery, tracing)"
    )
    return "\n".join(lines)


def depth_table(depth: dict) -> str:
    lines = [
        "### capture time vs layer index (steady state, per batch)",
        "",
        "| hidden layers | per-layer capture s/batch (index 0..L) | slope s/layer | last/first |",
        "|---|---|---|---|",
    ]
    for d, entry in depth.items():
        per = ", ".join(
            _f(lay["capture_steady_per_batch_s"], "{:.4f}") for lay in entry["run"]["layers"]
        )
        fit = entry["fit"]
        lines.append(
            f"| {d} | {per} | {_f(fit['slope_s_per_layer'], '{:.2e}')} | "
            f"{_f(fit['last_over_first'], '{:.2f}')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default="gpfq", choices=("gpfq", "rtn", "gptq"))
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    import gpfq_jax as gq

    cfg = QUICK if args.quick else FULL
    spec = gq.QuantSpec(bits=args.bits)
    rng = np.random.default_rng(args.seed)
    MLP, ResNet = _models()
    meta = {
        "quick": args.quick,
        "bits": args.bits,
        "method": args.method,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_start": loadavg(),
        "config": cfg,
    }
    t0 = time.perf_counter()

    c = cfg["mlp"]
    x = rng.standard_normal((c["m"], c["in"])).astype(np.float32)
    mlp = run_model("mlp", MLP(c["width"], c["hidden"]), x, c["batch"], spec, args.method)
    print(layer_table(mlp), "\n", flush=True)

    c = cfg["resnet"]
    x = rng.standard_normal((c["m"], c["hw"], c["hw"], 3)).astype(np.float32)
    resnet = run_model("resnet", ResNet(c["width"], c["blocks"]), x, c["batch"], spec, args.method)
    print(layer_table(resnet), "\n", flush=True)

    c = cfg["depth"]
    x = rng.standard_normal((c["m"], c["in"])).astype(np.float32)
    depth = {}
    for d in c["depths"]:
        run = run_model(f"mlp_depth{d}", MLP(c["width"], d), x, c["batch"], spec, args.method)
        depth[str(d)] = {"run": run, "fit": depth_fit(run)}
    print(depth_table(depth), flush=True)

    meta["load_end"] = loadavg()
    meta["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"meta": meta, "models": {"mlp": mlp, "resnet": resnet}, "depth": depth}, indent=1
        )
    )
    print(f"\nwrote {args.out} ({meta['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
