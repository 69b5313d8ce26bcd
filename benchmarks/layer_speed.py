"""Layer-level speed benchmark: GPFQ data form vs the Gram-form path (statistics + quantization).

Run from the repository root::

    python benchmarks/layer_speed.py                      # full run, several minutes on 2 cores
    python benchmarks/layer_speed.py --quick              # smoke run (< 30 s), shrunken sizes
    python benchmarks/layer_speed.py --cases dense784_m25k,dense4096_m8k
    python benchmarks/layer_speed.py --cases dense4096_m8k --block-sizes 64,128,256,512

Cases (``--quick`` keeps the names, shrinks the sizes and the data-form limits):

- ``dense784_m5k``, ``dense784_m25k``: dense 784->500 at m = 5,000 and 25,000 rows.
- ``conv4608_m50k``: conv-shaped 4608->512 (3x3x512 -> 512) at m = 50,000 rows, streamed in
  batches of 5,000 (random rows; the full X is never held by the Gram path).
- ``dense4096_m8k``: dense 4096->4096 at m = 8,192.

Every case runs in fresh subprocesses (one for the data form, one for the Gram path) so that
the peak RSS (``ru_maxrss``) of each is its own. The data form runs only where its residual
(m * N_out * 4 bytes) fits ``--data-form-max-gb`` and its time, extrapolated from a probe on the
first 64 features, is below ``--data-form-max-s``; otherwise the row says why it was skipped.
Times are best-of-a-few after a warm-up (``jax.block_until_ready``, ``time.perf_counter``);
compile time of the Gram step is reported apart (first call vs steady state). The machine's
load average is recorded because absolute times on a shared machine are noisy; ratios measured
side by side are the meaningful numbers.

Targets (printed as PASS/FAIL and stored in the JSON):
  (1) data form / whole Gram path on dense784_m25k >= 8;
  (2) whole Gram path / (3 statistics products + one N x N x N_out product) on the same <= 2;
  (3) Gram quantization step / one N x N x N_out product on dense4096_m8k <= 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt as _f
from _report import loadavg, rss_mib

NOISE = 0.05  # x_quant = relu(z + NOISE * e) while x = relu(z): a mildly perturbed layer input
PROBE_FEATURES = 64
DEFAULT_OUT = Path("benchmarks/results/layer_speed.json")


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer problem: N = n_in features, n_out neurons, m rows in batches of ``batch``."""

    name: str
    n_in: int
    n_out: int
    m: int
    batch: int
    kind: str  # "dense" or "conv" (conv: rows are streamed, never held whole by the Gram path)

    @property
    def batches(self) -> int:
        return self.m // self.batch


FULL_CASES = {
    c.name: c
    for c in (
        Case("dense784_m5k", 784, 500, 5_000, 5_000, "dense"),
        Case("dense784_m25k", 784, 500, 25_000, 5_000, "dense"),
        Case("conv4608_m50k", 4608, 512, 50_000, 5_000, "conv"),
        Case("dense4096_m8k", 4096, 4096, 8_192, 4_096, "dense"),
    )
}
QUICK_CASES = {
    c.name: c
    for c in (
        Case("dense784_m5k", 196, 100, 1_000, 1_000, "dense"),
        Case("dense784_m25k", 196, 64, 4_000, 1_000, "dense"),
        Case("conv4608_m50k", 576, 128, 8_000, 2_000, "conv"),
        Case("dense4096_m8k", 512, 512, 2_048, 1_024, "dense"),
    )
}
# (data-form memory limit in GB, data-form time limit in s, timing budget per measurement in s)
FULL_LIMITS = (4.0, 180.0, 30.0)
QUICK_LIMITS = (0.002, 5.0, 1.0)  # scaled down so that --quick also exercises the skip path

