"""The documentation's Python examples run as tests: README.md and docs/API_EXAMPLES.md.

README blocks run in order in one namespace. Its quick start uses names it does not define
(a model, its variables, calibration and test images); the test provides them from a tiny
Linen MLP. A README block that needs any other undefined name fails the test with that name.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

import gpfq_jax as gq

ROOT = Path(__file__).resolve().parents[1]
# ```python / ```py fenced blocks (other languages, e.g. bash, are skipped).
PYTHON_BLOCK = re.compile(r"^```(?:python|py)[ \t]*\n(.*?)^```", flags=re.S | re.M)


def _python_blocks(path: Path) -> list[str]:
    return PYTHON_BLOCK.findall(path.read_text())


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name a block binds anywhere (assignments, imports, defs, arguments, ...)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            names.update(node.names)
    return names


def _free_names(blocks: list[str]) -> list[str]:
    """Names the blocks read but never bind (and that are not builtins), in order of use."""
    trees = [ast.parse(b) for b in blocks]
    bound = set().union(*(_bound_names(t) for t in trees)) | set(dir(builtins))
    free: dict[str, None] = {}
    for t in trees:
        for node in ast.walk(t):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id not in bound:
                    free[node.id] = None
    return list(free)


# ----------------------------------------------------------------------------- README


class ReadmeMLP(nn.Module):
    """A tiny stand-in for the README's `model`: flattens its input, three Dense layers."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(24)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


def _readme_fixture() -> dict:
    """The names the README's quick start uses without defining them."""
    rng = np.random.default_rng(0)
    calib_images = rng.normal(size=(128, 6, 6, 1)).astype(np.float32)
    images = rng.normal(size=(16, 6, 6, 1)).astype(np.float32)
    model = ReadmeMLP()
    variables = model.init(jax.random.PRNGKey(0), images[:1])
    return {"model": model, "variables": variables, "calib_images": calib_images, "images": images}


def _exec_block(src: str, ns: dict, label: str, provided: set[str]) -> None:
    try:
        exec(compile(src, label, "exec"), ns)
    except NameError as e:
        name = getattr(e, "name", None) or str(e)
        pytest.fail(
            f"{label} uses the name {name!r}, which neither the README defines nor "
            f"tests/test_docs.py provides (it provides {sorted(provided)}); define it in the "
            f"README or add it to _readme_fixture()"
        )


@pytest.mark.slow  # > 10 s on 2 CPU cores
def test_readme_python_blocks(tmp_path, monkeypatch):
    blocks = _python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no ```python blocks"
    fixture = _readme_fixture()
    missing = [n for n in _free_names(blocks) if n not in fixture]
    assert not missing, (
        f"README.md's python blocks use names they never define and tests/test_docs.py does "
        f"not provide: {missing} (it provides {sorted(fixture)}); define them in the README "
        f"or add them to _readme_fixture()"
    )
    monkeypatch.chdir(tmp_path)  # checkpoints written with relative paths land here
    ns: dict = {"__name__": "__readme__", **fixture}
    for i, src in enumerate(blocks):
        _exec_block(src, ns, f"README.md[python block {i}]", set(fixture))
    # Whatever the README computed must be well-formed: quantized layers and finite errors.
    results = [v for v in ns.values() if isinstance(v, gq.QuantizeResult)]
    layers = [v for v in ns.values() if isinstance(v, gq.LayerResult)]
    for res in results:
        assert res.layers, "README quantize_params result has no quantized layers"
        assert all(np.isfinite(r.rel_error) for r in res.layers)
    for r in layers:
        assert np.isfinite(float(r.rel_error)) and r.q.shape == r.codes.shape


# ----------------------------------------------------------------------------- API_EXAMPLES


def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "API_EXAMPLES.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_api_examples(tmp_path, capsys, monkeypatch):
    blocks = _doc_blocks()
    assert len(blocks) == 5
    for b in blocks[:2]:
        assert len([ln for ln in b.splitlines() if ln.strip()]) < 15
    ns: dict = {}
    exec(blocks[0], ns)  # Linen
    lin = ns["res"]
    assert [r.name for r in lin.layers] == ["Dense_0", "Dense_1"]
    assert lin.folded == [("Dense_0", "BatchNorm_0")]
    exec(blocks[1], {})  # NNX
    out = capsys.readouterr().out
    assert "(512, 10)" in out and "('fc2', 8)" in out
    exec(blocks[2], ns)  # rules
    assert [(r.spec.bits, r.method, r.levels) for r in ns["res"].layers] == [
        ("ternary", "gpfq", 3),
        (8, "rtn", 255),
    ]
    monkeypatch.chdir(tmp_path)  # the checkpoint is written with a relative path
    exec(blocks[3], ns)
    assert (tmp_path / "gpfq_example" / "mlp_q4").is_dir()
    assert ns["report"]["quantized_bytes"] < ns["report"]["float_bytes"]
    exec(blocks[4], ns)  # transformer, frontier driver, resumable
    res = ns["res"]
    assert res.driver.mode == "frontier" and len(res.driver.blocks) == 4
    assert ["layers_0/gate", "layers_0/up"] in res.driver.shared
    assert len(res.layers) == 4 * 7 and res.skipped == ["embed"]
    assert (tmp_path / "gpfq_example" / "decoder_run" / "resume.json").is_file()


# ----------------------------------------------------------------------------- the helpers


def test_free_names_finds_undefined_names(tmp_path):
    blocks = [
        "import numpy as np\nfrom os import path as p\ndef f(a, *b, k=1):\n    return a + k",
        "y = [z for z in range(3)]\nres = f(model, np.ones(2), p)\nprint(res, unknown.attr)",
    ]
    assert sorted(_free_names(blocks)) == ["model", "unknown"]
    md = tmp_path / "x.md"
    md.write_text("```bash\nls\n```\n\n```python\na = 1\n```\n```py\nb = a\n```\n")
    assert _python_blocks(md) == ["a = 1\n", "b = a\n"]  # bash blocks are skipped
