"""Scale benchmark: devices, memory vs calibration size, large layers, ResNet-18 end to end.

Run from the repository root::

    python benchmarks/scale.py                       # all parts (ResNet-18 alone: ~30 min CPU)
    python benchmarks/scale.py --quick               # smoke run, shrunken sizes (~1 min)
    python benchmarks/scale.py --parts memory,large  # some parts (others kept in the JSON)
    python benchmarks/scale.py --device gpu --parts memory,large,resnet18

Parts (each measured in fresh subprocesses, so that XLA_FLAGS and peak RSS are their own):

- ``devices``: ``quantize_params`` with ``mesh=None`` (one device) and ``mesh="auto"`` (on CPU:
  4 simulated devices, ``--xla_force_host_platform_device_count=4``) on one 1024->1024 Dense
  layer and on a small CNN (conv, BatchNorm, residual, dense): codes compared, times (warm
  calls). Codes are compared in float64 statistics (exact: data-parallel sums differ from
  serial ones only in summation order) and, for the record, in float32 (mismatch count).
  Simulated CPU devices share the same cores: the times show the overhead, not a speed-up.
- ``memory``: peak RSS (``ru_maxrss``) of a fresh process quantizing one 1024->1024 Dense
  layer through ``quantize_params`` with a callable ``calib`` streaming batches of 1,000
  random samples, at m = 5k, 20k, 80k; the target is peak(80k) / peak(5k) <= 1.15. A
  contrast row passes the 80k samples as one in-memory array. On a GPU the device's peak
  bytes in use are reported too.
- ``large``: a 4096->4096 Dense layer (m = 8,192) and a 3x3x512->512 conv (7x7 feature maps,
  ResNet-18 layer4 at 224, 256 images: 12,544 patch rows): capture, statistics and
  quantization time through ``quantize_params``.
- ``resnet18``: ResNet-18 at 224x224, 256 synthetic images (``synthetic_images``), trained-like
  random weights (``init_variables``), 4-bit int, ``scale="max"`` (no step search),
  batches of 32: time split into capture, statistics and quantization, for every
  ``--patch-fractions`` (default 1.0 and 0.25). Target: under 30 minutes on 2 CPU cores.
- ``dtype``: one 1024->1024 Dense layer (m = 20k) with ``stats_dtype`` float32 vs float64
  (x64 enabled): time, fraction of codes that differ, and both layers' output error measured
  with float64 statistics.

Prints tables; writes JSON (default ``benchmarks/results/scale.json``). Parts not run keep
their previous entry in an existing JSON file; each part records its own meta (date, load
average, backend, device count).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _report import loadavg, rss_mib

DEFAULT_OUT = Path("benchmarks/results/scale.json")
PARTS = ("devices", "memory", "large", "resnet18", "dtype")
FULL = {
    "devices": {
        "devices": 4,
        "dense": 1024,
        "m": 4096,
        "batch": 1024,
        "cnn_hw": 16,
        "cnn_width": 32,
        "cnn_deep": True,
        "cnn_m": 256,
        "cnn_batch": 64,
        "repeats": 2,
        "dtypes": ["float64", "float32"],
    },
    "memory": {"features": 1024, "batch": 1000, "ms": [5_000, 20_000, 80_000], "array_m": 80_000},
    "large": {
        "dense": 4096,
        "dense_m": 8192,
        "dense_batch": 1024,
        "conv_cin": 512,
        "conv_cout": 512,
        "conv_hw": 7,
        "conv_images": 256,
        "conv_batch": 32,
    },
    "resnet18": {"hw": 224, "images": 256, "batch": 32, "small": False},
    "dtype": {"features": 1024, "m": 20_000, "batch": 2000},
}
QUICK = {
    "devices": {
        "devices": 4,
        "dense": 32,
        "m": 128,
        "batch": 64,
        "cnn_hw": 6,
        "cnn_width": 8,
        "cnn_deep": False,
        "cnn_m": 16,
        "cnn_batch": 8,
        "repeats": 1,
        "dtypes": ["float64"],
    },
    "memory": {"features": 32, "batch": 100, "ms": [200, 800], "array_m": 800},
    "large": {
        "dense": 64,
        "dense_m": 256,
        "dense_batch": 128,
        "conv_cin": 8,
        "conv_cout": 8,
        "conv_hw": 5,
        "conv_images": 8,
        "conv_batch": 4,
    },
    "resnet18": {"hw": 32, "images": 4, "batch": 2, "small": True},
    "dtype": {"features": 32, "m": 256, "batch": 128},
}
SPEC = {"bits": 4, "grid": "int", "scale": "max"}
MEMORY_TARGET = 1.15
RESNET_TARGET_S = 30 * 60


# --------------------------------------------------------------------------- helpers


def git_state() -> dict:
    """HEAD commit and uncommitted library files (the code that was measured)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--porcelain", "--", "gpfq_jax").splitlines(),
    }


