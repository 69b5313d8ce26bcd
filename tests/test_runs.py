"""The vision experiments' runs: method labels with act-order, and what a run passes on."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from experiments import plots, quantization, reports, runs
from experiments.models import MLP


def test_run_grid_parses_act_order_labels():
    grid = runs.run_grid(("gpfq", "gpfq-act", "qronos-act"), ("int",), (3,))
    assert [(r.method, r.act_order, r.name) for r in grid] == [
        ("gpfq", False, "gpfq_int_3"),
        ("gpfq", True, "gpfq-act_int_3"),
        ("qronos", True, "qronos-act_int_3"),
    ]


def test_quantize_run_passes_act_order_and_records_the_label(tmp_path, monkeypatch):
    """A "-act" run quantizes with act_order=True and records its label; a plain one does not."""
    model = MLP(features=(8,), num_classes=3, use_bn=False)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    y = np.asarray(model.apply(variables, x)).argmax(-1)
    ds = types.SimpleNamespace(x_val=x, y_val=y, x_test=x, y_test=y)
    setup = quantization.Setup(model, variables, ds, x, lambda a: a, 16)
    q = ConfigDict({"calib_batch_size": 16, "scale": "max", "save_quantized": False})
    seen = []
    real = quantization.runs.gq.quantize_params

    def spy(*args, **kw):
        seen.append(kw.get("act_order"))
        return real(*args, **kw)

    monkeypatch.setattr(quantization.runs.gq, "quantize_params", spy)
    for run in runs.run_grid(("qronos", "qronos-act"), ("int",), (4,)):
        record = quantization.quantize_run(run, setup, q, tmp_path)
        assert "error" not in record, record.get("error")
        assert record["method"] == run.label and record["test_accuracy"] > 0.5
    assert seen == [False, True]


def test_group_size_points_are_their_own_runs_and_rows(tmp_path):
    """``extra_runs`` may name (grid, bits, group_size): its own run, row and plot line."""
    grid = runs.run_grid(("gpfq",), ("int",), (4,), (("asym", 4, 64),))
    assert [(r.name, r.group_size) for r in grid] == [("gpfq_int_4", None), ("gpfq_asym_4_g64", 64)]
    results = {
        "float": {"test_accuracy": 0.9},
        "model": "m",
        "dataset": "d",
        "runs": [
            {"method": "gpfq", "grid": "int", "group_size": None, "bits": 4, "test_accuracy": 0.8,
             "layers": [{"layer": "a", "rel_error": 0.1}]},
            {"method": "gpfq", "grid": "int", "group_size": 64, "bits": 4, "test_accuracy": 0.85,
             "layers": [{"layer": "a", "rel_error": 0.05}]},
        ],
    }  # fmt: skip
    table = reports.accuracy_table(results)
    assert "| GPFQ int | 80.00 |" in table and "| GPFQ int g64 | 85.00 |" in table
    plots.plot_accuracy_vs_bits(results, tmp_path / "acc.png")
    plots.plot_layer_errors(results, tmp_path / "layers.png")
    assert (tmp_path / "acc.png").stat().st_size > 0 and (tmp_path / "layers.png").exists()
