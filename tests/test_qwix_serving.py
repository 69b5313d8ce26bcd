"""Serving through Qwix (``to_qwix`` / ``load_qwix``): our codes and steps as Qwix QArrays.

These tests pin Qwix 0.1.8's layout: if a Qwix release changes how a PTQ weight is held
(scale rank and tiling, zero point dtype, the ``WithAux`` wrapper, how Dense / DenseGeneral /
Einsum kernels are consumed), the equality of outputs or the layout comparison against Qwix's
own abstract PTQ params fails here.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gpfq_jax as gq

qwix = pytest.importorskip("qwix")
from qwix._src.providers.ptq import WithAux  # noqa: E402

# Qwix 0.1.8 uses Flax 0.12 APIs that warn of deprecation (VariableState, iter_modules).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

X_MLP = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
X_ATT = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 64))
SPECS = {
    "4pc": gq.QuantSpec(bits=4),
    "4g32": gq.QuantSpec(bits=4, group_size=32),
    "8pc": gq.QuantSpec(bits=8),
    "8g32": gq.QuantSpec(bits=8, group_size=32),
    "8g8asym": gq.QuantSpec(bits=8, grid="asym", group_size=8),
    "4asym": gq.QuantSpec(bits=4, grid="asym", group_size=32),
    "4full": gq.QuantSpec(bits=4, grid="int_full", group_size=32),
    "4ls": gq.QuantSpec(bits=4, grid="ls"),
    "3zzs": gq.QuantSpec(bits=3, grid="zzs"),
    "ternary": gq.QuantSpec(bits="ternary", grid="int"),
    "8zzs": gq.QuantSpec(bits=8, grid="zzs"),
    "8ls": gq.QuantSpec(bits=8, grid="ls"),
    "4g24": gq.QuantSpec(bits=4, group_size=24),
}


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # (b, 64)
        return nn.Dense(10, name="fc2")(nn.relu(nn.Dense(64, name="fc1")(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


class Attention(nn.Module):
    """Flax attention (q/k/v DenseGeneral (64, 4, 16), out (4, 16, 64): two contracted axes)
    and an Einsum with a batch letter h (kernel (4, 16, 16))."""

    @nn.compact
    def __call__(self, x):  # (b, t, 64)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=64, name="attn")(x, x)
        y = nn.Einsum((4, 16, 16), "bthe,hed->bthd", name="ein")(x.reshape(*x.shape[:2], 4, 16))
        return y.reshape(x.shape)


@functools.cache
def _linen(model_name: str, spec_key: str):
    model, x = (LinenMLP(), X_MLP) if model_name == "mlp" else (Attention(), X_ATT)
    v = model.init(jax.random.PRNGKey(2), x)
    return model, gq.quantize_params(model, v, x, spec=SPECS[spec_key], method="rtn",
                                     progress=False)  # fmt: skip


@functools.cache
def _nnx(spec_key: str):
    model = NnxMLP(nnx.Rngs(3))
    return model, gq.quantize_params(model, None, X_MLP, spec=SPECS[spec_key], method="rtn",
                                     progress=False)  # fmt: skip


def _served(tree) -> list:
    return [leaf for leaf in jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, WithAux))
            if isinstance(leaf, WithAux)]  # fmt: skip


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _bytes(leaves) -> tuple[int, int, int]:
    """(float32 kernel bytes, served bytes as held in memory, served bytes at the codes' bits),
    scales and zero points included."""
    fp = held = packed = 0
    for w in leaves:
        q = w.array
        bits = jnp.iinfo(q.qvalue.dtype).bits
        extra = [a for a in (q.scale, q.zero_point) if a is not None]
        fp += q.qvalue.size * 4
        held += q.qvalue.nbytes + sum(a.nbytes for a in extra)
        packed += -(-q.qvalue.size * bits // 8) + sum(a.nbytes for a in extra)
    return fp, held, packed


# ----------------------------------------------------------------------------- Linen, NNX


@pytest.mark.parametrize("key", ["4pc", "4g32", "8pc", "8g32"])
def test_linen_mlp_served_equals_dequantized(key):
    model, res = _linen("mlp", key)
    qmodel, qvars = gq.to_qwix(res, model)
    _close(qmodel.apply(qvars, X_MLP), model.apply(res.variables, X_MLP))
    leaves = _served(qvars)
    bits = SPECS[key].bits
    assert len(leaves) == 2
    assert all(w.array.qvalue.dtype == (jnp.int4 if bits == 4 else jnp.int8) for w in leaves)
    for w, r in zip(leaves, res.layers):  # the values are ours: qvalue * scale == codes * step
        np.testing.assert_array_equal(np.asarray(qwix.dequantize(w.array)), np.asarray(r.result.q))
    fp, held, packed = _bytes(leaves)
    if bits == 4:  # in memory on CPU an int4 takes a byte; at 4 bits it is 0.16x
        assert held <= 0.3 * fp and packed <= 0.17 * fp, (held / fp, packed / fp)
    # Qwix's forward pass really consumes the QArrays: doubling a scale changes the output.
    w = qvars["params"]["fc2"]["kernel"]
    qvars["params"]["fc2"]["kernel"] = w.replace(array=w.array.replace(scale=2 * w.array.scale))
    assert not np.allclose(qmodel.apply(qvars, X_MLP), model.apply(res.variables, X_MLP))


@pytest.mark.parametrize("key", ["4g32", "8pc"])
def test_nnx_mlp_served_equals_dequantized(key):
    _, res = _nnx(key)
    qmodel, qvars = gq.to_qwix(res)
    assert qvars is None
    _close(qmodel(X_MLP), res.model(X_MLP))
    _close(nnx.jit(lambda m, x: m(x))(qmodel, X_MLP), res.model(X_MLP))
    leaves = [qmodel.fc1.kernel, qmodel.fc2.kernel]
    assert all(isinstance(w, WithAux) for w in leaves)
    want = jnp.int4 if SPECS[key].bits == 4 else jnp.int8
    assert all(w.array.qvalue.get_value().dtype == want for w in leaves)


# ----------------------------------------------------------------------------- general layers


@pytest.mark.parametrize("key", ["4pc", "4g32", "8g8asym"])
def test_attention_layers_served_in_qwix_own_layout(key):
    """q/k/v and out (DenseGeneral) and an Einsum: outputs equal, and every QArray has the
    layout Qwix's own PTQ would give that layer under our rules (from its abstract params)."""
    model, res = _linen("attn", key)
    qmodel, qvars = gq.to_qwix(res, model)
    _close(qmodel.apply(qvars, X_ATT), model.apply(res.variables, X_ATT))
    abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), X_ATT)["params"]
    assert len(res.layers) == 5
    for r in res.layers:
        ours, theirs = qvars["params"], abstract
        for k in (*r.path, "kernel"):
            ours, theirs = ours[k], theirs[k]
        assert isinstance(theirs, WithAux), r.name
        assert ours.how == theirs.how, (r.name, ours.how, theirs.how)
        for field in ("qvalue", "scale", "zero_point"):
            a, b = getattr(ours.array, field), getattr(theirs.array, field)
            assert (a is None) == (b is None), (r.name, field)
            if a is not None:
                assert (a.shape, a.dtype) == (b.shape, b.dtype), (r.name, field, a, b)
    if key == "4g32":  # out: groups of 32 inputs over (heads 4, head_dim 16) -> tiles (2, 16)
        assert qvars["params"]["attn"]["out"]["kernel"].array.scale.shape == (2, 1, 64)
        fp, held, packed = _bytes(_served(qvars))
        assert held <= 0.3 * fp and packed <= 0.2 * fp, (held / fp, packed / fp)


