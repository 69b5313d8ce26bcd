"""What every benchmark's JSON records besides its rows: name, date, options and machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax


def write_report(path: Path, benchmark: str, rows: list[dict], **options: Any) -> None:
    """Write ``rows`` with the benchmark's name, the date, ``options`` and the machine."""
    out = {"benchmark": benchmark, "date": datetime.datetime.now().isoformat(), **options,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "jax": jax.__version__, "backend": jax.default_backend(),
                       "loadavg": list(os.getloadavg())},
           "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