TARGETS = (
    (
        "1_gram_path_vs_data_form",
        "dense784_m25k",
        "speedup",
        ">=",
        8.0,
        "data form time / whole Gram path time (stats + quantization)",
    ),
    (
        "2_gram_path_vs_products",
        "dense784_m25k",
        "path_vs_products",
        "<=",
        2.0,
        "whole Gram path / (3 statistics products + one N x N x N_out product)",
    ),
    (
        "3_gram_step_vs_matmul",
        "dense4096_m8k",
        "quant_vs_matmul",
        "<=",
        2.0,
        "Gram quantization step / one N x N x N_out product",
    ),
)


# ----------------------------------------------------------------------------- utilities


def _gb(v: float) -> str:
    return f"{v:.2f} GB" if v >= 0.1 else f"{v * 1e3:.1f} MB"


def count_processes(script: str) -> int:
    """How many running processes have an argument whose file name is ``script`` (Linux)."""
    n = 0
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = p.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        n += any(Path(a).name == script for a in argv if a)
    return n


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, output) of one call, synchronised with ``jax.block_until_ready``."""
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def interleave(
    tasks: dict[str, Callable[[], float]], best: dict[str, float], rounds: int, deadline: float
) -> None:
    """Run the tasks (each returns its own seconds) in turn for up to ``rounds`` rounds, keeping
    the best time of each in ``best``; a round starts only before ``deadline`` (perf_counter).

    Side-by-side rounds keep the ratios meaningful while other jobs load the machine.
    """
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        for name, task in tasks.items():
            best[name] = min(best.get(name, float("inf")), task())


def _problem(case: Case, seed: int):
    """Weights ~ N(0, 1/N), 4-bit "int" alphabet with per-channel max step, a batch generator.

    Data come from NumPy (seeded per batch) so that no worker pays for compiling a JAX PRNG.
    """
    import jax
    import jax.numpy as jnp

    from gpfq_jax.core.alphabets import QuantSpec, step_size

    spec = QuantSpec(bits=4)
    rng = np.random.default_rng([seed, 0])
    w_np = rng.standard_normal((case.n_in, case.n_out), dtype=np.float32) / np.sqrt(case.n_in)
    w = jnp.asarray(w_np, jnp.float32)
    delta = jax.block_until_ready(step_size(w, spec))

    def batch(i: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows i*batch..(i+1)*batch: x = relu(z) (non-negative, like activations), x_quant."""
        r = np.random.default_rng([seed, 1, i])
        z = r.standard_normal((case.batch, case.n_in), dtype=np.float32)
        e = r.standard_normal((case.batch, case.n_in), dtype=np.float32)
        return np.maximum(z, 0.0), np.maximum(z + np.float32(NOISE) * e, 0.0)

    return spec, w, delta, batch


class GramPath:
    """The Gram path of one case: statistics streamed over batches, then ``gpfq_gram_form``.

    Batch generation and host-to-device copies are not timed; a pass's time is the sum of its
    ``accumulate`` calls.
    """

    def __init__(self, case: Case, w, delta, alphabet, batch: Callable[[int], tuple]):
        import jax
        import jax.numpy as jnp

        self.case, self.w, self.delta, self.alphabet, self.batch = case, w, delta, alphabet, batch
        self.stats = self.codes = None
        hi = jax.lax.Precision.HIGHEST
        self._products = jax.jit(
            lambda x, xq: tuple(
                jnp.einsum("mi,mj->ij", u, v, precision=hi) for u, v in ((xq, xq), (xq, x), (x, x))
            )
        )

    def _rows(self, i: int):
        import jax
        import jax.numpy as jnp

        from gpfq_jax.core.patches import dense_rows

        xb, xqb = self.batch(i)
        return jax.block_until_ready((dense_rows(jnp.asarray(xb)), dense_rows(jnp.asarray(xqb))))

    def stats_pass(self, batches: int | None = None) -> float:
        """Accumulate H, G, F over the first ``batches`` batches (default all); seconds."""
        from gpfq_jax.core.stats import accumulate, init_stats

        stats, total = init_stats(self.case.n_in), 0.0
        for i in range(self.case.batches if batches is None else batches):
            rows, rows_q = self._rows(i)
            t, stats = timed(lambda r=rows, rq=rows_q, st=stats: accumulate(st, r, rq))
            total += t
        self.stats = stats
        return total

    def products_pass(self, batches: int | None = None) -> float:
        """The 3 unavoidable statistics products (X~^T X~, X~^T X, X^T X), batch by batch."""
        total = 0.0
        for i in range(self.case.batches if batches is None else batches):
            rows, rows_q = self._rows(i)
            total += timed(
                lambda rows=rows, rows_q=rows_q: self._products(rows[:, 0], rows_q[:, 0])
            )[0]
        return total

    def quantize(self, block_size: int | None = None) -> float:
        """``gpfq_gram_form`` on the current statistics; seconds (codes kept in ``codes``)."""
        from gpfq_jax.core.gpfq import gpfq_gram_form

        h, g = self.stats.hess[0], self.stats.cross[0]
        t, self.codes = timed(
            lambda: gpfq_gram_form(self.w, h, g, self.delta, self.alphabet, block_size=block_size)
        )
        return t

    def run(self) -> float:
        """The whole Gram path: statistics pass + quantization; seconds."""
        return self.stats_pass() + self.quantize()


