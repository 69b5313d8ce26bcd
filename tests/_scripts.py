"""Running a repository script the way a user does: ``python script args`` from the root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` in the repository root; assert it exits 0 (stderr shown)."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
