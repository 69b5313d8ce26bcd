"""Helpers the benchmark scripts share: load, peak memory, table cells, the JSON report."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages ([] where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def rss_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def git_state() -> dict:
    """HEAD commit and uncommitted library files (the code measured); empty outside git."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        try:
            proc = subprocess.run(["git", *a], capture_output=True, text=True, timeout=10, cwd=root)
            return proc.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty": git("status", "--porcelain", "--", "gpfq_jax").splitlines(),
    }


def fmt(v: Any, spec: str = "{:.3f}") -> str:
    """A table cell: ``spec.format(v)``, or "-" for None."""
    return "-" if v is None else spec.format(v)


def write_report(path: Path, benchmark: str, rows: list[dict], **options: Any) -> None:
    """Write ``rows`` with the benchmark's name, the date, ``options`` and the machine."""
    import jax  # here, not at import: scale.py's parent process never loads jax

    out = {
        "benchmark": benchmark,
        "date": datetime.datetime.now().isoformat(),
        **options,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "loadavg": list(os.getloadavg()),
        },
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
