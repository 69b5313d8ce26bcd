"""The vision experiments' runs: method labels with act-order, what a run passes on, and
bits-per-weight budget runs end to end (generated MNIST-shaped data, a small MLP)."""

from __future__ import annotations

import copy
import gzip
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import gpfq_jax as gq
from configs import default
from experiments import checkpoints, data, plots, quantization, reports, runs
from experiments.models import MLP, create_model
from tests._experiment_checks import check_budget_record, spy_quantize_params


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
    setup = quantization.Setup(model, variables, ds, x, lambda a: a, 16, fisher=None)
    q = ConfigDict({"calib_batch_size": 16, "scale": "max", "save_quantized": False})
    calls = spy_quantize_params(monkeypatch)
    for run in runs.run_grid(("qronos", "qronos-act"), ("int",), (4,)):
        record = quantization.quantize_run(run, setup, q, tmp_path)
        assert "error" not in record, record.get("error")
        assert record["method"] == run.label and record["test_accuracy"] > 0.5
    assert [kw["act_order"] for _, kw in calls] == [False, True]


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


def test_budget_runs_follow_the_uniform_runs_and_are_never_twins():
    budgets = ((3.0, None), (2.5, 64))
    grid = runs.run_grid(("gpfq", "rtn"), ("int",), ("ternary", 2), (), budgets, (2, 3))
    uniform = ["gpfq_int_ternary", "gpfq_int_2", "rtn_int_ternary", "rtn_int_2"]
    mixed = ["gpfq_int_b3.0", "rtn_int_b3.0", "gpfq_int_b2.5_g64", "rtn_int_b2.5_g64"]
    assert [r.name for r in grid] == uniform + mixed
    budget = grid[4]
    assert budget.budget == 3.0 and budget.bits == 3 and budget.mixed  # bits: a placeholder
    # The int grid at 2 bits is ternary: uniform runs share it, a budget run never does.
    assert runs.same_alphabet(grid[1], grid[:1]) == grid[0]
    low = runs.Run("gpfq", "int", 2, budget=2.5)  # its placeholder alphabet is ternary too
    assert runs.same_alphabet(low, grid[:2]) is None
    assert runs.same_alphabet(grid[0], [low]) is None


# --------------------------------------------------------------------------- budget runs


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x800 + {3: 3, 1: 1}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def budget_config(tmp_path_factory):
    """A config quantizing a float MLP 784-32-16-10 (saved as a float checkpoint) on generated
    MNIST-shaped images labelled by the model itself: one uniform 3-bit run, then budgets of
    2.0 bits per weight (infeasible: the steps come on top) and 3.0."""
    tmp = tmp_path_factory.mktemp("budget")
    model = create_model("mlp", features=(32, 16), use_bn=False)
    rng = np.random.default_rng(0)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    checkpoints.save_float_variables(tmp / "float_model", variables)
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", 400), ("t10k", 200)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        logits = model.apply(variables, data.normalize(x[..., None], "mnist"))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(logits).argmax(-1))
    return default.experiment(
        "mnist", "mlp", {"features": (32, 16), "use_bn": False}, data_dir=str(tmp / "data"),
        float_checkpoint=str(tmp / "float_model"), val_size=100, eval_batch_size=100,
        quant_overrides={"calib_size": 128, "calib_batch_size": 64, "methods": ("gpfq",),
                         "bits": (3,), "budgets": ((2.0, None), (3.0, None))},
    )  # fmt: skip