def device_peak_mib() -> float | None:
    """Peak bytes in use on the first device (GPU allocators report it; CPU: None)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def backend_meta() -> dict:
    import jax

    return {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "x64": bool(jax.config.jax_enable_x64),
    }


def relu_batches(m: int, features: int, batch: int, seed: int = 0) -> Callable[[], Iterator]:
    """A calib callable: a fresh iterator of relu(N(0,1)) batches (seeded per batch)."""

    def batches() -> Iterator[np.ndarray]:
        for i, s in enumerate(range(0, m, batch)):
            rng = np.random.default_rng((seed, i))
            yield np.maximum(rng.standard_normal((min(batch, m - s), features), np.float32), 0)

    return batches


def image_batches(
    m: int, hw: int, channels: int, batch: int, seed: int = 0
) -> Callable[[], Iterator]:
    """A calib callable of N(0,1) NHWC feature maps, seeded per batch."""

    def batches() -> Iterator[np.ndarray]:
        for i, s in enumerate(range(0, m, batch)):
            rng = np.random.default_rng((seed, i))
            yield rng.standard_normal((min(batch, m - s), hw, hw, channels), np.float32)

    return batches


def _one_layer(kind: str, features: int, kernel: int = 3):
    import flax.linen as nn

    class OneLayer(nn.Module):
        @nn.compact
        def __call__(self, x):
            if kind == "dense":
                return nn.Dense(features)(x)
            return nn.Conv(features, (kernel, kernel), padding=1, use_bias=False)(x)

    return OneLayer()


def _small_cnn(width: int, deep: bool = True):
    """conv -> [conv-BN-relu-conv-BN + skip] -> (strided conv) -> mean -> dense."""
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            bn = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            h = nn.Conv(width, (3, 3), use_bias=False)(x)
            if deep:
                h = nn.Conv(width, (3, 3), use_bias=False)(nn.relu(bn()(h)))
            x = nn.relu(x + bn()(h))
            if deep:
                x = nn.relu(nn.Conv(2 * width, (3, 3), strides=2)(x))
            return nn.Dense(10)(x.mean(axis=(1, 2)))

    return CNN()


def _init(model, sample: np.ndarray) -> Any:
    import jax

    return model.init(jax.random.PRNGKey(0), sample[:1])


def _quantize(model, variables, calib, progress: bool = False, **kw) -> tuple[Any, float]:
    import gpfq_jax as gq

    t0 = time.perf_counter()
    res = gq.quantize_params(model, variables, calib, gq.QuantSpec(**SPEC), progress=progress, **kw)
    return res, time.perf_counter() - t0


def _split(res) -> dict:
    """Capture / statistics / quantization seconds summed over the layers."""
    return {
        "capture_s": sum(r.capture_seconds for r in res.layers),
        "stats_s": sum(r.stats_seconds for r in res.layers),
        "quant_s": sum(r.quant_seconds for r in res.layers),
    }


# --------------------------------------------------------------------------- workers


def worker_devices(cfg: dict) -> dict:
    """mesh=None vs mesh="auto": codes and warm times on a Dense layer and a small CNN."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    d = cfg["dense"]
    cases = {
        f"dense{d}": (
            _one_layer("dense", d),
            relu_batches(cfg["m"], d, cfg["batch"]),
            np.zeros((1, d), np.float32),
        ),
        "cnn": (
            _small_cnn(cfg["cnn_width"], cfg["cnn_deep"]),
            image_batches(cfg["cnn_m"], cfg["cnn_hw"], 3, cfg["cnn_batch"]),
            np.zeros((1, cfg["cnn_hw"], cfg["cnn_hw"], 3), np.float32),
        ),
    }
    out = {}
    for name, (model, calib, sample) in cases.items():
        variables = _init(model, sample)
        for dtype in cfg["dtypes"]:
            runs = {}
            for mesh in (None, "auto"):
                for _ in range(cfg["repeats"]):  # the last call is warm when repeats > 1
                    res, sec = _quantize(
                        model, variables, calib, mesh=mesh, stats_dtype=getattr(jnp, dtype)
                    )
                runs[mesh or "none"] = (res, sec)
            (a, ta), (b, tb) = runs["none"], runs["auto"]
            mism = sum(
                int(np.sum(np.asarray(x.codes) != np.asarray(y.codes)))
                for x, y in zip(a.layers, b.layers)
            )
            total = sum(int(np.size(x.codes)) for x in a.layers)
            out[f"{name}_{dtype}"] = {
                "model": name,
                "stats_dtype": dtype,
                "layers": len(a.layers),
                "codes_identical": mism == 0,
                "code_mismatches": mism,
                "codes": total,
                "seconds_1_device": ta,
                "seconds_mesh": tb,
                "mesh_devices": jax.device_count(),
                "split_1_device": _split(a),
                "split_mesh": _split(b),
                "max_rel_error_diff": max(
                    abs(x.rel_error - y.rel_error) for x, y in zip(a.layers, b.layers)
                ),
            }
    return {"cases": out}


