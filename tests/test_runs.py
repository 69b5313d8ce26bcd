"""The vision experiments' runs: method labels with act-order, and what a run passes on."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from experiments import quantization, runs
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