def test_budget_run_records_resume_and_an_infeasible_budget(budget_config, tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    res = quantization.quantize_experiment(budget_config, workdir)
    by_name = {r["name"]: r for r in res["runs"]}
    assert list(by_name) == ["gpfq_int_3", "gpfq_int_b2.0", "gpfq_int_b3.0"] and res["complete"]
    weights = 784 * 32 + 32 * 16 + 16 * 10
    steps = 32 * (32 + 16 + 10)  # one float32 step per output channel
    # The uniform run: 3-bit codes (whole bytes per layer here) + steps.
    flat = by_name["gpfq_int_3"]
    assert "error" not in flat, flat.get("error")
    assert flat["bits_per_weight"] == pytest.approx(3 + steps / weights, rel=1e-12)
    assert "budget" not in flat and "bits" not in flat["layers"][0]
    # The budget run: a mix of widths within 3.0 bits per weight (all at 3 would be 3.07).
    budget = by_name["gpfq_int_b3.0"]
    chosen = check_budget_record(budget, 3.0, [2, 3, 4, 8])
    alloc = budget["allocation"]
    assert alloc["budget_bits"] == 3.0
    assert alloc["min_bits_per_weight"] == pytest.approx(2 + steps / weights, rel=1e-12)
    assert list(chosen) == ["Dense_0", "Dense_1", "Dense_2"]
    assert 0 < budget["test_accuracy"] <= 1 and budget["val_accuracy"] is not None
    # The budget run's saved checkpoint gives its recorded test accuracy.
    setup = quantization.load_setup(budget_config, Path(budget_config.float_checkpoint))
    saved = gq.load_quantized(workdir / "quantized" / "gpfq_int_b3.0")
    assert setup.evaluate(saved, "test") == budget["test_accuracy"]
    # The infeasible budget: a failed run naming the minimum; the 3.0 run after it went on.
    failed = by_name["gpfq_int_b2.0"]
    assert failed["bits"] == "mixed" and failed["budget"] == 2.0
    assert failed["error"].startswith("ValueError: budget_bits=2.0 is infeasible")
    assert (
        f"minimum achievable is {alloc['min_bits_per_weight']:.6g} bits per weight"
        in (failed["error"])
    )
    text = (workdir / "results.md").read_text()
    assert "## Mixed precision" in text
    assert f"| gpfq_int_b3.0 | budget 3.0 | {budget['bits_per_weight']:.3f} |" in text
    assert "| run | widths | bits/weight | val % | test % | sum rel. error² | layers at" in text
    assert f"| gpfq_int_3: {flat['bits_per_weight']:.3f}, " in text  # the uniform run above it
    assert "## Mixed precision: error (bits)" in text
    assert f"| Dense_0 | {budget['layers'][0]['rel_error']:.4f} ({chosen['Dense_0']}) |" in text
    assert "| method | 3-bit |" in text  # the accuracy table keeps the uniform runs only
    assert "1 run(s) failed: gpfq_int_b2.0" in text
    for png in ("accuracy_vs_bits.png", "layer_errors.png"):
        assert (workdir / png).stat().st_size > 0
    # A rerun of the same config keeps both finished runs and retries only the failed one.
    first = json.loads((workdir / "results.json").read_text())["runs"]
    calls = spy_quantize_params(monkeypatch)
    again = {r["name"]: r for r in quantization.quantize_experiment(budget_config, workdir)["runs"]}
    assert [kw.get("budget_bits") for _, kw in calls] == [2.0] and list(again) == list(by_name)
    for name in ("gpfq_int_3", "gpfq_int_b3.0"):
        assert again[name]["resumed"]
        assert again[name]["test_accuracy"] == by_name[name]["test_accuracy"]
    assert "error" in again["gpfq_int_b2.0"]
    saved = json.loads((workdir / "results.json").read_text())["runs"]
    assert saved[2]["allocation"] == first[2]["allocation"] and saved[2]["resumed"]
    assert saved[2]["layers"] == first[2]["layers"]


def test_fisher_budget_run_records_its_objective_and_samples(budget_config, tmp_path):
    """A Fisher budget run: its allocation's objective, the Fisher's sample count and time
    recorded; the Fisher is the mean squared cross-entropy gradient of one calibration image
    with its training label at a time (hand-computed with jax.grad)."""
    config = copy.deepcopy(budget_config)
    q = config.quant
    q.budgets, q.fisher_budgets, q.fisher_samples = (), ((3.0, None),), 16
    res = quantization.quantize_experiment(config, tmp_path / "workdir")
    rec = {r["name"]: r for r in res["runs"]}["gpfq_int_b3.0fisher"]
    check_budget_record(rec, 3.0, [2, 3, 4, 8])
    assert rec["allocation"]["objective"] == "fisher" and rec["fisher_samples"] == 16
    assert rec["fisher_seconds"] > 0
    text = (tmp_path / "workdir" / "results.md").read_text()
    assert "| gpfq_int_b3.0fisher | budget 3.0, Fisher |" in text
    setup = quantization.load_setup(config, Path(config.float_checkpoint))
    picked = runs.calibration_indices(len(setup.ds.x_train), q.calib_size, q.seed)[:16]

    def ce(params, image, label):
        logits = setup.model.apply({"params": params}, image[None])[0]
        return -jax.nn.log_softmax(logits)[label]

    grads = [jax.grad(ce)(setup.variables["params"], im, lab)
             for im, lab in zip(setup.calib[:16], setup.ds.y_train[picked])]  # fmt: skip
    want = jax.tree.map(lambda *g: np.mean(np.square(g), axis=0), *grads)
    got = setup.fisher(16)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-12)
    for bad in (0, 129, 2.0, True):
        with pytest.raises(ValueError, match="fisher_samples must be an int in 1..128"):
            setup.fisher(bad)


