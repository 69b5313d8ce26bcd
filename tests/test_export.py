"""Tests for quantized checkpoints: save_quantized / load_quantized / size_report."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import gpfq_jax as gq
from gpfq_jax.flax import checkpoints as export


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(96)(x)))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10, use_bias=False)(x)


@pytest.fixture(scope="module")
def linen_case():
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 48))
    model = Net()
    v = model.init(jax.random.PRNGKey(1), x)
    rules = [
        gq.Rule("Dense_1", spec=gq.QuantSpec(bits=2, grid="ls")),
        gq.Rule("Dense_2", spec=gq.QuantSpec(bits=8, grid="zzs")),
    ]
    res = gq.quantize_params(model, v, x, gq.QuantSpec(bits=4), "rtn", rules, progress=False)
    return model, v, x, res


def _same(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, u), (_, w) in zip(la, lb):
        assert u.dtype == w.dtype, p
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w), err_msg=str(p))


def test_linen_round_trip_is_exact_and_smaller(linen_case, tmp_path):
    model, v, x, res = linen_case
    out = gq.save_quantized(tmp_path / "q", res)
    assert out == (tmp_path / "q").absolute()
    loaded = gq.load_quantized(tmp_path / "q")
    _same(loaded, res.variables)
    np.testing.assert_array_equal(model.apply(loaded, x), model.apply(res.variables, x))
    meta = export.read_metadata(tmp_path / "q")
    assert [lay["code_dtype"] for lay in meta["layers"]] == ["int4", "int4", "int16"]
    assert [lay["offset"] for lay in meta["layers"]] == [0.0, 0.5, 0.0]
    assert (meta["layers"][1]["spec"]["grid"], meta["layers"][1]["levels"]) == ("ls", 4)
    arrays = export.restore_orbax(tmp_path / "q" / export.ARRAYS)
    assert arrays["codes"]["0"].dtype == jnp.int4
    np.testing.assert_array_equal(np.asarray(arrays["codes"]["1"], np.int8), res.layers[1].codes)

    ocp.PyTreeCheckpointer().save(tmp_path / "float", v)
    rep = gq.size_report(tmp_path / "q", tmp_path / "float")
    assert rep["quantized_disk_bytes"] < rep["float_disk_bytes"]
    assert rep["quantized_bytes"] < rep["float_bytes"] / 3
    n0 = 48 * 96
    assert rep["layers"][0] == {
        "layer": "Dense_0",
        "params": n0,
        "storage_bits": 4,
        "codes_bytes": n0 // 2,
        "scale_bytes": 96 * 4,
    }
    assert rep["layers"][2]["storage_bits"] == 9  # zzs 8 bits: 257 levels
    mem = gq.size_report(res, v)
    for k in ("float_bytes", "quantized_bytes", "codes_bytes", "scales_bytes", "other_bytes"):
        assert mem[k] == rep[k], k
    assert mem["quantized_disk_bytes"] is None


def _files(path):
    """Each file under ``path`` with its size, inode and mtime (a replaced file shows)."""
    out = []
    for r, _, fs in os.walk(path):
        for f in fs:
            st = os.stat(os.path.join(r, f))
            out.append(
                (os.path.relpath(os.path.join(r, f), path), st.st_size, st.st_ino, st.st_mtime_ns)
            )
    return sorted(out)


def test_refuses_overwrite_and_interrupted_save_leaves_nothing(linen_case, tmp_path, monkeypatch):
    *_, res = linen_case
    float_ckpt = tmp_path / "float"
    ocp.PyTreeCheckpointer().save(float_ckpt, {"w": jnp.ones(3)})  # an existing float checkpoint
    float_before = _files(float_ckpt)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gq.save_quantized(float_ckpt, res)
    with pytest.raises(FileExistsError, match="not a gpfq_jax quantized checkpoint"):
        gq.save_quantized(float_ckpt, res, overwrite=True)  # only ever replaces our own format
    assert _files(float_ckpt) == float_before

    target = tmp_path / "ckpt"
    gq.save_quantized(target, res)  # an existing quantized checkpoint
    before = _files(target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gq.save_quantized(target, res)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_text_atomic", boom)  # arrays written, then failure
    with pytest.raises(RuntimeError, match="disk full"):
        gq.save_quantized(target, res, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        gq.save_quantized(tmp_path / "new", res)
    assert _files(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "float"]  # no temp dirs, "new"
    monkeypatch.undo()
    gq.save_quantized(target, res, overwrite=True)
    _same(gq.load_quantized(target), res.variables)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "float"]


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)  # holds a typed PRNG key
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(nnx.relu(self.conv(x))).mean(axis=(1, 2)))


def test_nnx_round_trip(tmp_path):
    net = NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 3))
    res = gq.quantize_params(net, None, x, gq.QuantSpec(bits=3), "rtn", progress=False)
    gq.save_quantized(tmp_path / "n", res)
    loaded = gq.load_quantized(tmp_path / "n")
    _same(loaded["conv"], res.variables["conv"])
    _same(loaded["head"], res.variables["head"])
    key = loaded["drop"]["rngs"]["key"]
    assert jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(key), jax.random.key_data(res.variables["drop"]["rngs"]["key"])
    )
    qnet = gq.load_quantized(tmp_path / "n", model=res.model)
    np.testing.assert_array_equal(qnet.conv.kernel[...], res.model.conv.kernel[...])
    np.testing.assert_array_equal(qnet(x), res.model(x))
    rep = gq.size_report(tmp_path / "n", net)
    assert rep["codes_bytes"] == (3 * 3 * 3 * 8 * 3 + 7) // 8 + (8 * 4 * 3 + 7) // 8
    assert rep["float_disk_bytes"] is None and rep["quantized_disk_bytes"] > 0


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gpfq_jax quantized checkpoint"):
        gq.load_quantized(tmp_path)
    (tmp_path / export.META).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        gq.load_quantized(tmp_path)
