"""Serving benchmark: the float model, our dequantized model and Qwix int8 / int4 PTQ serving.

Run from the repository root::

    python benchmarks/serve.py                      # MNIST MLP from checkpoints/, seconds
    python benchmarks/serve.py --batches 1,64,1024 --repeats 50 --method gpfq

Model: the committed MNIST MLP (``checkpoints/mnist_mlp``: 784-500-300-10, Dense + BatchNorm
+ ReLU), quantized with ``--method`` (default RTN: the serving cost does not depend on how the
codes were chosen) per channel on the "int" grid from ``--calib`` random images (uniform in
[0, 1); no data directory needed). Rows:

- ``float``: ``model.apply`` on the float variables;
- ``dequantized int4``: ``model.apply(res.variables)``, float32 kernels holding the 4-bit values;
- ``qwix int8`` / ``qwix int4``: ``gq.to_qwix(res, model)``, Qwix 0.1.8 PTQ, kernels int8 /
  int4 QArrays holding our codes and steps (8-bit / 4-bit results).

Per row: parameter bytes as held in memory (every leaf's ``nbytes``; JAX on CPU holds int4 at
one byte per element) and with the codes counted at their bits, the largest logit difference
from the dequantized model of the same bits (Qwix rows), and per batch size the jitted
forward's median latency over ``--repeats`` calls after a warm-up (``block_until_ready``;
the variables are arguments of the jitted function, not constants XLA could fold) and its
throughput (images / s). Absolute times on a shared machine are noisy; the rows are
measured side by side in one process. Prints a markdown table and writes JSON (default
``benchmarks/results/serve.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt, git_state, loadavg, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ (and gpfq_jax/) from the repository root
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve.json"


def leaf_bytes(tree: Any) -> tuple[int, int]:
    """(bytes as held, bytes with integer leaves at their bits) of every array in ``tree``."""
    import jax
    import jax.numpy as jnp

    held = packed = 0
    for a in jax.tree.leaves(tree):
        held += a.nbytes
        is_int = jnp.issubdtype(a.dtype, jnp.integer)
        packed += -(-a.size * jnp.iinfo(a.dtype).bits // 8) if is_int else a.nbytes
    return held, packed


def timed(fn: Any, v: Any, x: Any, repeats: int) -> float:
    """Median seconds of ``fn(v, x)`` over ``repeats`` calls after one warm-up call."""
    import jax

    jax.block_until_ready(fn(v, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(v, x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def setup(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """The float model and variables, and our quantized results at 8 and 4 bits."""
    import jax.numpy as jnp

    import gpfq_jax as gq
    from experiments.checkpoints import load_float_variables
    from experiments.models import MLP

    model = MLP()
    variables = load_float_variables(ROOT / "checkpoints" / "mnist_mlp")
    rng = np.random.default_rng(0)
    calib = jnp.asarray(rng.uniform(size=(args.calib, 28, 28, 1)), jnp.float32)
    results = {
        bits: gq.quantize_params(
            model,
            variables,
            calib,
            spec=gq.QuantSpec(bits=bits),
            method=args.method,
            progress=False,
        )  # fmt: skip
        for bits in (8, 4)
    }
    return model, variables, results


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per served form: bytes, logit difference, latency and throughput per batch."""
    import jax
    import jax.numpy as jnp

    import gpfq_jax as gq

    model, variables, results = setup(args)
    rng = np.random.default_rng(1)
    batches = {b: jnp.asarray(rng.uniform(size=(b, 28, 28, 1)), jnp.float32) for b in args.batches}
    probe = batches[max(batches)]
    forms = [
        ("float", model, variables, None),
        ("dequantized int4", model, results[4].variables, 4),
    ]
    for bits in (8, 4):
        qmodel, qvars = gq.to_qwix(results[bits], model)
        forms.append((f"qwix int{bits}", qmodel, qvars, bits))
    rows = []
    for name, m, v, bits in forms:
        fn = jax.jit(m.apply)  # variables are arguments: XLA must not fold them as constants
        held, packed = leaf_bytes(v)
        row = {"form": name, "bytes_held": held, "bytes_at_bits": packed, "max_logit_diff": None}
        if name.startswith("qwix"):
            ref = model.apply(results[bits].variables, probe)
            row["max_logit_diff"] = float(jnp.abs(fn(v, probe) - ref).max())
        for b, x in batches.items():
            s = timed(fn, v, x, args.repeats)
            row[f"latency_ms_b{b}"] = 1e3 * s
            row[f"images_per_s_b{b}"] = b / s
        rows.append(row)
    return rows


def table(rows: list[dict], batch_sizes: list[int]) -> str:
    base = rows[0]["bytes_held"]
    head = ["form", "bytes held", "x float", "bytes at bits", "max |dlogit|"]
    for b in batch_sizes:
        head += [f"ms b={b}", f"img/s b={b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["form"], str(r["bytes_held"]), fmt(r["bytes_held"] / base),
                 str(r["bytes_at_bits"]), fmt(r["max_logit_diff"], "{:.2e}")]  # fmt: skip
        for b in batch_sizes:
            cells += [fmt(r[f"latency_ms_b{b}"]), fmt(r[f"images_per_s_b{b}"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,256", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    p.add_argument("--calib", type=int, default=512, help="random calibration images")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "gpfq", "qronos"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Qwix on Flax 0.12
    load_start = loadavg()
    rows = measure(args)
    print(table(rows, args.batches))
    write_report(args.out, "serve", rows, batches=args.batches, repeats=args.repeats,
                 calib=args.calib, method=args.method, model="checkpoints/mnist_mlp",
                 load_start=load_start, load_end=loadavg(), git=git_state(),
                 command=" ".join(sys.argv))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