def worker_memory(cfg: dict) -> dict:
    """Peak RSS of quantizing one Dense layer on m samples (streamed or one array)."""
    f, m = cfg["features"], cfg["m"]
    model = _one_layer("dense", f)
    variables = _init(model, np.zeros((1, f), np.float32))
    calib = relu_batches(m, f, cfg["batch"])
    if cfg["mode"] == "array":
        calib = np.concatenate(list(calib()))
    base = rss_mib()
    res, sec = _quantize(model, variables, calib, batch_size=cfg["batch"])
    return {
        "m": m,
        "mode": cfg["mode"],
        "rss_base_mib": base,
        "rss_peak_mib": rss_mib(),
        "device_peak_mib": device_peak_mib(),
        "seconds": sec,
        **_split(res),
        "rows": res.layers[0].rows,
        "rel_error": res.layers[0].rel_error,
    }


def worker_large(cfg: dict) -> dict:
    """Capture / statistics / quantization time of a big Dense and a big Conv layer."""
    d, cin, hw = cfg["dense"], cfg["conv_cin"], cfg["conv_hw"]
    cases = {
        f"dense{d}->{d}": (
            _one_layer("dense", d),
            relu_batches(cfg["dense_m"], d, cfg["dense_batch"]),
            np.zeros((1, d), np.float32),
        ),
        f"conv3x3x{cin}->{cfg['conv_cout']}": (
            _one_layer("conv", cfg["conv_cout"]),
            image_batches(cfg["conv_images"], hw, cin, cfg["conv_batch"]),
            np.zeros((1, hw, hw, cin), np.float32),
        ),
    }
    out = {}
    for name, (model, calib, sample) in cases.items():
        res, sec = _quantize(model, _init(model, sample), calib)
        r = res.layers[0]
        out[name] = {
            "shape": list(r.shape),
            "rows": r.rows,
            "seconds": sec,
            **_split(res),
            "rel_error": r.rel_error,
        }
    out["rss_peak_mib"] = rss_mib()
    out["device_peak_mib"] = device_peak_mib()
    return out