@pytest.mark.parametrize("key", ["4asym", "4full", "4ls", "3zzs", "ternary"])
def test_other_grids_served_exactly(key):
    """asym (zero points), int_full, ls (odd codes at half the step), zzs and ternary."""
    model, res = _linen("mlp", key)
    qmodel, qvars = gq.to_qwix(res, model)
    _close(qmodel.apply(qvars, X_MLP), model.apply(res.variables, X_MLP))
    for w, r in zip(_served(qvars), res.layers):
        np.testing.assert_array_equal(np.asarray(qwix.dequantize(w.array)), np.asarray(r.result.q))
        assert w.array.qvalue.dtype == (jnp.int8 if key == "4ls" else jnp.int4)
        assert (w.array.zero_point is not None) == (key == "4asym")


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_path_gives_the_same_outputs(tmp_path):
    model, res = _linen("mlp", "4g32")
    gq.save_quantized(tmp_path / "lin", res)
    qmodel, qvars = gq.load_qwix(tmp_path / "lin", model)
    _close(qmodel.apply(qvars, X_MLP), model.apply(res.variables, X_MLP))
    assert all(w.array.qvalue.dtype == jnp.int4 for w in _served(qvars))
    from_res = gq.to_qwix(res, model)[1]
    assert jax.tree.structure(qvars) == jax.tree.structure(from_res)  # same leaves, same how
    assert _bytes(_served(qvars)) == _bytes(_served(from_res))
    model, res = _linen("mlp", "4asym")
    gq.save_quantized(tmp_path / "asym", res)
    qmodel, qvars = gq.load_qwix(tmp_path / "asym", model)
    _close(qmodel.apply(qvars, X_MLP), model.apply(res.variables, X_MLP))
    nnx_model, res = _nnx("8pc")
    gq.save_quantized(tmp_path / "nnx", res)
    qmodel, qvars = gq.load_qwix(tmp_path / "nnx", nnx_model)
    assert qvars is None and qmodel.fc1.kernel.array.qvalue.get_value().dtype == jnp.int8
    _close(qmodel(X_MLP), res.model(X_MLP))
    assert not isinstance(nnx_model.fc1.kernel, WithAux)  # the float model is not modified
    assert not isinstance(res.model.fc1.kernel, WithAux)
    with pytest.raises(TypeError, match="nnx checkpoint"):
        gq.load_qwix(tmp_path / "nnx", model)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("key", "match"),
    [("8zzs", r"'fc1' \(grid 'zzs', 8 bits\).*more than 8 bits"),
     ("8ls", r"'fc1' \(grid 'ls', 8 bits\).*more than 8 bits"),
     ("4g24", r"'fc1' \(grid 'int', 4 bits\).*group_size 24 does not tile")],
)  # fmt: skip
def test_what_qwix_cannot_hold_is_a_clear_error(key, match):
    model, res = _linen("mlp", key)
    with pytest.raises(ValueError, match=match):
        gq.to_qwix(res, model)


def test_conv_and_missing_model_are_clear_errors():
    class Cnn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.PRNGKey(4), (8, 5, 5, 2))
    m = Cnn()
    res = gq.quantize_params(m, m.init(jax.random.PRNGKey(5), x), x, method="rtn", progress=False)
    with pytest.raises(ValueError, match=r"'Conv_0'.*'conv' layer cannot be served"):
        gq.to_qwix(res, m)
    with pytest.raises(TypeError, match="needs the Linen model"):
        gq.to_qwix(res)


def test_qwix_is_optional_and_not_imported_by_gpfq_jax(monkeypatch):
    code = "import gpfq_jax, sys; gpfq_jax.to_qwix; assert 'qwix' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    model, res = _linen("mlp", "4pc")
    monkeypatch.setitem(sys.modules, "qwix", None)
    with pytest.raises(ImportError, match=r'pip install "gpfq_jax\[experiments\]"'):
        gq.to_qwix(res, model)
