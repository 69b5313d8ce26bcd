"""Smoke test of benchmarks/qwix_peer.py on its ``--tiny`` path (random tiny Llama, no data).

Checks what the benchmark's numbers rest on: Qwix's quantized forward pass really runs on its
QArrays (int8 logits close to float, int4 clearly different, and equal to the float model on
the dequantized weights), Qwix's PTQ on our "int" grid gives our RTN weights, Qwix's GPTQ sees
every calibration batch and falls back to PTQ on o_proj only, and every requested row is there.
No timing assertions: the machine is shared and absolute times are noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _scripts import run_script

pytest.importorskip("qwix")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "qwix_peer.py"
METHODS = ("qwix_ptq", "qwix_gptq_jit", "gptq", "gpfq")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("qwix_peer") / "qwix_peer.json"
    run_script(
        SCRIPT, "--tiny", "--calib", "4", "--eval_windows", "2", "--seq_len", "16",
        "--points", "4:8", "--grids", "int", "--methods", ",".join(METHODS),
        "--out", str(out), timeout=300,
    )  # fmt: skip
    return json.loads(out.read_text())


def test_rows_and_ratios(report):
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == set(METHODS)
    for r in rows.values():
        assert r["status"] == "ok", r["status"]
        assert (r["bits"], r["group_size"], r["grid"]) == (4, 8, "int")
        assert math.isfinite(r["perplexity"]) and r["seconds"] > 0
        assert r["quantized_layers"] == 14  # 7 projections x 2 blocks, the same on both sides
    assert {(q["ours"], q["qwix"]) for q in report["ratios"]} == {
        ("gptq", "qwix_gptq_jit"),
        ("gpfq", "qwix_gptq_jit"),
    }
    assert report["calibration"]["windows"] == 4 and report["versions"]["qwix"]


def test_qwix_forward_is_quantized(report):
    check = report["forward_check"]
    assert check["int8"]["qvalue_dtypes"] == ["int8"]
    assert check["int4"]["qvalue_dtypes"] == ["int4"]
    assert check["int8"]["logit_rel_change"] < 0.05
    assert check["int4"]["logit_rel_change"] > 4 * check["int8"]["logit_rel_change"]
    for r in [check["int8"], check["int4"], *report["rows"]]:
        if "qwix_vs_dequantized_max_abs" in r:
            assert r["qwix_vs_dequantized_max_abs"] < 1e-4


def test_qwix_grid_and_calibration(report):
    rows = {r["method"]: r for r in report["rows"]}
    ptq = rows["qwix_ptq"]
    assert ptq["rtn_differing_not_ties"] == 0 and ptq["rtn_fraction_differing"] < 1e-3
    gptq = rows["qwix_gptq_jit"]
    assert gptq["calibration_tokens"] == 4 * 16 and gptq["hessian_counts"] == [1]
    assert gptq["gptq_layers"] == 12
    assert gptq["fallback_layers"] == [f"layers_{i}/attn/o_proj/kernel" for i in (0, 1)]
    assert gptq["logit_rel_change"] != ptq["logit_rel_change"]