def worker_resnet18(cfg: dict) -> dict:
    """ResNet-18 end to end (or a 2-stage ResNet in the smoke run)."""
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: repo root
    from experiments import imagenet_models as im

    t0 = time.perf_counter()
    if cfg["small"]:
        model = im.ResNet(stage_sizes=(1,), widths=(8,), num_classes=10)
    else:
        model = im.ResNet18()
    variables = im.init_variables(model, seed=0, size=cfg["hw"], stats_images=8)
    images = im.synthetic_images(cfg["images"], cfg["hw"], seed=1)
    setup = time.perf_counter() - t0
    res, sec = _quantize(
        model,
        variables,
        jnp.asarray(images),
        batch_size=cfg["batch"],
        patch_fraction=cfg["patch_fraction"],
        progress=not cfg["small"],
    )
    layers = [
        {
            "layer": r.name,
            "shape": list(r.shape),
            "rows": r.rows,
            "capture_s": r.capture_seconds,
            "stats_s": r.stats_seconds,
            "quant_s": r.quant_seconds,
            "rel_error": r.rel_error,
        }
        for r in res.layers
    ]
    return {
        "model": "ResNet18" if not cfg["small"] else "ResNet(1 block) smoke",
        "hw": cfg["hw"],
        "images": cfg["images"],
        "batch": cfg["batch"],
        "patch_fraction": cfg["patch_fraction"],
        "spec": SPEC,
        "setup_s": setup,
        "total_s": sec,
        **_split(res),
        "layers": layers,
        "rss_peak_mib": rss_mib(),
        "device_peak_mib": device_peak_mib(),
        "under_30_min": sec < RESNET_TARGET_S,
    }


def worker_dtype(cfg: dict) -> dict:
    """stats_dtype float32 vs float64 on one Dense layer: time, codes, true output error."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from gpfq_jax.core import StatsAccumulator, output_error_sq

    f = cfg["features"]
    model = _one_layer("dense", f)
    variables = _init(model, np.zeros((1, f), np.float32))
    calib = relu_batches(cfg["m"], f, cfg["batch"])
    runs = {}
    for dtype in ("float32", "float64"):
        _quantize(model, variables, calib, stats_dtype=getattr(jnp, dtype))  # compile
        runs[dtype] = _quantize(model, variables, calib, stats_dtype=getattr(jnp, dtype))
    acc = StatsAccumulator(f, dtype=jnp.float64)
    for b in calib():
        acc.update(jnp.asarray(b))
    w = jnp.asarray(variables["params"]["Dense_0"]["kernel"], jnp.float64)[None]
    out = {"features": f, "m": cfg["m"]}
    for dtype, (res, sec) in runs.items():
        q = jnp.asarray(res.variables["params"]["Dense_0"]["kernel"], jnp.float64)[None]
        err, ref = output_error_sq(acc.result(), w, q)
        out[dtype] = {
            "seconds": sec,
            **_split(res),
            "rel_error_reported": res.layers[0].rel_error,
            "rel_error_fp64_stats": float(jnp.sqrt(err.sum() / ref.sum())),
        }
    c32, c64 = (np.asarray(runs[k][0].layers[0].codes) for k in ("float32", "float64"))
    out["codes_differing_fraction"] = float(np.mean(c32 != c64))
    out["rel_error_diff"] = (
        out["float32"]["rel_error_fp64_stats"] - out["float64"]["rel_error_fp64_stats"]
    )
    out["time_ratio_64_over_32"] = out["float64"]["seconds"] / out["float32"]["seconds"]
    return out


WORKERS = {
    "devices": worker_devices,
    "memory": worker_memory,
    "large": worker_large,
    "resnet18": worker_resnet18,
    "dtype": worker_dtype,
}


# --------------------------------------------------------------------------- driver


def _env(device: str, extra_xla: str = "", cache: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cache is not None:  # share compiled functions between the worker processes
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    elif device == "gpu":
        env["JAX_PLATFORMS"] = "cuda"
    if extra_xla:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra_xla).strip()
    return env


def spawn(part: str, cfg: dict, args: argparse.Namespace, extra_xla: str = "") -> dict:
    """Run worker ``part`` with ``cfg`` in a fresh Python process; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            part,
            "--task",
            json.dumps(cfg),
            "--result",
            str(result),
        ]
        t0 = time.perf_counter()
        # the worker's stderr (progress bars, errors) streams through to ours
        proc = subprocess.run(
            cmd,
            env=_env(args.device, extra_xla, args.compile_cache),
            cwd=Path.cwd(),
            stdout=subprocess.PIPE,
            text=True,
            timeout=args.timeout_s,
        )
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"worker {part} failed (rc {proc.returncode}); see its stderr "
                f"above. stdout tail:\n{proc.stdout[-2000:]}"
            )
        out = json.loads(result.read_text())
        out["worker_wall_s"] = time.perf_counter() - t0
        return out