def worker_data(case: Case, args: argparse.Namespace, codes_path: Path) -> dict:
    """Data form: decide whether it fits; time it, then side by side with the Gram path."""
    import jax.numpy as jnp

    from gpfq_jax.core.gpfq import gpfq_data_form

    max_s = args.data_form_max_s
    res: dict[str, Any] = {"load_start": loadavg()}
    spec, w, delta, batch = _problem(case, args.seed)
    # Probe: the same m and N_out on the first few features; time is linear in N.
    p = min(case.n_in, PROBE_FEATURES)
    xp = jnp.asarray(
        np.abs(np.random.default_rng([args.seed, 3]).standard_normal((case.m, p), dtype=np.float32))
    )
    wp = w[:p]
    probe = lambda: gpfq_data_form(wp, xp, xp, delta, spec.alphabet)
    timed(probe)
    est = timed(probe)[0] * case.n_in / p
    res["data_time_est_s"] = est
    if est > max_s:
        res["data_skipped"] = f"est. {est:.0f} s (probe on {p} features) > {max_s:g} s"
        return res
    parts = [batch(i) for i in range(case.batches)]
    x = jnp.asarray(np.concatenate([a for a, _ in parts]))
    xq = jnp.asarray(np.concatenate([b for _, b in parts]))
    del parts
    data = lambda: gpfq_data_form(w, x, xq, delta, spec.alphabet)
    res["data_first_s"], _ = timed(data)
    t, codes = timed(data)
    res["rss_data_mb"] = rss_mib()  # peak of the data form (plus the whole X, X~ it needs)
    np.save(codes_path, np.asarray(codes).astype(np.int8))
    # Side by side: alternate the whole Gram path and the data form in this process.
    path = GramPath(case, w, delta, spec.alphabet, batch)
    path.stats_pass(1)
    path.quantize()  # compile both
    best = {"data": t}
    interleave(
        {"gram_path": path.run, "data": lambda: timed(data)[0]},
        best,
        3,
        time.perf_counter() + args.budget_s,
    )
    res.update(data_s=best["data"], side_gram_path_s=best["gram_path"], load_end=loadavg())
    return res


