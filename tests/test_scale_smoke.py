"""Smoke test of benchmarks/scale.py: the quick run completes and writes the JSON schema.

No timing or memory assertions: the machine is shared and absolute numbers are noise. Code
equality of the sharded run is asserted (it is exact in float64).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"
SPLIT = {"capture_s", "stats_s", "quant_s"}
# JAX's persistent compilation cache (keyed by program, options and versions) makes repeated
# runs of this test several times faster; a cold run compiles everything.
CACHE = Path(tempfile.gettempdir()) / "gpfq_jax_test_compile_cache"


def test_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ("--quick", "--device", "cpu", "--out", str(out), "--compile-cache", str(CACHE))
    proc = run_script(SCRIPT, *args, timeout=900)
    for part in ("### devices", "### memory", "### large", "### resnet18", "### dtype"):
        assert part in proc.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"meta", "parts"}
    parts = res["parts"]
    assert set(parts) == {"devices", "memory", "large", "resnet18", "dtype"}
    for p in parts.values():
        assert p["meta"]["quick"] is True and p["meta"]["device_arg"] == "cpu"

    dev = parts["devices"]
    assert dev["backend"]["devices"] == 4
    for case in dev["cases"].values():
        assert case["codes_identical"] and case["mesh_devices"] == 4
        assert {"seconds_1_device", "seconds_mesh", "split_mesh"} <= set(case)

    mem = parts["memory"]
    assert {"runs", "ratio_peak_last_over_first", "target", "within_target"} <= set(mem)
    assert [r["mode"] for r in mem["runs"]] == ["stream", "stream", "array"]
    for r in mem["runs"]:
        assert r["rss_peak_mib"] >= r["rss_base_mib"] > 0 and r["rows"] == r["m"]

    large = parts["large"]
    layers = [v for v in large.values() if isinstance(v, dict) and "rows" in v]
    assert len(layers) == 2 and all(SPLIT <= set(v) for v in layers)

    (run,) = parts["resnet18"]["runs"]
    assert SPLIT | {"total_s", "setup_s", "layers", "under_30_min"} <= set(run)
    assert run["patch_fraction"] == 1.0 and len(run["layers"]) == 4

    dt = parts["dtype"]
    assert {
        "float32",
        "float64",
        "codes_differing_fraction",
        "rel_error_diff",
        "time_ratio_64_over_32",
    } <= set(dt)
    assert dt["backend"]["x64"] is True
