"""Smoke test of benchmarks/depth_speed.py: a tiny run completes and writes the JSON rows; the
compile counter counts.

No timing assertions: the machine is shared and absolute times are noise.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "depth_speed.py"
TINY = [
    "--blocks", "1,2", "--sequences", "2", "--seq-len", "8", "--d-model", "16", "--heads", "2",
    "--kv-heads", "1", "--head-dim", "8", "--mlp", "32", "--vocab", "32",
]  # fmt: skip
ROW_KEYS = {
    "blocks",
    "driver",
    "status",
    "layers",
    "seconds",
    "s_per_block",
    "forward_s",
    "ratio",
    "compiles",
    "compile_source",
    "xla_compiles",
    "rss_peak_mib",
    "rss_increase_mib",
    "logit_rel_change",
}


def _depth_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("depth_speed")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_compile_counter_counts_new_programs_only():
    import jax
    import jax.numpy as jnp

    a, b, c = (jax.block_until_ready(jnp.full(n, 2.0)) for n in (3, 3, 5))  # before counting
    counter = _depth_speed().CompileCounter()
    f = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
    f(a).block_until_ready()
    f(b).block_until_ready()  # same shape: cached, not compiled again
    f(c).block_until_ready()  # new shape: compiled
    assert counter.lowered == 2 and counter.backend == 2 and counter.backend_s > 0
    assert counter.by_name["jit(<lambda>)"] == 2
    counter.reset()
    f(c).block_until_ready()
    assert counter.lowered == 0


@pytest.mark.slow  # > 10 s on 2 CPU cores (a fresh process per row)
def test_depth_speed_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results" / "depth_speed.json"
    proc = run_script(SCRIPT, *TINY, "--out", str(out), "--timeout-minutes", "8", timeout=1200)
    assert "| blocks | driver |" in proc.stdout
    res = json.loads(out.read_text())
    assert res["benchmark"] == "depth_speed"
    assert {"cpus", "platform", "jax"} <= set(res["machine"])
    assert res["flags"]["blocks"] == [1, 2] and res["flags"]["method"] == "rtn"
    drivers = ["frontier", "reference"]
    rows = res["rows"]
    assert [(r["blocks"], r["driver"]) for r in rows] == [(d, v) for d in (1, 2) for v in drivers]
    for r in rows:
        assert r["status"] == "ok", r
        assert ROW_KEYS <= set(r)
        assert r["layers"] == 7 * r["blocks"] + 1  # q, k, v, o, gate, up, down; lm_head
        assert r["seconds"] > 0 and r["forward_s"] > 0 and r["compiles"] > 0
        assert r["rss_peak_mib"] > 0 and 0 < r["logit_rel_change"] < 1