def worker_gram(case: Case, args: argparse.Namespace, codes_path: Path) -> dict:
    """Gram path alone (peak RSS), then side by side with the reference products."""
    import jax
    import jax.numpy as jnp

    from gpfq_jax.core.gpfq import default_block_size
    from gpfq_jax.core.layer import quantize_from_stats

    res: dict[str, Any] = {"load_start": loadavg()}
    spec, w, delta, batch = _problem(case, args.seed)
    res["rss_base_mb"] = rss_mib()
    path = GramPath(case, w, delta, spec.alphabet, batch)
    res["stats_first_s"] = path.stats_pass(1)  # compile + one batch
    res["gram_first_s"] = path.quantize()  # trace + compile + run (same shapes)
    start = time.perf_counter()
    best = {"stats": path.stats_pass(), "gram": path.quantize()}
    res["rss_gram_mb"] = rss_mib()  # peak of the whole Gram path: nothing else has run yet
    np.save(codes_path, np.asarray(path.codes).astype(np.int8))
    res["block_size"] = default_block_size(case.n_in)

    # Statistics products: right after the first statistics pass, then alternating.
    path.products_pass(1)  # compile
    best["stats_products"] = path.products_pass()
    interleave(
        {"stats": path.stats_pass, "stats_products": path.products_pass},
        best,
        2,
        start + args.budget_s,
    )
    # One N x N x N_out product, alternating with the Gram quantization step.
    a = jnp.asarray(
        np.random.default_rng([args.seed, 2]).standard_normal(
            (case.n_in, case.n_in), dtype=np.float32
        )
    )
    mm = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    matmul = lambda: timed(lambda: mm(a, w))[0]
    matmul()
    interleave(
        {"gram": path.quantize, "matmul": matmul}, best, 3, time.perf_counter() + args.budget_s
    )
    res.update(
        stats_s=best["stats"],
        gram_s=best["gram"],
        matmul_s=best["matmul"],
        stats_products_s=best["stats_products"],
    )
    res["gram_compile_s"] = max(res["gram_first_s"] - res["gram_s"], 0.0)

    # The public API on the same statistics (adds the output-error evaluation and checks);
    # skipped by --quick, where it would be mostly compile time.
    if not args.quick:
        api = lambda: quantize_from_stats(w, path.stats, spec).codes
        timed(api)
        res["api_s"] = timed(api)[0]

    if args.block_sizes:
        codes, sweep_best = np.asarray(path.codes), {}
        tasks = {"matmul": matmul}
        first, agree = {}, {}
        for bs in args.block_sizes:
            first[bs] = path.quantize(bs)
            agree[bs] = float(np.mean(np.asarray(path.codes) == codes))
            tasks[str(bs)] = lambda bs=bs: path.quantize(bs)
        interleave(tasks, sweep_best, 2, time.perf_counter() + 2 * args.budget_s)
        res["block_sweep"] = [
            {
                "block_size": bs,
                "first_s": first[bs],
                "steady_s": sweep_best[str(bs)],
                "matmul_s": sweep_best["matmul"],
                "vs_matmul": sweep_best[str(bs)] / sweep_best["matmul"],
                "codes_agree_vs_default": agree[bs],
            }
            for bs in args.block_sizes
        ]
    res["load_end"] = loadavg()
    return res


# ----------------------------------------------------------------------------- driver


