"""Models, training helpers, float checkpoints, configs and an end-to-end ``train.py`` smoke
test (real MNIST)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints as ckpt
from experiments import data, paths
from experiments import training as tr
from experiments.models import create_model, max_pool_2x2

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("GPFQ_DATA_DIR") or REPO.parent / "shared" / "data")
MNIST_FILES = [
    DATA_DIR / "mnist" / f"{p}-{k}-ubyte.gz"
    for p in ("train", "t10k")
    for k in ("images-idx3", "labels-idx1")
]
CONFIGS = ["default", "mnist_mlp", "fashion_mnist_mlp", "cifar10_cnn", "cifar10_resnet20"]


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name,shape",
    [("mlp", (2, 28, 28, 1)), ("cifar_cnn", (2, 32, 32, 3)), ("resnet20", (2, 32, 32, 3))],
)
def test_model_shapes_train_and_eval(name, shape):
    """Shapes only (jax.eval_shape: traced, not run)."""
    model = create_model(name)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
    out, upd = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
        ),
        variables,
        x,
    )
    assert out.shape == (2, 10) and set(upd) == {"batch_stats"}


def init_shapes(name: str, shape: tuple[int, ...], **kwargs):
    model = create_model(name, **kwargs)
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_model_param_counts_and_layouts():
    v = init_shapes("resnet20", (1, 32, 32, 3))
    assert 0.26e6 < n_params(v["params"]) < 0.28e6
    v = init_shapes("mlp", (1, 28, 28, 1))
    kernels = [v["params"][f"Dense_{i}"]["kernel"].shape for i in range(3)]
    assert kernels == [(784, 500), (500, 300), (300, 10)]
    v = init_shapes("cifar_cnn", (1, 32, 32, 3))
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 32)
    assert v["params"]["Dense_0"]["kernel"].shape == (4 * 4 * 128, 128)


def test_mlp_without_bn_and_unknown_model():
    v = init_shapes("mlp", (1, 28, 28, 1), use_bn=False)
    assert "batch_stats" not in v
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg99")


def test_max_pool_2x2_matches_flax():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


# ----------------------------------------------------------------------------- helpers


def test_augment_crop_flip():
    x = np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3)
    out = data.augment_crop_flip(x, np.random.default_rng(0), pad=0)
    for a, b in zip(out, x):
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    out = data.augment_crop_flip(x, np.random.default_rng(0), pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype


def test_train_step_evaluate_and_float_roundtrip(tmp_path):
    model = create_model("mlp", features=(32,))
    tx = tr.make_optimizer("sgd", 0.1, 1e-4, total_steps=20, warmup_steps=2)
    state = tr.create_train_state(model, jax.random.key(0), (1, 28, 28, 1), tx)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 70).astype(np.int32)
    for _ in range(20):
        state, m = tr.train_step(state, x[:64], y[:64], jax.random.key(1))
    assert float(m["loss"]) < 1.0
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    direct = float(np.mean(np.argmax(model.apply(variables, x), -1) == y))
    assert tr.evaluate(model, variables, x, y, batch_size=32) == pytest.approx(direct)
    ckpt.save_float_variables(tmp_path, variables)
    ckpt.save_float_variables(tmp_path, variables)  # replaces the old one
    restored = ckpt.load_float_variables(tmp_path)
    np.testing.assert_array_equal(model.apply(restored, x), model.apply(variables, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]  # no temporaries left
    with pytest.raises(FileNotFoundError, match="no float checkpoint"):
        ckpt.load_float_variables(tmp_path / "missing")


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for key in (
        "dataset",
        "data_dir",
        "model",
        "seed",
        "batch_size",
        "num_epochs",
        "learning_rate",
        "weight_decay",
        "val_size",
        "limit_train",
        "quant",
    ):
        assert key in cfg, key
    create_model(cfg.model.name, **cfg.model.kwargs.to_dict())
    assert set(cfg.quant) >= {
        "calib_size",
        "calib_batch_size",
        "methods",
        "bits",
        "grids",
        "scale",
        "per_channel",
    }


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_default_config_quantizes_the_committed_checkpoint():
    cfg, full = load_config("default"), load_config("mnist_mlp")
    assert cfg.float_checkpoint == "checkpoints/mnist_mlp" and not cfg.train_if_missing
    assert ckpt.has_float_checkpoint(REPO / cfg.float_checkpoint)
    for key in ("dataset", "seed", "val_size", "model"):  # the checkpoint's validation split
        assert cfg[key] == full[key], key
    assert cfg.quant.calib_size < full.quant.calib_size
    assert set(cfg.quant.methods) == {"gpfq", "rtn", "gptq"}


def test_result_paths_are_relative(tmp_path):
    wd = tmp_path / "wd"
    assert paths.relative_path(paths.REPO / "checkpoints" / "mnist_mlp", wd) == (
        "checkpoints/mnist_mlp"
    )
    assert paths.relative_path(wd / "float", wd) == "<workdir>/float"
    assert paths.relative_path(wd, wd) == "<workdir>"
    source = f"MNIST idx files ({tmp_path / 'data' / 'mnist'})"
    assert paths.relative_source(source, tmp_path / "data") == "MNIST idx files (<data_dir>/mnist)"
    argv = [str(REPO / "train.py"), f"--workdir={wd}", "--config=configs/mnist_mlp.py"]
    assert paths.relative_command(argv, wd) == [
        "train.py", "--workdir=<workdir>", "--config=configs/mnist_mlp.py",
    ]  # fmt: skip
    config = {"float_checkpoint": str(wd / "float"), "data_dir": None, "quant": {"seed": 0}}
    assert paths.relative_config(config, wd) == {
        "float_checkpoint": "<workdir>/float", "data_dir": None, "quant": {"seed": 0},
    }  # fmt: skip


# ----------------------------------------------------------------------------- end to end


def run_train(workdir: Path, epochs: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(REPO / "train.py"), "--config=configs/mnist_mlp.py",
        f"--workdir={workdir}", f"--config.num_epochs={epochs}",
        "--config.limit_train=300", "--config.val_size=100",
    ]  # fmt: skip
    env = {**os.environ, "GPFQ_DATA_DIR": str(DATA_DIR)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    missing = [str(p) for p in MNIST_FILES if not p.exists()]
    if missing:
        pytest.skip(f"MNIST files missing under {DATA_DIR} (set GPFQ_DATA_DIR): {missing}")
    workdir = tmp_path_factory.mktemp("mnist_mlp")
    run_train(workdir, epochs=1)
    return workdir


@pytest.mark.slow
def test_train_end_to_end(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1]
    assert 0.0 <= metrics[0]["test_accuracy"] <= 1.0 and "val_accuracy" in metrics[0]
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["test_accuracy"] == metrics[-1]["test_accuracy"]
    assert "MNIST" in summary["dataset_source"] and summary["n_train"] == 300
    assert summary["config"]["num_epochs"] == 1
    # paths relative to the workdir / data directory, never this machine's absolute paths
    assert summary["float_checkpoint"] == "<workdir>/float"
    assert summary["dataset_source"] == "MNIST idx files (<data_dir>/mnist)"
    assert str(trained) not in (trained / "train_summary.json").read_text()
    variables = ckpt.load_float_variables(trained)
    assert set(variables) == {"params", "batch_stats"}
    model = create_model("mlp")
    assert model.apply(variables, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


@pytest.mark.slow
def test_train_resumes_from_checkpoint(trained):
    first = json.loads((trained / "metrics.json").read_text())
    proc = run_train(trained, epochs=2)
    assert "resumed from" in proc.stderr and "epoch 1/2" not in proc.stderr
    metrics = json.loads((trained / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0] == first[0]  # epoch 1 not redone
    assert metrics[1]["step"] == 2 * metrics[0]["step"]
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 2
    assert sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2",
    ]  # fmt: skip