def run_part(part: str, cfg: dict, args: argparse.Namespace) -> dict:
    """One part: its worker subprocess(es), plus the part's meta."""
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_start": loadavg(),
        "quick": args.quick,
        "device_arg": args.device,
        "git": git_state(),
        "config": cfg,
    }
    if part == "devices":
        xla = f"--xla_force_host_platform_device_count={cfg['devices']}"
        body = spawn(part, cfg, args, xla if args.device != "gpu" else "")
    elif part == "memory":
        runs = [spawn(part, {**cfg, "m": m, "mode": "stream"}, args) for m in cfg["ms"]]
        runs.append(spawn(part, {**cfg, "m": cfg["array_m"], "mode": "array"}, args))
        stream = [r for r in runs if r["mode"] == "stream"]
        ratio = stream[-1]["rss_peak_mib"] / stream[0]["rss_peak_mib"]
        body = {
            "runs": runs,
            "ratio_peak_last_over_first": ratio,
            "target": MEMORY_TARGET,
            "within_target": ratio <= MEMORY_TARGET,
        }
    elif part == "resnet18":
        body = {
            "runs": [spawn(part, {**cfg, "patch_fraction": f}, args) for f in args.patch_fractions]
        }
    else:
        body = spawn(part, cfg, args)
    meta["load_end"] = loadavg()
    return {"meta": meta, **body}


