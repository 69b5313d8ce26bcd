"""Smoke test of benchmarks/layer_speed.py: the quick run completes and writes the JSON schema.

No timing assertions: the machine is shared and absolute times are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "layer_speed.py"
CASES = ("dense784_m5k", "dense784_m25k", "conv4608_m50k", "dense4096_m8k")
TARGETS = ("1_gram_path_vs_data_form", "2_gram_path_vs_products", "3_gram_step_vs_matmul")
GRAM_KEYS = (
    "stats_s",
    "stats_first_s",
    "gram_first_s",
    "gram_s",
    "gram_compile_s",
    "gram_path_s",
    "matmul_s",
    "stats_products_s",
    "path_vs_products",
    "quant_vs_matmul",
    "rss_gram_mb",
    "rss_base_mb",
    "block_size",
)
DATA_KEYS = (
    "data_s",
    "data_first_s",
    "side_gram_path_s",
    "speedup",
    "codes_agreement",
    "rss_data_mb",
)


def test_layer_speed_quick(tmp_path: Path) -> None:
    out = tmp_path / "results" / "layer_speed.json"
    proc = run_script(SCRIPT, "--quick", "--out", str(out), timeout=600)
    assert "| case |" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "cases", "targets"}
    assert res["meta"]["quick"] is True
    assert len(res["meta"]["load_start"]) == 3
    assert set(res["cases"]) == set(CASES)
    for name, case in res["cases"].items():
        assert not any(k.endswith("_error") for k in case), (name, case)
        for key in GRAM_KEYS:
            assert key in case, (name, key)
        # The data form either ran (with codes agreement) or says why it was skipped.
        if "data_skipped" not in case:
            for key in DATA_KEYS:
                assert key in case, (name, key)
            assert 0.0 <= case["codes_agreement"] <= 1.0
    # --quick scales the data-form limits so that both the run and the skip paths are used.
    assert "data_s" in res["cases"]["dense784_m25k"]
    assert "data_skipped" in res["cases"]["dense4096_m8k"]
    assert set(res["targets"]) == set(TARGETS)
    for t in res["targets"].values():
        assert {"case", "value", "threshold", "op", "pass"} <= set(t)
        assert isinstance(t["pass"], bool)
    for key in TARGETS:
        assert key in proc.stdout


def test_method_speed_quick(tmp_path: Path) -> None:
    """benchmarks/method_speed.py --quick: every method on the same layer, both specs, with the
    ratio to GPFQ and the layer error; Qronos's error at most GPTQ's on these drifted inputs."""
    out = tmp_path / "method_speed.json"
    proc = run_script(ROOT / "benchmarks" / "method_speed.py", "--quick", "--repeats", "1",
                      "--out", str(out), timeout=600)  # fmt: skip
    assert "| layer | spec | method |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    methods = ("rtn", "gpfq", "gpfq-act", "gptq", "gptq-act", "qronos", "qronos-act")
    assert [r["method"] for r in rows] == list(methods) * 2
    for r in rows:
        assert r["best_s"] > 0 and r["first_s"] > 0 and 0 < r["rel_error"] < 1
    gpfq = [r for r in rows if r["method"] == "gpfq"]
    assert all(r["x_gpfq"] == 1.0 for r in gpfq)
    err = {(r["spec"], r["method"]): r["rel_error"] for r in rows}
    for spec in {r["spec"] for r in rows}:
        assert err[spec, "qronos"] <= err[spec, "gptq"] + 1e-6