def run_worker(part: str, case: Case, args: argparse.Namespace, tmp: Path) -> dict:
    """Run one part of one case in a fresh Python process and return its result dict."""
    out = tmp / f"{case.name}_{part}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        part,
        "--cases",
        case.name,
        "--worker-dir",
        str(tmp),
        "--seed",
        str(args.seed),
        "--data-form-max-s",
        str(args.data_form_max_s),
        "--budget-s",
        str(args.budget_s),
        "--block-sizes",
        ",".join(map(str, args.block_sizes)),
    ]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        return {f"{part}_error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    res = json.loads(out.read_text())
    res[f"{part}_worker_wall_s"] = wall
    return res


def measure_case(case: Case, args: argparse.Namespace, tmp: Path) -> dict:
    """Both parts of a case, merged, with the derived ratios."""
    rec: dict[str, Any] = {
        "n_in": case.n_in,
        "n_out": case.n_out,
        "m": case.m,
        "batch": case.batch,
        "batches": case.batches,
        "kind": case.kind,
    }
    rec["data_mem_est_gb"] = mem_gb = case.m * case.n_out * 4 / 1e9  # the residual u
    parts = ("data", "gram")
    if mem_gb > args.data_form_max_gb:
        rec["data_skipped"] = f"residual u needs {_gb(mem_gb)} > {_gb(args.data_form_max_gb)}"
        parts = ("gram",)
    for part in parts:
        r = run_worker(part, case, args, tmp)
        for k in ("load_start", "load_end"):
            if k in r:
                r[f"{part}_{k}"] = r.pop(k)
        rec.update(r)
        print(
            f"  [{case.name}] {part} part done ({r.get(f'{part}_worker_wall_s', 0):.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    if "stats_s" in rec and "gram_s" in rec:
        rec["gram_path_s"] = rec["stats_s"] + rec["gram_s"]
        rec["path_vs_products"] = rec["gram_path_s"] / (rec["stats_products_s"] + rec["matmul_s"])
        rec["quant_vs_matmul"] = rec["gram_s"] / rec["matmul_s"]
        rec["stats_vs_products"] = rec["stats_s"] / rec["stats_products_s"]
    if "data_s" in rec and "gram_path_s" in rec:
        # Both measured in the data worker, alternating run by run.
        rec["speedup"] = rec["data_s"] / rec["side_gram_path_s"]
        rec["speedup_vs_gram_worker"] = rec["data_s"] / rec["gram_path_s"]
        a, b = np.load(tmp / f"{case.name}_data.npy"), np.load(tmp / f"{case.name}_gram.npy")
        rec["codes_agreement"] = float(np.mean(a == b))
        rec["codes_max_abs_diff"] = int(np.max(np.abs(a.astype(int) - b.astype(int))))
    return rec


def evaluate_targets(cases: dict[str, dict]) -> dict[str, dict]:
    """The three target ratios with PASS/FAIL (pass is None when not measured)."""
    out = {}
    for key, case, field, op, thr, what in TARGETS:
        val = cases.get(case, {}).get(field)
        ok = None if val is None else (val >= thr if op == ">=" else val <= thr)
        out[key] = {
            "case": case,
            "metric": field,
            "value": val,
            "op": op,
            "threshold": thr,
            "pass": ok,
            "description": what,
        }
    return out


def markdown_table(cases: dict[str, dict]) -> str:
    """The results as a markdown table (times in seconds, memory in MiB)."""
    head = [
        "case",
        "layer",
        "m (batches)",
        "data form s",
        "stats s",
        "Gram quant s first/steady",
        "Gram path s",
        "data/Gram (alternating)",
        "codes agree",
        "3 stats products s",
        "NxNxN_out mm s",
        "path/(prods+mm)",
        "quant/mm",
        "API s",
        "peak RSS MiB data/Gram (base)",
        "load",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in cases.items():
        if "data_s" in r:
            data = _f(r["data_s"])
        else:
            data = "skip: " + r.get("data_skipped", r.get("data_error", "?"))
        row = [
            name,
            f"{r['kind']} {r['n_in']}->{r['n_out']}",
            f"{r['m']:,} ({r['batches']})",
            data,
            _f(r.get("stats_s")),
            f"{_f(r.get('gram_first_s'))} / {_f(r.get('gram_s'))}",
            _f(r.get("gram_path_s")),
            _f(r.get("speedup"), "{:.1f}x"),
            _f(r.get("codes_agreement"), "{:.4f}"),
            _f(r.get("stats_products_s")),
            _f(r.get("matmul_s")),
            _f(r.get("path_vs_products"), "{:.2f}x"),
            _f(r.get("quant_vs_matmul"), "{:.2f}x"),
            _f(r.get("api_s")),
            f"{_f(r.get('rss_data_mb'), '{:.0f}')} / {_f(r.get('rss_gram_mb'), '{:.0f}')} "
            f"({_f(r.get('rss_base_mb'), '{:.0f}')})",
            _f((r.get("gram_load_end") or [None])[0], "{:.1f}"),
        ]
        if "gram_error" in r:
            row[4] = "error: " + r["gram_error"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep_tables(cases: dict[str, dict]) -> str:
    out = []
    for name, r in cases.items():
        if r.get("block_sweep"):
            out.append(
                f"\nBlock-size sweep, {name} (default block {r['block_size']}, "
                f"matmul {r['block_sweep'][0]['matmul_s']:.3f} s, alternating):\n"
            )
            out.append("| block size | first s | steady s | steady/mm | codes agree vs default |")
            out.append("|---|---|---|---|---|")
            for s in r["block_sweep"]:
                out.append(
                    f"| {s['block_size']} | {s['first_s']:.3f} | {s['steady_s']:.3f} | "
                    f"{s['vs_matmul']:.2f}x | {s['codes_agree_vs_default']:.4f} |"
                )
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (< 30 s)")
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated case names (default: all): " + ",".join(FULL_CASES),
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data-form-max-gb",
        type=float,
        default=None,
        help="skip the data form when m * N_out * 4 bytes exceeds this",
    )
    ap.add_argument(
        "--data-form-max-s",
        type=float,
        default=None,
        help="skip the data form when its estimated time exceeds this",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop repeating a measurement after this many seconds",
    )
    ap.add_argument(
        "--block-sizes",
        default="",
        help="comma-separated Gram-form block sizes to sweep (e.g. 64,128,256,512)",
    )
    ap.add_argument("--worker-timeout-s", type=float, default=3600.0)
    ap.add_argument("--worker", choices=("data", "gram"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    limits = QUICK_LIMITS if args.quick else FULL_LIMITS
    for attr, default in zip(("data_form_max_gb", "data_form_max_s", "budget_s"), limits):
        if getattr(args, attr) is None:
            setattr(args, attr, default)
    args.block_sizes = [int(b) for b in str(args.block_sizes).split(",") if b.strip()]
    table = QUICK_CASES if args.quick else FULL_CASES
    names = list(table) if not args.cases else [c.strip() for c in args.cases.split(",")]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(table)}")
    args.case_list = [table[n] for n in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        case = args.case_list[0]
        fn = worker_data if args.worker == "data" else worker_gram
        res = fn(case, args, args.worker_dir / f"{case.name}_{args.worker}.npy")
        (args.worker_dir / f"{case.name}_{args.worker}.json").write_text(json.dumps(res))
        return 0

    import jax

    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "quick": args.quick,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_start": loadavg(),
        "train_py_processes": count_processes("train.py"),
        "spec": {"bits": 4, "grid": "int", "scale": "max", "per_channel": True},
        "weights": "N(0, 1/N)",
        "inputs": f"x = relu(z), x_quant = relu(z + {NOISE} e), z, e ~ N(0, 1)",
        "limits": {
            "data_form_max_gb": args.data_form_max_gb,
            "data_form_max_s": args.data_form_max_s,
            "budget_s": args.budget_s,
        },
        "timing": "best of up to 3 runs after one warm-up (stats: best of full passes)",
    }
    print(
        f"load average {meta['load_start']} on {meta['cpu_count']} CPUs; "
        f"{meta['train_py_processes']} train.py process(es) running",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="layer_speed_") as tmp:
        for case in args.case_list:
            cases[case.name] = measure_case(case, args, Path(tmp))
    meta["load_end"] = loadavg()
    meta["total_s"] = time.perf_counter() - t0
    targets = evaluate_targets(cases)

    print(
        f"\n## GPFQ layer speed ({'QUICK, shrunken sizes' if args.quick else 'full'}; "
        f"{meta['backend']}, {meta['cpu_count']} CPUs, load {meta['load_start']} -> "
        f"{meta['load_end']})\n"
    )
    print(markdown_table(cases))
    sweeps = sweep_tables(cases)
    if sweeps:
        print(sweeps)
    print()
    for key, t in targets.items():
        verdict = "SKIP" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        val = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(
            f"{verdict} target {key}: {t['description']} on {t['case']} = {val} "
            f"(need {t['op']} {t['threshold']:g})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "cases": cases, "targets": targets}, indent=1))
    print(f"\nwrote {args.out} ({meta['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
