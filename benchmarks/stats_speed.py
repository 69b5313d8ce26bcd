"""Statistics accumulation: with F = X^T X vs with per-neuron output norms (kernel known).

Run from the repository root::

    python benchmarks/stats_speed.py            # CIFAR-10 CNN / ResNet-20 / MLP layer shapes
    python benchmarks/stats_speed.py --quick    # small batches (seconds)

``quantize_params`` knows each layer's float kernel W while it accumulates, so it passes it to
``StatsAccumulator(..., kernel=W)``: H = X~^T X~ and G = X~^T X are accumulated as before, and
F is replaced by ||X w_j||^2 and ||(X - X~) w_j||^2 (rows x N x n instead of rows x N^2). This
times one calibration batch of float and quantized layer inputs through both accumulators,
side by side (interleaved, best of ``--repeats`` after a warm-up), for layer shapes of the
CIFAR-10 CNN, ResNet-20 and the MNIST MLP, and (conv layers) the kernel-norm accumulator keeping
25% of the patches (``patch_fraction=0.25``: only the kept patch rows are built). Prints a
markdown table, writes JSON (default benchmarks/results/stats_speed.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _report import write_report

from gpfq_jax.core import ConvGeometry, StatsAccumulator

DEFAULT_OUT = Path("benchmarks/results/stats_speed.json")

# name, input shape per image (H, W, C) or (N,), kernel shape (Flax layout)
CASES = [
    ("CNN conv 32->32 @32x32", (32, 32, 32), (3, 3, 32, 32)),
    ("CNN conv 64->64 @16x16", (16, 16, 64), (3, 3, 64, 64)),
    ("CNN conv 128->128 @8x8", (8, 8, 128), (3, 3, 128, 128)),
    ("ResNet-20 conv 16->16 @32x32", (32, 32, 16), (3, 3, 16, 16)),
    ("ResNet-20 conv 64->64 @8x8", (8, 8, 64), (3, 3, 64, 64)),
    ("MLP dense 784->500", (784,), (784, 500)),
]


def one_batch(acc_factory, x, xq) -> float:
    acc = acc_factory()
    t0 = time.perf_counter()
    jax.block_until_ready(acc.update(x, xq).result())
    return time.perf_counter() - t0


def measure(name, in_shape, kernel_shape, batch: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(np.maximum(rng.normal(size=(batch, *in_shape)), 0), jnp.float32)
    xq = x + 0.05 * jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    kernel = jnp.asarray(
        rng.normal(size=kernel_shape) / np.sqrt(np.prod(kernel_shape[:-1])), jnp.float32
    )
    n = int(np.prod(kernel_shape[:-1]))
    geom = (
        ConvGeometry.create(kernel_shape, 1, "SAME", input_shape=x.shape)
        if len(kernel_shape) == 4
        else None
    )
    variants = {
        "with_f": lambda: StatsAccumulator(n, geom),
        "kernel_norms": lambda: StatsAccumulator(n, geom, kernel=kernel),
    }
    if geom is not None:
        variants["kernel_norms_quarter"] = lambda: StatsAccumulator(
            n, geom, kernel=kernel, patch_fraction=0.25, seed=seed
        )
    best = {}
    for f in variants.values():  # warm-up (compilation)
        one_batch(f, x, xq)
    for _ in range(repeats):
        for k, f in variants.items():
            t = one_batch(f, x, xq)
            best[k] = min(best.get(k, np.inf), t)
    rows = batch * (int(np.prod(in_shape[:2])) if geom is not None else 1)
    return {
        "layer": name,
        "rows": rows,
        "n_in": n,
        "n_out": kernel_shape[-1],
        "with_f_s": best["with_f"],
        "kernel_norms_s": best["kernel_norms"],
        "speedup": best["with_f"] / best["kernel_norms"],
        "quarter_patches_s": best.get("kernel_norms_quarter"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches (seconds)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 500)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    batch = args.batch or (20 if args.quick else 500)
    print(f"one calibration batch of {batch} images (MLP: {batch * 10} samples), float32")
    print("| layer | rows | with F | kernel norms | speedup | kernel norms, 25% of patches |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    for name, in_shape, kernel_shape in CASES:
        b = batch * 10 if len(kernel_shape) == 2 else batch
        r = measure(name, in_shape, kernel_shape, b, args.repeats, args.seed)
        results.append(r)
        quarter = r["quarter_patches_s"]
        print(
            f"| {name} | {r['rows']:,} | {r['with_f_s']:.3f} s | {r['kernel_norms_s']:.3f} s "
            f"| {r['speedup']:.2f}x | {'-' if quarter is None else f'{quarter:.3f} s'} |",
            flush=True,
        )
    write_report(args.out, "stats_speed", results, batch=batch, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
