"""quantize.py end to end (real MNIST, tiny settings), the width sweep, and the quantization
experiment's pieces (experiments.runs, reports, plots, float_model, width_sweep)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

import gpfq_jax as gq
from experiments import data, float_model, plots, reports
from experiments import runs as ex
from experiments import training as tr
from experiments.models import create_model
from experiments.width_sweep import loglog_slope, width_sweep_experiment
from gpfq_jax.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(
    os.environ.get("GPFQ_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
MNIST_FILES = [
    DATA_DIR / "mnist" / f"{p}-{k}-ubyte.gz"
    for p in ("train", "t10k")
    for k in ("images-idx3", "labels-idx1")
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_module(name: str, path: Path):
    """Import a config file as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(name: str) -> ConfigDict:
    return load_module(f"config_{name}", REPO / "configs" / f"{name}.py").get_config()


def need_mnist() -> None:
    missing = [str(p) for p in MNIST_FILES if not p.exists()]
    if missing:
        pytest.skip(f"MNIST files missing under {DATA_DIR} (set GPFQ_DATA_DIR): {missing}")


# ----------------------------------------------------------------------------- calibration


def test_calibration_is_seeded_distinct_and_sorted():
    a = ex.calibration_indices(1000, 200, seed=3)
    np.testing.assert_array_equal(a, ex.calibration_indices(1000, 200, seed=3))
    assert not np.array_equal(a, ex.calibration_indices(1000, 200, seed=4))
    assert len(np.unique(a)) == 200 and np.all(np.diff(a) > 0) and a.max() < 1000
    with pytest.raises(ValueError, match="calib_size=1001"):
        ex.calibration_indices(1000, 1001, seed=0)
    with pytest.raises(ValueError, match="calib_size=0"):
        ex.calibration_indices(1000, 0, seed=0)


def test_calibration_comes_from_train_split_only():
    n = 300
    ds = data.Dataset(
        x_train=np.arange(n)[:, None],
        y_train=np.zeros(n, np.int32),
        x_val=np.full((50, 1), -1),
        y_val=np.zeros(50, np.int32),
        x_test=np.full((50, 1), -2),
        y_test=np.zeros(50, np.int32),
        name="toy",
        source="toy",
    )
    calib = ex.calibration_images(ds.x_train, 120, seed=0)
    assert calib.shape == (120, 1) and calib.min() >= 0
    np.testing.assert_array_equal(calib[:, 0], ex.calibration_indices(n, 120, seed=0))


def test_calibration_from_real_mnist_train_split_excludes_val():
    need_mnist()
    ds = data.load_dataset("mnist", DATA_DIR, val_size=5000, seed=0, allow_download=False)
    x_all, _ = data.load_split("mnist", "train", DATA_DIR, allow_download=False)
    train_idx, val_idx = data.train_val_split(len(x_all), 5000, seed=0)
    picked = train_idx[ex.calibration_indices(len(ds.x_train), 500, seed=0)]
    assert not set(picked.tolist()) & set(val_idx.tolist())
    np.testing.assert_array_equal(ex.calibration_images(ds.x_train, 500, 0), x_all[picked])


# ----------------------------------------------------------------------------- run grid


def test_run_grid_product_extras_and_names():
    runs = ex.run_grid(
        ["gpfq", "rtn"],
        ["int"],
        ["ternary", "2", 3],
        extra=[("ls", "ternary"), ("int", 3), ("int_full", 2)],
    )
    assert [r.name for r in runs] == [
        "gpfq_int_ternary",
        "gpfq_int_2",
        "gpfq_int_3",
        "gpfq_ls_ternary",
        "gpfq_int_full_2",
        "rtn_int_ternary",
        "rtn_int_2",
        "rtn_int_3",
        "rtn_ls_ternary",
        "rtn_int_full_2",
    ]
    spec = ex.make_spec(runs[3], "search")
    assert (spec.bits, spec.grid, spec.channelwise) == ("ternary", "ls", False)
    assert ex.make_spec(runs[3], None, per_channel=True).channelwise
    assert ex.bits_x("ternary") == pytest.approx(np.log2(3)) and ex.bits_x(4) == 4.0


def test_same_alphabet_reuses_int_2bit_as_ternary():
    tern, two, full2, ls2 = (
        ex.Run("gpfq", "int", "ternary"),
        ex.Run("gpfq", "int", 2),
        ex.Run("gpfq", "int_full", 2),
        ex.Run("gpfq", "ls", 2),
    )
    assert ex.same_alphabet(two, [tern]) == tern
    assert ex.same_alphabet(two, [ex.Run("rtn", "int", "ternary")]) is None
    assert ex.same_alphabet(full2, [tern]) is None and ex.same_alphabet(ls2, [tern]) is None
    rec = ex.reused_record({"name": tern.name, "bits": "ternary", "test_accuracy": 0.9}, two)
    assert rec == {
        "name": "gpfq_int_2",
        "bits": 2,
        "test_accuracy": 0.9,
        "same_as": "gpfq_int_ternary",
    }


# ----------------------------------------------------------------------------- tables


