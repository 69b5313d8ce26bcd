"""The fault suite's counts (tests/faults): every report tagged ``("fault", (kind, expect))``
by tests/faults/conftest.py is tallied by class of input.

At the end of a run that ran fault tests, a table gives per class of input: the cases tried,
the clear errors and correct results (passed), the known library bugs (strict xfails, listed
with their reasons), the failures by kind (silent wrong result, unclear error, data lost,
crash; see ``faults/_faultkit.py``) and bug_fixed (a strict xfail that now passes: remove its
mark). ``GPFQ_FAULTS_REPORT=path.json`` also writes them as JSON. docs/RELIABILITY.md quotes
this table. The hooks live here, imported by tests/conftest.py, because that conftest is the
one loaded in the pytest-xdist controller, which receives every worker's reports.
"""

from __future__ import annotations

import collections
import json
import os

from faults._faultkit import DATA_LOST, SILENT, UNCLEAR

_RESULTS: list[dict] = []
_COLUMNS = ("cases", "clear_error", "correct", "known_bug", "silent_wrong", "unclear_error",
            "data_lost", "crash", "skipped", "bug_fixed")  # fmt: skip


def _failure_kind(text: str) -> str:
    for tag, kind in ((SILENT, "silent_wrong"), (UNCLEAR, "unclear_error"),
                      (DATA_LOST, "data_lost")):  # fmt: skip
        if tag in text:
            return kind
    return "crash"


def pytest_runtest_logreport(report):
    """Tally a fault case once: from its call, or from a setup failure or skip."""
    fault = dict(report.user_properties).get("fault")
    if fault is None or not (report.when == "call" or report.failed or report.skipped):
        return
    if report.when != "call" and any(r["nodeid"] == report.nodeid for r in _RESULTS):
        return  # a teardown failure after a recorded call
    kind, expect = fault
    if hasattr(report, "wasxfail"):
        # a strict xfail that passed fails the run: the bug is fixed, remove its xfail mark
        outcome = "known_bug" if report.skipped else "bug_fixed"
    elif report.passed:
        outcome = "clear_error" if expect == "error" else "correct"
    elif report.skipped:
        outcome = "skipped"
    else:
        outcome = _failure_kind(str(report.longrepr))
    _RESULTS.append({"nodeid": report.nodeid, "kind": kind, "expect": expect,
                     "outcome": outcome, "reason": getattr(report, "wasxfail", "")})  # fmt: skip


def tally(results: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, collections.Counter] = {}
    for r in results:
        row = table.setdefault(r["kind"], collections.Counter())
        row["cases"] += 1
        row[r["outcome"]] += 1
    total = collections.Counter()
    for row in table.values():
        total.update(row)
    table["TOTAL"] = total
    return {k: {c: int(v.get(c, 0)) for c in _COLUMNS} for k, v in table.items()}


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    table = tally(_RESULTS)
    tr = terminalreporter
    tr.section("fault suite counts")
    head = ["class", *_COLUMNS]
    widths = [max(len(h), 14) if i == 0 else len(h) for i, h in enumerate(head)]
    tr.write_line("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for kind, row in table.items():
        cells = [kind, *(str(row[c]) for c in _COLUMNS)]
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    bugs = sorted({(r["nodeid"], r["reason"]) for r in _RESULTS if r["outcome"] == "known_bug"})
    if bugs:
        kinds = collections.Counter(_failure_kind(reason) for _, reason in bugs)
        split = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        tr.write_line(f"known library bugs (strict xfail): {len(bugs)} ({split})")
        for nodeid, reason in bugs:
            tr.write_line(f"  {nodeid}\n      {reason}")
    path = os.environ.get("GPFQ_FAULTS_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"counts": table, "cases": _RESULTS}, f, indent=1)