# --------------------------------------------------------------------------- tables


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(part: str, r: dict) -> str:
    if part == "devices":
        lines = [
            "| case | stats dtype | layers | codes identical | mismatches | 1 device s | "
            "mesh s (devices) |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in r["cases"].values():
            lines.append(
                f"| {c['model']} | {c['stats_dtype']} | {c['layers']} | "
                f"{c['codes_identical']} | {c['code_mismatches']}/{c['codes']} | "
                f"{_f(c['seconds_1_device'])} | {_f(c['seconds_mesh'])} "
                f"({c['mesh_devices']}) |"
            )
    elif part == "memory":
        lines = [
            "| m | calib | peak RSS MiB | base RSS MiB | device peak MiB | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for x in r["runs"]:
            lines.append(
                f"| {x['m']} | {x['mode']} | {_f(x['rss_peak_mib'], '{:.0f}')} | "
                f"{_f(x['rss_base_mib'], '{:.0f}')} | "
                f"{_f(x['device_peak_mib'], '{:.0f}')} | {_f(x['seconds'])} |"
            )
        lines.append(
            f"\npeak(last m) / peak(first m), streamed: "
            f"{r['ratio_peak_last_over_first']:.3f} (target <= {r['target']}: "
            f"{'PASS' if r['within_target'] else 'FAIL'})"
        )
    elif part == "large":
        lines = [
            "| layer | rows | capture s | stats s | quant s | total s | rel_error |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, x in r.items():
            if isinstance(x, dict) and "rows" in x:
                lines.append(
                    f"| {name} | {x['rows']} | {_f(x['capture_s'])} | "
                    f"{_f(x['stats_s'])} | {_f(x['quant_s'])} | {_f(x['seconds'])} | "
                    f"{x['rel_error']:.4f} |"
                )
    elif part == "resnet18":
        lines = [
            "| model | images | patch fraction | capture s | stats s | quant s | total s "
            "| < 30 min |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in r["runs"]:
            lines.append(
                f"| {x['model']} {x['hw']}x{x['hw']} | {x['images']} | "
                f"{x['patch_fraction']} | {_f(x['capture_s'])} | {_f(x['stats_s'])} | "
                f"{_f(x['quant_s'])} | {_f(x['total_s'])} | {x['under_30_min']} |"
            )
    else:
        lines = [
            "| stats dtype | seconds | rel_error (fp64 stats) | reported rel_error |",
            "|---|---|---|---|",
        ]
        for k in ("float32", "float64"):
            lines.append(
                f"| {k} | {_f(r[k]['seconds'])} | {r[k]['rel_error_fp64_stats']:.6f} | "
                f"{r[k]['rel_error_reported']:.6f} |"
            )
        lines.append(
            f"\ncodes differing: {r['codes_differing_fraction']:.2e}; rel_error "
            f"float32 - float64: {r['rel_error_diff']:.2e}; time float64/float32: "
            f"{r['time_ratio_64_over_32']:.2f}"
        )
    return f"### {part}\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    ap.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "gpu", "default"),
        help="JAX backend of the workers (default: the installed default)",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument(
        "--patch-fractions",
        default=None,
        help="ResNet-18 patch fractions (default 1.0,0.25; quick: 1.0)",
    )
    ap.add_argument("--memory-ms", default=None, help="override the memory part's m list")
    ap.add_argument("--timeout-s", type=float, default=4 * 3600, help="per worker process")
    ap.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="JAX persistent compilation cache shared by the workers (faster "
        "repeated smoke runs; it lowers the peak RSS of cache hits, so do "
        "not use it for the memory part's numbers)",
    )
    ap.add_argument("--show", type=Path, help="print the tables of an existing JSON and exit")
    ap.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is None:
        args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = set(args.parts) - set(PARTS)
        if unknown:
            ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
        pf = args.patch_fractions or ("1.0" if args.quick else "1.0,0.25")
        args.patch_fractions = [float(v) for v in pf.split(",")]
    return args


def _write(out: Path, parts: dict, meta: dict) -> None:
    """Merge ``parts`` into the JSON at ``out`` (other parts kept), atomically."""
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("parts", {}).update(parts)
    data["meta"] = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = WORKERS[args.worker](json.loads(args.task))
        args.result.write_text(json.dumps({**res, "backend": backend_meta()}))
        return 0
    if args.show:
        data = json.loads(args.show.read_text())
        for part, r in data.get("parts", {}).items():
            print(table(part, r), "\n")
        return 0
    cfg = QUICK if args.quick else FULL
    if args.memory_ms:
        cfg = {
            **cfg,
            "memory": {**cfg["memory"], "ms": [int(v) for v in args.memory_ms.split(",")]},
        }
        cfg["memory"]["array_m"] = cfg["memory"]["ms"][-1]
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    t0 = time.perf_counter()
    for part in args.parts:
        print(f"[scale] {part} ...", flush=True)
        r = run_part(part, cfg[part], args)
        print(table(part, r), "\n", flush=True)
        _write(args.out, {part: r}, meta)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
