"""Smoke test of ``benchmarks/serve.py``: a random tiny Llama served through Qwix (``--tiny``).

Checks the JSON's keys per row and that Qwix serving reproduces our dequantized model (logit
differences and perplexities). Runs the script as a user does (a subprocess), ~30 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._scripts import ROOT, run_script

pytest.importorskip("qwix")

ROW_KEYS = {
    "form", "bytes_held", "bytes_at_bits", "linear_float32_bytes", "linear_bytes_held",
    "linear_bytes_at_bits", "max_logit_diff", "perplexity", "latency_ms_b1", "tokens_per_s_b1",
    "latency_ms_b2", "tokens_per_s_b2",
}  # fmt: skip


def test_serve_tiny_llama(tmp_path: Path) -> None:
    out = tmp_path / "serve_tiny.json"
    proc = run_script(
        ROOT / "benchmarks" / "serve.py", "--model", "smollm2", "--tiny", "--out", str(out),
        timeout=300,
    )  # fmt: skip
    assert "| qwix int4 |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serve" and report["tiny"] is True
    assert report["unit"] == "tokens" and report["metric"] == "perplexity"
    rows = {r["form"]: r for r in report["rows"]}
    assert list(rows) == ["float", "dequantized int4", "qwix int8", "qwix int4"]
    for r in rows.values():
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["latency_ms_b1"] > 0 and r["tokens_per_s_b2"] > 0
    for bits in (8, 4):
        assert rows[f"qwix int{bits}"]["max_logit_diff"] < 1e-4
    q4, deq4 = rows["qwix int4"], rows["dequantized int4"]
    assert abs(q4["perplexity"] - deq4["perplexity"]) <= 1e-4 * deq4["perplexity"]
    # the served linear layers are int QArrays: fewer bytes than float32, fewest at 4 bits
    assert q4["linear_bytes_at_bits"] < rows["qwix int8"]["linear_bytes_at_bits"]
    assert q4["linear_bytes_held"] < q4["linear_float32_bytes"] == deq4["linear_bytes_held"]
