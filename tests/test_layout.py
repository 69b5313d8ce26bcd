"""The package's shape: core free of Flax, public names resolve, modules and functions short."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpfq_jax"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARK = "long:"

NO_FLAX = (
    "assert not any(m.startswith('flax') for m in sys.modules), "
    "sorted(m for m in sys.modules if m.startswith('flax'))"
)


@pytest.mark.parametrize("module", ["gpfq_jax.core", "gpfq_jax"])
def test_import_loads_no_flax(module):
    """`import gpfq_jax.core` and `import gpfq_jax` alone never import Flax."""
    code = f"import {module}, sys; {NO_FLAX}"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"import {module} loaded flax:\n{proc.stderr}"


@pytest.mark.parametrize("module", ["gpfq_jax", "gpfq_jax.core"])
def test_all_names_resolve(module):
    mod = importlib.import_module(module)
    assert mod.__all__, f"{module}.__all__ is empty"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{module}.__all__ has duplicates"
    missing = []
    for name in mod.__all__:
        try:
            getattr(mod, name)
        except AttributeError as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"{module}.__all__ names that do not resolve: {missing}"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    """Functions/methods (nested ones too) over MAX_FUNCTION_LINES without a "long:" reason.

    A def's length is end_lineno - lineno + 1 (the whole def, docstring included; decorators
    not counted). The reason is a comment containing "long:" in the comment block directly
    above the def (above its decorators, if any).
    """
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= MAX_FUNCTION_LINES:
            continue
        i = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2  # 0-based, above
        reason = False
        while i >= 0 and lines[i].lstrip().startswith("#"):
            reason = reason or LONG_MARK in lines[i]
            i -= 1
        if not reason:
            rel = path.relative_to(root)
            out.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_modules_are_short():
    too_long = []
    for path in _modules():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_functions_are_short_or_say_why():
    offenders = [f for path in _modules() for f in _long_functions(path)]
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines without a '# {LONG_MARK} <reason>' comment "
        f"directly above the def: {offenders}"
    )


def test_long_function_check_sees_reasons(tmp_path):
    """The checker itself: a long def fails without a reason, passes with one (also above
    decorators), and a short one always passes."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = (
        f"def bad():\n{body}\n\n"
        f"# long: a written reason\ndef good():\n{body}\n\n"
        f"# long: reason above the decorator\n@staticmethod\ndef decorated():\n{body}\n\n"
        "def short():\n    return 1\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(src)
    found = _long_functions(path, root=tmp_path)
    assert [f.split()[1] for f in found] == ["bad"], found
