"""Step-search speed for GPTQ: H factored once per layer vs once per multiplier.

Run from the repository root::

    python benchmarks/search_speed.py            # N = 1024, 2048 (a few minutes on 2 cores)
    python benchmarks/search_speed.py --quick    # N = 128, 256 (seconds)

``scale="search"`` tries every multiplier of ``QuantSpec.search_grid`` (17 by default) on each
layer. GPTQ's damped Cholesky factor of H^{-1} does not depend on the step, so
``quantize_from_stats`` computes it once (``gptq_factor``) and runs only
``gptq_codes_from_factor`` per multiplier. The "per multiplier" column times the same search
with ``gptq_codes`` (factor + codes) per multiplier, as before the change; both sides pick the
same codes (checked). Times are the best of ``--repeats`` after a warm-up, measured side by side.
Prints a markdown table and writes JSON (default benchmarks/results/search_speed.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import write_report

import gpfq_jax as gq
from gpfq_jax.core.gptq import gptq_codes
from gpfq_jax.core.output_error import error_given_terms, error_terms

DEFAULT_OUT = Path("benchmarks/results/search_speed.json")


def problem(n: int, n_out: int, seed: int):
    rng = np.random.default_rng(seed)
    m = 2 * n
    x = np.maximum(rng.normal(size=(m, n)), 0).astype(np.float32)
    w = (rng.normal(size=(n, n_out)) / np.sqrt(n)).astype(np.float32)
    stats = gq.stats_from_data(jnp.asarray(x))
    return jnp.asarray(w), stats


def search_refactoring(w, stats, spec: gq.QuantSpec):
    """The search with GPTQ factoring H for every multiplier (the old path)."""
    terms = error_terms(stats, w[None])
    best_err, best_codes = None, None
    for mult in spec.search_grid:
        delta = gq.step_size(w, spec, spec.c * mult)
        codes = gptq_codes(w, stats.hess[0], delta, spec.alphabet)
        q = gq.dequantize(codes, delta[None, :], spec.alphabet.offset)
        err = error_given_terms(stats, terms, w[None], q[None])[0]
        if best_err is None:
            best_err, best_codes = err, codes
        else:
            better = err < best_err
            best_err = jnp.where(better, err, best_err)
            best_codes = jnp.where(better[None, :], codes, best_codes)
    return jax.block_until_ready(best_codes)


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(n: int, n_out: int, repeats: int, seed: int) -> dict:
    w, stats = problem(n, n_out, seed)
    spec = gq.QuantSpec(bits=4, scale="search")
    once, res = best_time(
        lambda: jax.block_until_ready(gq.quantize_from_stats(w, stats, spec, "gptq").codes), repeats
    )
    per_mult, ref = best_time(lambda: search_refactoring(w, stats, spec), repeats)
    agree = float(np.mean(np.asarray(res) == np.asarray(ref)))
    return {
        "n_in": n,
        "n_out": n_out,
        "multipliers": len(spec.search_grid),
        "factor_once_s": once,
        "factor_per_multiplier_s": per_mult,
        "speedup": per_mult / once,
        "codes_agree": agree,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    sizes = [(128, 64), (256, 64)] if args.quick else [(1024, 128), (2048, 128)]
    rows = []
    print("| N_in -> N_out | factor once | factor per multiplier | speedup | codes agree |")
    print("| --- | --- | --- | --- | --- |")
    for n, n_out in sizes:
        r = measure(n, n_out, args.repeats, args.seed)
        rows.append(r)
        print(
            f"| {n} -> {n_out} | {r['factor_once_s']:.2f} s | "
            f"{r['factor_per_multiplier_s']:.2f} s | {r['speedup']:.1f}x | "
            f"{100 * r['codes_agree']:.2f}% |",
            flush=True,
        )
    write_report(args.out, "search_speed", rows, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
