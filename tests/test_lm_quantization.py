"""The LM experiment (experiments/lm_quantization.py, configs/smollm2.py) end to end on a tiny
random Llama written to a GGUF file and six tiny "novels" in a temporary data directory.

Checks the run list, bits per weight counted by hand, the RTN error-only calibration, the
saved checkpoints (their perplexity is the recorded one), the reports, resuming a workdir
with more runs, and a failing run recorded while the others go on.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_gguf_llama import TINY, TOKENS, _hf_tensors, _write
from test_llama import _model

import gpfq_jax as gq
from configs import smollm2
from experiments import lm_quantization, lm_reports, lm_text, quantization, runs
from experiments.llama import Llama, LlamaConfig
from experiments.perplexity import perplexity
from tests._experiment_checks import check_budget_record

WORDS = ["the", "cat", "hit", "rat", "ten", "tan", "bird", "ride", "hint", "third", "dear"]


def _novel(rng: np.random.Generator, chars: int) -> str:
    words, n = [], 0
    while n < chars:
        words.append(WORDS[rng.integers(len(WORDS))])
        n += len(words[-1]) + 1
    return " ".join(words)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(GGUF path, data dir) of a tiny untied random Llama and six novels."""
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("lm")
    cfg = LlamaConfig.tiny(tie_embeddings=False, vocab_size=len(TOKENS), **TINY)
    _, variables, _ = _model(cfg, rng)
    path = _write(tmp / "tiny.gguf", cfg, _hf_tensors(variables["params"], cfg))
    folder = tmp / "data" / "text" / "austen"
    folder.mkdir(parents=True)
    for name in lm_text.NOVELS:
        extra = lm_text.EVAL_START_CHAR if name == lm_text.EVAL_NOVEL else 0
        (folder / f"{name}.txt").write_text(_novel(rng, extra + 600), encoding="utf-8")
    return path, tmp / "data"


def _config(files, methods=("rtn", "gpfq"), grids=("asym", "int")):
    c = smollm2.get_config()
    c.gguf, c.data_dir = str(files[0]), str(files[1])
    c.window, c.eval_windows, c.eval_batch_size = 16, 4, 2
    q = c.quant
    q.calib_windows, q.calib_batch_size, q.error_windows = 6, 3, 3
    q.points, q.grids, q.methods = ((3, 16),), grids, methods
    return c


def test_parse_method_and_run_order():
    assert runs.parse_method("gpfq") == ("gpfq", False)
    assert runs.parse_method("gptq-act") == ("gptq", True)
    with pytest.raises(ValueError, match="unknown method"):
        runs.parse_method("gptq-fast")
    q = smollm2.get_config().quant
    grid = lm_quantization.lm_runs(q)
    assert len(grid) == 4 * 2 * 4  # methods x grids x points
    assert [r.name for r in grid[:4]] == [
        "rtn_asym_4_g64", "gptq_asym_4_g64", "gptq-act_asym_4_g64", "gpfq_asym_4_g64",
    ]  # fmt: skip
    assert grid[2].act_order and grid[2].method == "gptq"
    specs = {r.label: lm_quantization.run_spec(r, q) for r in grid[:4]}
    assert specs["rtn"].scale == "max" and specs["gpfq"].scale == "search"
    assert specs["gpfq"].search_grid == tuple(q.search_grid) and specs["gpfq"].group_size == 64
    assert lm_quantization.data_free(grid[0], specs["rtn"])
    assert not lm_quantization.data_free(grid[3], specs["gpfq"])


