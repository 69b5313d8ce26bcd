"""Driver cost against depth: ``quantize_params`` on Llama decoders of 2..32 blocks.

Run from the repository root::

    python benchmarks/depth_speed.py                          # depths 2,4,8,16,32, both drivers
    python benchmarks/depth_speed.py --blocks 2,4,8 --drivers reference
    python benchmarks/depth_speed.py --method gpfq --group-size 32
    python benchmarks/depth_speed.py --preset smollm2         # SmolLM2-135M shape, 30 blocks

Model: ``experiments/llama.py``'s ``Llama`` with small widths (``--d-model 64 --heads 4
--kv-heads 2 --head-dim 16 --mlp 128 --vocab 256``, untied head unless ``--tied``), random
weights (``--seed``), calibration ``--sequences`` x ``--seq-len`` random tokens (seeded).
Each block holds 7 quantized layers (q, k, v, o, gate, up, down); the untied head is one more.

Drivers: ``frontier`` is ``quantize_params(..., blocks="auto")``, ``reference`` is
``blocks=None`` (layer by layer, each layer's inputs captured by running the model up to it).
``frontier_unshared`` / ``reference_unshared`` add ``shared_stats=False`` (q, k, v and gate,
up accumulate separately): the time shared statistics save, and the driver as it was before.

Each (depth, driver) runs in a fresh subprocess (the script re-invokes itself with ``--one
DEPTH DRIVER`` and reads one JSON line back), so that its peak RSS (``ru_maxrss``, monotone
within a process) is its own, and so that a ``--timeout-minutes`` limit can stop it (the row
then says "did not finish in N min"). Per row:

- ``forward_s``: one float forward pass over the whole calibration set (jitted, best of 3 after
  a warm-up: compute only);
- ``seconds``: ``quantize_params`` wall time (compilation included), ``s_per_block``, and
  ``ratio`` = seconds / forward_s;
- ``compiles``: ``result.driver.traced_functions`` where the result has a ``driver``, else the
  programs JAX lowered during ``quantize_params`` (counted with ``jax.monitoring``);
  ``xla_compiles`` and ``compile_s`` (backend compile count and seconds) are always reported;
- ``rss_peak_mib`` (the subprocess's peak RSS) and ``rss_increase_mib`` (peak minus the RSS
  before ``quantize_params``, after the model, data and float forward are set up);
- ``logit_rel_change``: ||logits(quantized) - logits(float)|| / ||logits(float)|| on the
  calibration tokens (the two drivers should agree);
- ``load_start`` / ``load_end``: the machine's load averages around the row (the machine may be
  shared: absolute times are noisy, compile counts are not).

Prints a table; writes JSON (default ``benchmarks/results/depth_speed.json``, with
``--preset smollm2`` ``depth_speed_smollm2.json``) with the rows, the flags and the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt, git_state, loadavg, rss_mib, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ (and gpfq_jax/) from the repository root

RESULTS = ROOT / "benchmarks" / "results"
# The quantize_params arguments of each driver. The "_unshared" variants accumulate q, k, v
# (and gate, up) separately: "reference_unshared" is the driver as it was before blocks and
# shared statistics.
DRIVERS = {
    "frontier": {"blocks": "auto"},
    "reference": {"blocks": None},
    "frontier_unshared": {"blocks": "auto", "shared_stats": False},
    "reference_unshared": {"blocks": None, "shared_stats": False},
}
MARK = "DEPTH_SPEED_RESULT "
LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"


# --------------------------------------------------------------------------- compile counting


class CompileCounter:
    """Counts JAX compilations through ``jax.monitoring`` duration events.

    ``lowered``: programs lowered to XLA (each new jit trace + compile, whether XLA then
    compiles it or a persistent cache supplies it), ``by_name`` the same by function name
    (``jit(reshape)`` and the like are eager operations, compiled once per shape and dtype);
    ``backend``: XLA compilations and ``backend_s`` their seconds. A listener cannot be
    unregistered, so one counter per process: ``reset()`` starts a new count.
    """

    def __init__(self) -> None:
        import jax

        self.reset()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def reset(self) -> None:
        self.lowered, self.backend, self.backend_s = 0, 0, 0.0
        self.by_name: Counter[str] = Counter()

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == LOWERED:
            self.lowered += 1
            self.by_name[str(kwargs.get("fun_name", "?"))] += 1
        elif event == BACKEND:
            self.backend += 1
            self.backend_s += duration


def _traced_count(result: Any) -> int | None:
    driver = getattr(result, "driver", None)
    traced = getattr(driver, "traced_functions", None)
    if traced is None:
        return None
    return traced if isinstance(traced, int) else len(traced)


# --------------------------------------------------------------------------- one measurement


def model_config(args: argparse.Namespace, depth: int):
    from experiments.llama import LlamaConfig

    if args.preset == "smollm2":
        return LlamaConfig.smollm2_135m(n_layers=depth)
    return LlamaConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=depth,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        mlp_dim=args.mlp,
        tie_embeddings=args.tied,
    )


def _best_time(fn, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn())  # warm-up: compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def _setup(args: argparse.Namespace, depth: int):
    """The model, its variables (seeded), the calibration tokens and the jitted forward pass."""
    import jax
    import jax.numpy as jnp

    from experiments.llama import Llama

    cfg = model_config(args, depth)
    model = Llama(cfg)
    rng = np.random.default_rng(args.seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.sequences, args.seq_len)), "int32")
    variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed), tokens[:1])
    return model, variables, tokens, jax.jit(model.apply)


def _quantize(args: argparse.Namespace, driver: str, model, variables, tokens, counter) -> dict:
    """``quantize_params`` timed, its compilations counted and its peak RSS read."""
    import jax

    import gpfq_jax as gq

    spec = gq.QuantSpec(bits=args.bits, group_size=args.group_size)
    extra = DRIVERS[driver]
    base = rss_mib()
    counter.reset()
    t0 = time.perf_counter()
    res = gq.quantize_params(
        model,
        variables,
        tokens,
        spec,
        method=args.method,
        batch_size=args.batch_size,
        progress=False,
        **extra,
    )
    jax.block_until_ready(res.variables)
    seconds = time.perf_counter() - t0
    peak = rss_mib()
    traced = _traced_count(res)
    return {
        "result": res,
        "blocks_argument": extra.get("blocks", "(absent)"),
        "layers": len(res.layers),
        "seconds": seconds,
        "compiles": traced if traced is not None else counter.lowered,
        "compile_source": "driver.traced_functions" if traced is not None else "jax.monitoring",
        "lowered": counter.lowered,
        "xla_compiles": counter.backend,
        "compile_s": counter.backend_s,
        "lowered_by_name": dict(counter.by_name.most_common(12)),
        "rss_base_mib": base,
        "rss_peak_mib": peak,
        "rss_increase_mib": peak - base,
    }


def measure(args: argparse.Namespace, depth: int, driver: str) -> dict:
    """Build the model, time its float forward pass, then time ``quantize_params``."""
    import jax.numpy as jnp

    counter = CompileCounter()
    load_start = loadavg()
    model, variables, tokens, forward = _setup(args, depth)
    forward_s = _best_time(lambda: forward(variables, tokens))
    q = _quantize(args, driver, model, variables, tokens, counter)
    res = q.pop("result")
    ref = forward(variables, tokens)
    change = jnp.linalg.norm(forward(res.variables, tokens) - ref) / jnp.linalg.norm(ref)
    return {
        "blocks": depth,
        "driver": driver,
        "status": "ok",
        **q,
        "s_per_block": q["seconds"] / depth,
        "forward_s": forward_s,
        "ratio": q["seconds"] / forward_s,
        "logit_rel_change": float(change),
        "load_start": load_start,
        "load_end": loadavg(),
    }


# --------------------------------------------------------------------------- the parent


def _timed_out_row(depth: int, driver: str, minutes: float) -> dict:
    return {"blocks": depth, "driver": driver, "status": f"did not finish in {minutes:g} min"}


def spawn(argv: list[str], depth: int, driver: str, minutes: float) -> dict:
    """Run ``--one depth driver`` in a fresh process; its row (or a timeout / failure row)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", str(depth), driver]
    t0 = time.perf_counter()
    try:
        # the child's stderr (warnings, errors) streams through to ours
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, timeout=minutes * 60, cwd=Path.cwd()
        )
    except subprocess.TimeoutExpired:
        return _timed_out_row(depth, driver, minutes)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {
            "blocks": depth,
            "driver": driver,
            "status": f"failed (rc {proc.returncode})",
            "stdout_tail": proc.stdout[-2000:],
        }
    row = json.loads(lines[-1][len(MARK) :])
    row["process_s"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| blocks | driver | layers | quantize s | s/block | forward s | ratio | compiles | "
        "XLA compiles (s) | peak RSS MiB | RSS increase MiB | logit change | status |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        g = r.get
        xla = g("xla_compiles")
        compile_cell = "-" if xla is None else f"{xla} ({r['compile_s']:.1f})"
        lines.append(
            f"| {r['blocks']} | {r['driver']} | {fmt(g('layers'), '{}')} | "
            f"{fmt(g('seconds'), '{:.2f}')} | {fmt(g('s_per_block'), '{:.2f}')} | "
            f"{fmt(g('forward_s'), '{:.4f}')} | {fmt(g('ratio'), '{:.0f}')} | "
            f"{fmt(g('compiles'), '{}')} | {compile_cell} | "
            f"{fmt(g('rss_peak_mib'), '{:.0f}')} | {fmt(g('rss_increase_mib'), '{:.0f}')} | "
            f"{fmt(g('logit_rel_change'), '{:.4f}')} | {r['status']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- flags, main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default=None, help="comma-separated depths (default 2,4,8,16,32)")
    ap.add_argument("--drivers", default="frontier,reference", help="frontier,reference")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gpfq", "gptq"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default 64 (smollm2: 128)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch (all)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", choices=("smollm2",), default=None, help="SmolLM2-135M shape")
    ap.add_argument("--timeout-minutes", type=float, default=20.0, help="per subprocess")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--one", nargs=2, metavar=("DEPTH", "DRIVER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.preset == "smollm2":
        if args.blocks is not None:
            ap.error("--preset smollm2 has its 30 blocks; drop --blocks")
        args.blocks, args.seq_len = "30", args.seq_len or 128
    args.blocks = [int(v) for v in (args.blocks or "2,4,8,16,32").split(",") if v.strip()]
    args.seq_len = args.seq_len or 64
    args.batch_size = args.batch_size or args.sequences
    args.drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    unknown = set(args.drivers) - set(DRIVERS)
    if unknown:
        ap.error(f"unknown drivers {sorted(unknown)}; choose from {sorted(DRIVERS)}")
    if args.out is None:
        suffix = f"_{args.preset}" if args.preset else ""
        args.out = RESULTS / f"depth_speed{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        row = measure(args, int(args.one[0]), args.one[1])
        print(MARK + json.dumps(row), flush=True)
        return 0
    rows = []
    for depth in args.blocks:
        for driver in args.drivers:
            print(f"[depth_speed] {depth} blocks, {driver} ...", flush=True)
            rows.append(spawn(argv, depth, driver, args.timeout_minutes))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print("\n" + table(rows))
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "one"}
    write_report(args.out, "depth_speed", rows, flags=flags, git=git_state())
    return 0


if __name__ == "__main__":
    sys.exit(main())