def test_budget_points_in_the_accuracy_plot_and_tables(tmp_path):
    """Budget runs are points at their bits per weight (the uniform runs move there too); the
    mixed table and the nearest uniform runs (below and above) are in results.md."""

    def run(name, bits, bpw, test, **kw):
        layers = [
            {"layer": n, "rel_error": 0.1, "c": 1.0, "bits": b} for n, b in (("a", 3), ("b", 2))
        ]
        seconds = {"total": 1.0, "capture": 0.1, "stats": 0.1, "quant": 0.8}
        return {"name": name, "method": "gpfq", "grid": "int", "group_size": None, "bits": bits,
                "levels": 7, "storage_bits": 3, "bits_per_weight": bpw, "val_accuracy": test,
                "test_accuracy": test, "layers": layers, "seconds": seconds, **kw}  # fmt: skip

    results = {
        "model": "mlp", "dataset": "mnist", "dataset_source": "generated",
        "float_checkpoint": "ckpt", "c_selection": "search",
        "calibration": {"size": 10, "seed": 0, "split": "train", "batch_size": 10},
        "float": {"test_accuracy": 0.9, "val_accuracy": 0.9},
        "runs": [run("gpfq_int_2", 2, 2.05, 0.5), run("gpfq_int_3", 3, 3.05, 0.8),
                 run("gpfq_int_b2.5", "mixed", 2.49, 0.7, budget=2.5)],
    }  # fmt: skip
    table = reports.uniform_neighbours_table(results).splitlines()
    assert table[2] == ("| gpfq_int_b2.5 | 2.490 | 70.00 | gpfq_int_2: 2.050, 50.00% | "
                        "gpfq_int_3: 3.050, 80.00% |")  # fmt: skip
    mixed = reports.mixed_table(results).splitlines()
    assert mixed[0] == ("| run | widths | bits/weight | val % | test % | sum rel. error² | "
                        "layers at 2 | layers at 3 |")  # fmt: skip
    assert mixed[2] == "| gpfq_int_b2.5 | budget 2.5 | 2.490 | 70.00 | 70.00 | 0.0200 | 1 | 1 |"
    assert "| GPFQ int | 50.00 | 80.00 |" in reports.accuracy_table(results)
    assert "| gpfq_int_b2.5 | mixed | mixed | 2.490 |" in reports.runs_table(results)
    plots.plot_accuracy_vs_bits(results, tmp_path / "acc.png")
    plots.plot_layer_errors(results, tmp_path / "layers.png")
    assert (tmp_path / "acc.png").stat().st_size > 0 and (tmp_path / "layers.png").exists()


def test_a_workdir_gathers_runs_over_invocations_with_other_run_lists(
    budget_config, tmp_path, monkeypatch
):
    """The run list (methods, bits, budgets, candidates...) is not part of the setup: a later
    invocation listing other runs keeps the earlier finished ones (listed or not), and a
    budget run chosen from other candidates is redone."""
    workdir = tmp_path / "workdir"
    first = budget_config.copy_and_resolve_references()
    first.quant.budgets = ((3.0, None),)
    quantization.quantize_experiment(first, workdir)
    calls = spy_quantize_params(monkeypatch)
    second = first.copy_and_resolve_references()
    second.quant.bits = (4,)  # gpfq_int_3 is no longer listed
    second.quant.budgets = ((3.0, None),)
    second.quant.budget_candidates = (2, 3, 4)  # so the budget run is redone
    res = quantization.quantize_experiment(second, workdir)
    names = [r["name"] for r in res["runs"]]
    assert names == ["gpfq_int_3", "gpfq_int_4", "gpfq_int_b3.0"]
    assert [(a[4], a[3].bits, kw.get("budget_bits")) for a, kw in calls] == [
        ("gpfq", 4, None),
        ("gpfq", 4, 3.0),
    ]
    kept = res["runs"][0]
    assert kept["resumed"] and "error" not in kept
    assert res["runs"][2]["allocation"]["candidates"] == [2, 3, 4]
    saved = json.loads((workdir / "results.json").read_text())
    assert [r["name"] for r in saved["runs"]] == names and saved["complete"]
