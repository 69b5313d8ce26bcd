"""Smoke test of benchmarks/model_speed.py: the quick run completes and writes the JSON schema.

No timing assertions: the machine is shared and absolute times are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "model_speed.py"
LAYER_KEYS = {
    "index",
    "layer",
    "kind",
    "shape",
    "rows",
    "capture_s",
    "capture_first_s",
    "capture_steady_per_batch_s",
    "stats_s",
    "quant_s",
    "total_s",
    "rel_error",
}


def test_model_speed_quick(tmp_path: Path) -> None:
    out = tmp_path / "results" / "model_speed.json"
    proc = run_script(SCRIPT, "--quick", "--out", str(out), timeout=600)
    assert "### mlp" in proc.stdout and "capture time vs layer index" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "models", "depth"}
    assert res["meta"]["quick"] is True
    assert set(res["models"]) == {"mlp", "resnet"}
    kinds = {lay["kind"] for lay in res["models"]["resnet"]["layers"]}
    assert kinds == {"conv", "dense"}
    for run in [*res["models"].values(), *(d["run"] for d in res["depth"].values())]:
        assert run["layers"], run["model"]
        for lay in run["layers"]:
            assert set(lay) == LAYER_KEYS
            assert lay["total_s"] >= lay["capture_s"] >= lay["capture_first_s"] >= 0
        total = run["total"]
        assert abs(total["total_s"] - sum(lay["total_s"] for lay in run["layers"])) < 1e-6
    assert set(res["depth"]) == {"2", "4", "8"}
    assert [len(d["run"]["layers"]) for d in res["depth"].values()] == [3, 5, 9]
    assert "slope_s_per_layer" in res["depth"]["8"]["fit"]
