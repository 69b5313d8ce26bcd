"""Checks shared by the vision and LM experiment tests."""

from __future__ import annotations

import pytest

import gpfq_jax as gq


def check_budget_record(record: dict, budget: float, candidates: list[int]) -> dict[str, int]:
    """A successful budget run's record: within ``budget`` bits per weight, chosen from
    ``candidates``, its per-layer bits those of its allocation, at least two widths used.
    Returns the chosen bits by layer name."""
    assert "error" not in record, record.get("error")
    assert record["budget"] == budget and record["bits"] == "mixed"
    alloc = record["allocation"]
    assert record["bits_per_weight"] <= budget
    assert record["bits_per_weight"] == pytest.approx(alloc["bits_per_weight"], rel=1e-9)
    assert alloc["candidates"] == candidates and alloc["total_error"] > 0
    chosen = {a["layer"]: a["bits"] for a in alloc["layers"]}
    assert chosen == {lay["layer"]: lay["bits"] for lay in record["layers"]}
    assert len(set(chosen.values())) >= 2
    return chosen


def spy_quantize_params(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple, dict]]:
    """Record every ``gq.quantize_params`` call (args, keywords) from now on; the calls go
    through to the real function."""
    calls: list[tuple[tuple, dict]] = []
    real = gq.quantize_params

    def spy(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(gq, "quantize_params", spy)
    return calls
