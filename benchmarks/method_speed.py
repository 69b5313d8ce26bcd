"""Time of each method on the same layers, side by side: RTN, GPFQ, GPTQ and Qronos, each
plain and with act-order.

Run from the repository root::

    python benchmarks/method_speed.py            # SmolLM2's layer shapes (a few minutes on 2 cores)
    python benchmarks/method_speed.py --quick    # small layers (seconds)

Each layer is one ``quantize_from_stats`` call on the same statistics (H, G, F from
``--rows`` rows of correlated inputs X and drifted inputs X~ = X + noise, as a partially
quantized model gives them), with the LM experiment's spec (4-bit asym, groups of 64, the
seven-multiplier step search) and with 4-bit per-channel int absmax steps. Per method: the
first call (compilation included) and the best of ``--repeats`` later calls, the ratio of the
latter to plain GPFQ's, and the layer's relative output error. Prints a markdown table and
writes JSON (default benchmarks/results/method_speed.json).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import fmt, git_state, loadavg, write_report

import gpfq_jax as gq

DEFAULT_OUT = Path("benchmarks/results/method_speed.json")
METHODS = ("rtn", "gpfq", "gpfq-act", "gptq", "gptq-act", "qronos", "qronos-act")
# SmolLM2-135M's linear shapes: q/o (576 -> 576), gate/up (576 -> 1536), down (1536 -> 576)
SHAPES = ((576, 576), (576, 1536), (1536, 576))
QUICK_SHAPES = ((128, 64),)
SEARCH = tuple(2.0 ** (e / 8) for e in range(-4, 3))  # configs/smollm2.py's search_grid


def specs(n_in: int) -> dict[str, gq.QuantSpec]:
    group = 64 if n_in % 64 == 0 else None
    return {
        "4-bit asym g64, search": gq.QuantSpec(
            bits=4, grid="asym", group_size=group, scale="search", search_grid=SEARCH
        ),
        "4-bit int per channel, max": gq.QuantSpec(bits=4, grid="int", scale="max"),
    }


def problem(n_in: int, n_out: int, rows: int, seed: int) -> tuple[jax.Array, gq.LayerStats]:
    """Weights (n_in, n_out) and the statistics of correlated X and drifted X~ (rows, n_in)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)
    x = (rng.normal(size=(rows, n_in)) @ mix).astype(np.float32)
    xq = (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    return jnp.asarray(w), gq.stats_from_data(jnp.asarray(x), jnp.asarray(xq))


def timed(call, repeats: int) -> tuple[float, float, gq.LayerResult]:
    """(first call s, best later call s, result)."""
    t0 = time.perf_counter()
    res = call()
    jax.block_until_ready(res.codes)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = call()
        jax.block_until_ready(res.codes)
        best = min(best, time.perf_counter() - t0)
    return first, best, res


def measure(shapes, rows: int, repeats: int, seed: int) -> list[dict]:
    out = []
    for n_in, n_out in shapes:
        w, stats = problem(n_in, n_out, rows, seed)
        for spec_name, spec in specs(n_in).items():
            base = None
            for label in METHODS:
                method, _, act = label.partition("-")
                call = functools.partial(gq.quantize_from_stats, w, stats, spec, method,
                                         act_order=bool(act))  # fmt: skip
                first, best, res = timed(call, repeats)
                base = best if label == "gpfq" else base
                out.append({"layer": f"{n_in} -> {n_out}", "spec": spec_name, "method": label,
                            "first_s": first, "best_s": best,
                            "rel_error": res.rel_error})  # fmt: skip
            for r in out[-len(METHODS) :]:
                r["x_gpfq"] = r["best_s"] / base
            print_rows(out[-len(METHODS) :])
    return out


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"| {r['layer']} | {r['spec']} | {r['method']} | {fmt(r['first_s'], '{:.2f}')} | "
              f"{fmt(r['best_s'], '{:.3f}')} | {fmt(r['x_gpfq'], '{:.2f}')} | "
              f"{fmt(r['rel_error'], '{:.4f}')} |", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small layers (seconds)")
    ap.add_argument("--rows", type=int, default=4096, help="calibration rows per layer")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    load_start = loadavg()
    print("| layer | spec | method | first call s | best s | x GPFQ | rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = measure(QUICK_SHAPES if args.quick else SHAPES, args.rows, args.repeats, args.seed)
    write_report(args.out, "method_speed", rows, quick=args.quick, rows_per_layer=args.rows,
                 repeats=args.repeats, load_start=load_start, load_end=loadavg(),
                 git=git_state())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