@pytest.fixture(scope="module")
def experiment(files, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    return workdir, lm_quantization.lm_experiment(_config(files), workdir)


def test_runs_records_and_bits_per_weight(experiment):
    workdir, res = experiment
    assert res["complete"] and math.isfinite(res["float"]["perplexity"])
    assert res["evaluation"]["windows"] == 4 and res["calibration"]["tokens"] == 6 * 16
    assert res["calibration"]["novels"][0].startswith("<data_dir>/text/austen/")
    names = [r["name"] for r in res["runs"]]
    assert names == [f"{m}_{g}_3_g16" for g in ("asym", "int") for m in ("rtn", "gpfq")]
    for r in res["runs"]:
        assert "error" not in r, r.get("error")
        # 3-bit codes + per group of 16: a float32 step (+ a 3-bit zero point on asym)
        per_group = 32 + (3 if r["grid"] == "asym" else 0)
        assert r["bits_per_weight"] == pytest.approx(3 + per_group / 16, rel=1e-4)  # whole bytes
        assert r["calibration_windows"] == (3 if r["method"] == "rtn" else 6)
        assert r["scale"] == ("max" if r["method"] == "rtn" else "search")
        assert len(r["layers"]) == 2 * 7 + 1 and math.isfinite(r["perplexity"])  # + lm_head
    for name in ("results.md", "layer_errors.md", "perplexity_vs_bits.png", "layer_errors.png"):
        assert (workdir / name).is_file(), name
    text = (workdir / "results.md").read_text()
    assert "| 3-bit g16 | asym | 5.188 |" in text and "Float perplexity" in text
    assert "attn/q_proj" in (workdir / "layer_errors.md").read_text()


def test_saved_checkpoint_gives_the_recorded_perplexity(experiment, files):
    workdir, res = experiment
    record = next(r for r in res["runs"] if r["name"] == "gpfq_asym_3_g16")
    path = workdir / record["checkpoint"].replace("<workdir>/", "")
    setup = lm_quantization.load_lm_setup(_config(files))
    variables = gq.load_quantized(path)
    assert isinstance(setup.model, Llama)
    ppl = perplexity(setup.model, variables, setup.eval_windows, setup.eval_batch_size)
    assert ppl == pytest.approx(record["perplexity"], rel=1e-5)
    assert record["size"]["quantized_disk_bytes"] > 0
    # The float side of the size comparison: the float variables as an orbax checkpoint.
    ckpt = res["float_checkpoint"]
    saved = ocp.PyTreeCheckpointer().restore((workdir / ckpt["path"]).absolute())
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(setup.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ckpt["disk_bytes"] > 0
    assert f"{ckpt['disk_bytes'] / 1e6:.1f} MB on disk" in (workdir / "results.md").read_text()


def test_resume_keeps_finished_runs_and_records_a_failure(experiment, files, monkeypatch):
    workdir, first = experiment
    real = lm_quantization.gq.quantize_params

    def failing(*args, **kw):
        if args[4] == "gptq" and not kw.get("act_order"):
            raise RuntimeError("injected")
        return real(*args, **kw)

    monkeypatch.setattr(lm_quantization.gq, "quantize_params", failing)
    config = _config(files, ("rtn", "gptq", "gptq-act", "gpfq"), grids=("asym",))
    res = lm_quantization.lm_experiment(config, workdir)
    by_name = {r["name"]: r for r in res["runs"]}
    # the earlier int-grid runs, not listed this time, are kept first; then the listed runs
    carried = [r["name"] for r in first["runs"] if r["grid"] == "int"]
    assert list(by_name) == carried + [f"{m}_asym_3_g16" for m in config.quant.methods]
    for r in first["runs"]:
        assert by_name[r["name"]]["resumed"]
        assert by_name[r["name"]]["perplexity"] == r["perplexity"]
    assert by_name["gptq_asym_3_g16"]["error"] == "RuntimeError: injected"
    act = by_name["gptq-act_asym_3_g16"]
    assert "resumed" not in act and act["method"] == "gptq-act" and act["perplexity"] > 0
    assert "1 run(s) failed" in (workdir / "results.md").read_text()
    saved = json.loads((workdir / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == [r["name"] for r in res["runs"]]


def test_recovered_share():
    assert lm_reports.recovered(30.0, 40.0, 20.0) == pytest.approx(0.5)
    assert lm_reports.recovered(45.0, 40.0, 20.0) == pytest.approx(-0.25)
    assert lm_reports.recovered(20.0, 20.0, 20.0) is None


def test_mixed_run_names_and_the_setup_without_run_lists():
    # Runs without a budget keep their names (a workdir's finished runs are matched by name).
    assert runs.Run("gptq", "asym", 4, 64, True).name == "gptq-act_asym_4_g64"
    assert runs.Run("gpfq", "int", 3).name == "gpfq_int_3"
    assert runs.Run("gpfq", "asym", 8, 64, budget=3).name == "gpfq_asym_b3.0_g64"
    assert runs.Run("gpfq", "asym", 2, 64, first_bits=3).name == "gpfq_asym_3first2_g64"
    fisher = runs.Run("gpfq", "asym", 8, 64, budget=3.547, fisher=True)
    assert fisher.name == "gpfq_asym_b3.547fisher_g64"
    c = smollm2.get_config()
    before = [r.name for r in lm_quantization.lm_runs(c.quant)]
    c.quant.budgets, c.quant.split_points = ((3.0, 64), (2.5, 128)), ((3, 2, 64),)
    grid = lm_quantization.lm_runs(c.quant)
    assert [r.name for r in grid[: len(before)]] == before
    extra = [r.name for r in grid[len(before) :]]
    assert len(extra) == (2 + 2) * 2 * 4  # (budgets + both split orders) x grids x methods
    assert extra[:2] == ["rtn_asym_b3.0_g64", "gptq_asym_b3.0_g64"]
    assert "gpfq_int_b2.5_g128" in extra and "gpfq_asym_2first3_g64" in extra
    assert all(r.bits == 8 for r in grid if r.budget is not None)
    # The setup the code before the budget runs recorded: the config without methods, points
    # and grids, from a config without the new keys. It must not change.
    old = c.to_dict()
    old["quant"] = {k: v for k, v in old["quant"].items()
                    if k not in ("methods", "points", "grids", "budgets", "budget_candidates",
                                 "split_points", "fisher_budgets", "fisher_samples")}  # fmt: skip
    assert quantization.setup_config(c) == old


def test_budget_and_split_runs_resume_an_old_workdir(experiment, files, tmp_path):
    source, first = experiment
    workdir = tmp_path / "workdir"
    shutil.copytree(source, workdir)
    # results.json as the code before the budget runs wrote it (no new keys in its setup).
    saved = json.loads((workdir / "results.json").read_text())
    for key in ("budgets", "budget_candidates", "split_points", "fisher_budgets", "fisher_samples"):
        saved["setup"]["quant"].pop(key, None)
        saved["config"]["quant"].pop(key, None)
    (workdir / "results.json").write_text(json.dumps(saved))
    config = _config(files, ("gpfq",), grids=("asym",))
    q = config.quant
    q.budgets, q.budget_candidates, q.split_points = ((5.0, 16),), (3, 2), ((3, 2, 16),)
    q.fisher_budgets, q.fisher_samples = ((5.0, 16),), 2
    res = lm_quantization.lm_experiment(config, workdir)
    by_name = {r["name"]: r for r in res["runs"]}
    # the listed runs come last; the earlier runs not listed now are kept before them
    assert list(by_name)[-5:] == ["gpfq_asym_3_g16", "gpfq_asym_b5.0_g16",
                                  "gpfq_asym_b5.0fisher_g16", "gpfq_asym_3first2_g16",
                                  "gpfq_asym_2first3_g16"]  # fmt: skip
    assert {r["name"] for r in saved["runs"] if "error" not in r} <= set(by_name)
    kept = next(r for r in first["runs"] if r["name"] == "gpfq_asym_3_g16")
    assert by_name["gpfq_asym_3_g16"]["resumed"]
    assert by_name["gpfq_asym_3_g16"]["perplexity"] == kept["perplexity"]
    budget = by_name["gpfq_asym_b5.0_g16"]
    chosen = check_budget_record(budget, 5.0, [2, 3])
    alloc = budget["allocation"]
    assert len(chosen) == 15  # all at 2 bits: 4.125 bits per weight, all at 3: 5.19
    assert all(a["params"] > 0 for a in alloc["layers"]) and alloc["objective"] == "output"
    fisher = by_name["gpfq_asym_b5.0fisher_g16"]
    check_budget_record(fisher, 5.0, [2, 3])
    assert fisher["allocation"]["objective"] == "fisher" and fisher["fisher_samples"] == 2
    assert fisher["fisher_seconds"] > 0
    # the Fisher objective's errors are loss estimates, not the output errors of the other run
    assert fisher["allocation"]["layers"][0]["errors"] != alloc["layers"][0]["errors"]
    for name, first_bits, rest in (("3first2", 3, 2), ("2first3", 2, 3)):
        r = by_name[f"gpfq_asym_{name}_g16"]
        assert r["split"] == [first_bits, rest] and r["first_blocks"] == 1
        for lay in r["layers"]:
            assert lay["bits"] == (first_bits if lay["layer"].startswith("layers_0/") else rest)
        assert 2 + 34 / 16 < r["bits_per_weight"] < 3 + 35 / 16  # all at 2 / all at 3 bits
    text = (workdir / "results.md").read_text()
    assert "## Mixed precision" in text and "layers at 2 |" in text
    assert f"| gpfq_asym_b5.0_g16 | budget 5.0 | {budget['bits_per_weight']:.3f} |" in text
    assert "| gpfq_asym_3first2_g16 | 3 then 2 bits |" in text
    assert "| 3-bit g16 | asym |" in text  # the uniform table keeps its rows
    assert "gpfq_asym_b5.0_g16" in (workdir / "layer_errors.md").read_text()
    assert (workdir / "perplexity_vs_bits.png").is_file()
    # A finished budget run is kept only when chosen from the same candidates.
    assert quantization.same_candidates(budget, q)
    assert quantization.same_candidates(by_name["gpfq_asym_3first2_g16"], q)
    assert quantization.same_candidates(fisher, q)
    q.fisher_samples = 3
    assert not quantization.same_candidates(fisher, q) and quantization.same_candidates(budget, q)
    q.budget_candidates = (3, 2, 4)
    assert not quantization.same_candidates(budget, q)