def toy_results() -> dict:
    def run(method, grid, bits, test, **kw):
        layers = [
            {"layer": "Dense_0", "rel_error": 0.1, "c": 1.5},
            {"layer": "Dense_1", "rel_error": 0.2, "c": 0.75},
        ]
        return {
            "name": f"{method}_{grid}_{bits}",
            "method": method,
            "grid": grid,
            "bits": bits,
            "levels": 3,
            "storage_bits": 2,
            "val_accuracy": test - 0.001,
            "test_accuracy": test,
            "layers": layers,
            "seconds": {"total": 2.0, "capture": 0.5, "stats": 0.25, "quant": 1.25},
            **kw,
        }

    return {
        "model": "mlp",
        "dataset": "mnist",
        "dataset_source": "MNIST idx files",
        "float_checkpoint": "ckpt",
        "c_selection": "search",
        "calibration": {"size": 100, "seed": 0, "split": "train", "batch_size": 50},
        "float": {"test_accuracy": 0.9849, "val_accuracy": 0.985},
        "runs": [
            run("gpfq", "int", 3, 0.98),
            run("gpfq", "int", "ternary", 0.9712),
            run("rtn", "int", 3, 0.97),
            {**run("gpfq", "int", 2, 0.9712), "same_as": "gpfq_int_ternary"},
            {
                "name": "rtn_int_ternary",
                "method": "rtn",
                "grid": "int",
                "bits": "ternary",
                "error": "ValueError: boom",
            },
        ],
        "seconds_total": 9.0,
    }


def test_accuracy_table_format():
    assert reports.accuracy_table(toy_results()) == "\n".join(
        [
            "| method | ternary | 2-bit | 3-bit |",
            "| --- | --- | --- | --- |",
            "| float | 98.49 | 98.49 | 98.49 |",
            "| GPFQ int | 97.12 | 97.12 | 98.00 |",
            "| RTN int | - | - | 97.00 |",
        ]
    )


def test_runs_table_and_markdown_report_failures(tmp_path):
    res = toy_results()
    table = reports.runs_table(res).splitlines()
    assert table[2] == (
        "| gpfq_int_3 | 3 | 2 | - | 97.90 | 98.00 | 0.100 / 0.200 | 1.50 / 0.75 | "
        "2.0 | 0.5 | 0.2 | 1.2 |"
    )
    assert "FAILED: ValueError: boom" in table[-1]
    assert "| gpfq_int_2 | same alphabet as gpfq_int_ternary: reused |" in table[-2]
    md = reports.results_markdown(res)
    for part in (
        "## Test accuracy (%)",
        "## Validation accuracy (%)",
        "## Runs",
        "100 images from the train split",
        "1 run(s) failed: rtn_int_ternary",
        "Total quantization time: 6.0 s over 3 runs",
        "repeats the ternary run",
    ):
        assert part in md, part
    plots.plot_accuracy_vs_bits(res, tmp_path / "a.png")
    plots.plot_layer_errors(res, tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files


def test_write_text_atomic_replaces(tmp_path):
    write_text_atomic(tmp_path / "r.md", "one")
    write_text_atomic(tmp_path / "r.md", "two")
    assert (tmp_path / "r.md").read_text() == "two" and len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------- one run


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def test_execute_run_selects_c_on_validation_only():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64, 6)))
    model = TinyMLP()
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    run = ex.Run("rtn", "int", 3)
    base = ex.quantizer(model, variables, x, run.method, batch_size=32, progress=False)
    specs, calls = [], []

    def quantize(spec):
        specs.append(spec)
        return base(spec)

    def evaluate(v, split):  # val accuracy peaks at c = 2; test is asked once, at the end
        calls.append(split)
        return 0.5 if split == "test" else 1.0 - abs(specs[-1].c - 2.0)

    record, res = ex.execute_run(
        run, quantize, evaluate, scale="search", c_grid_val=[0.5, 2.0, 4.0]
    )
    assert calls == ["val", "val", "val", "test"]
    assert [(s.c, s.scale) for s in specs] == [(0.5, None), (2.0, None), (4.0, None)]
    assert record["c_choice"] == "val"
    assert [p["c"] for p in record["c_val_curve"]] == [0.5, 2.0, 4.0]
    assert [layer["c"] for layer in record["layers"]] == [2.0, 2.0]
    assert record["test_accuracy"] == 0.5 and record["val_accuracy"] == 1.0
    assert set(record["seconds"]) == {"total", "capture", "stats", "quant", "c_selection"}
    assert (record["levels"], record["storage_bits"], record["per_channel"]) == (7, 3, True)

    calls.clear()
    record, _ = ex.execute_run(run, quantize, evaluate, scale="search")
    assert calls == ["val", "test"] and record["c_choice"] == "search"
    assert specs[-1].scale == "search" and "c_range" in record["layers"][0]


# ----------------------------------------------------------------------------- width sweep


def test_width_sweep_tiny(tmp_path):
    """N >> m: GPFQ's error falls with N, RTN's does not (tiny sizes, one seed)."""
    cfg = config("width_sweep")
    cfg.sweep.update(
        m=8,
        widths=(16, 128),
        neurons=8,
        seeds=(0,),
        methods=("gpfq", "rtn"),
        gptq_max_width=16,
        scale="median",
        c=2.0,
    )  # a step independent of N
    result = width_sweep_experiment(cfg, tmp_path)
    assert result["slope"]["gpfq"] < -0.3 and abs(result["slope"]["rtn"]) < 0.1
    assert result["tail_slope"] == result["slope"]
    saved = json.loads((tmp_path / "width_sweep.json").read_text())
    assert saved["widths"] == [16, 128] and saved["m"] == 8
    assert "| 128 |" in (tmp_path / "width_sweep.md").read_text()
    assert (tmp_path / "width_sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert loglog_slope([1, 2, 4], [1, 0.5, 0.25]) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- CLI


def test_missing_checkpoint_names_paths_and_command(tmp_path):
    cfg = config("mnist_mlp")
    cfg.float_checkpoint = str(tmp_path / "absent")
    with pytest.raises(SystemExit) as e:
        float_model.find_or_train(cfg, tmp_path / "wd", "configs/mnist_mlp.py")
    msg = str(e.value)
    assert str(tmp_path / "absent") in msg and str(tmp_path / "wd" / "float") in msg
    assert f"python train.py --config=configs/mnist_mlp.py --workdir={tmp_path / 'wd'}" in msg


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """quantize.py on real MNIST: trains a tiny float model first (300 images, 1 epoch)."""
    need_mnist()
    workdir = tmp_path_factory.mktemp("quantize")
    cmd = [
        sys.executable,
        str(REPO / "quantize.py"),
        "--config=configs/mnist_mlp.py",
        f"--workdir={workdir}",
        f"--config.float_checkpoint={workdir / 'absent'}",
        "--config.train_if_missing=True",
        "--config.num_epochs=1",
        "--config.limit_train=300",
        "--config.val_size=500",
        "--config.quant.calib_size=200",
        "--config.quant.calib_batch_size=100",
        "--config.quant.methods=('gpfq',)",
        "--config.quant.bits=(3, 4)",
        "--config.quant.extra_runs=()",
        "--config.quant.scale=max",
    ]
    env = {**os.environ, "GPFQ_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


@pytest.mark.slow
def test_cli_writes_results_plots_and_checkpoints(cli_run):
    workdir, proc = cli_run
    assert (workdir / "float" / "_CHECKPOINT_METADATA").exists()  # trained first
    res = json.loads((workdir / "results.json").read_text())
    assert res["complete"] and res["calibration"] == {
        "size": 200,
        "seed": 0,
        "split": "train",
        "batch_size": 100,
        "pool": 59500,
        "patch_fraction": 1.0,
    }
    assert "MNIST" in res["dataset_source"] and res["config"]["quant"]["calib_size"] == 200
    assert 0.1 < res["float"]["test_accuracy"] <= 1 and res["float"]["val_accuracy"] is not None
    assert [r["name"] for r in res["runs"]] == ["gpfq_int_3", "gpfq_int_4"]
    for r in res["runs"]:
        assert {
            "method",
            "grid",
            "bits",
            "levels",
            "storage_bits",
            "val_accuracy",
            "test_accuracy",
            "layers",
            "seconds",
            "checkpoint",
        } <= set(r)
        assert [lay["layer"] for lay in r["layers"]] == ["Dense_0", "Dense_1", "Dense_2"]
        assert all({"rel_error", "c", "seconds"} <= set(lay) for lay in r["layers"])
    assert res["runs"][1]["levels"] == 15 and res["runs"][1]["storage_bits"] == 4
    md = (workdir / "results.md").read_text()
    assert "| method | 3-bit | 4-bit |" in md and "| GPFQ int |" in md
    for png in ("accuracy_vs_bits.png", "layer_errors.png"):
        assert (workdir / png).read_bytes()[:8] == PNG_MAGIC
    assert "| GPFQ int |" in proc.stdout
    # paths relative to the workdir / data directory / repository, never absolute ones
    assert res["float_checkpoint"] == "<workdir>/float"
    assert res["runs"][0]["checkpoint"] == "<workdir>/quantized/gpfq_int_3"
    assert res["dataset_source"] == "MNIST idx files (<data_dir>/mnist)"
    assert res["command"].split()[1:3] == ["quantize.py", "--config=configs/mnist_mlp.py"]
    assert str(workdir) not in (workdir / "results.json").read_text()


@pytest.mark.slow
def test_cli_quantized_checkpoint_reproduces_accuracy(cli_run):
    workdir, _ = cli_run
    res = json.loads((workdir / "results.json").read_text())
    run = res["runs"][0]
    variables = gq.load_quantized(workdir / "quantized" / "gpfq_int_3")
    x_test, y_test = data.load_split("mnist", "test", DATA_DIR, allow_download=False)
    acc = tr.evaluate(
        create_model("mlp"),
        variables,
        x_test,
        y_test,
        preprocess=lambda b: data.normalize(b, "mnist"),
    )
    assert acc == run["test_accuracy"]
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
    assert len(np.unique(kernel[:, 0])) <= 7  # 3-bit int: 7 levels per channel
