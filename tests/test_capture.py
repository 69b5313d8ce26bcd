"""Tests for gpfq_jax.flax.capture: layer discovery and input capture (Linen and NNX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from gpfq_jax.flax.capture import get_kernel, make_input_capturer, set_kernel
from gpfq_jax.flax.tracing import LayerInfo, discover_layers

TRACES = {"n": 0}
NHWC = ("NHWC", "HWIO", "NHWC")


def conv_ref(x, kernel, info: LayerInfo, bias=None):
    """Convolution from the normalized LayerInfo fields."""
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        info.geometry.strides,
        info.geometry.padding,
        lhs_dilation=info.geometry.input_dilation,
        rhs_dilation=info.geometry.kernel_dilation,
        dimension_numbers=NHWC,
        feature_group_count=info.feature_group_count,
    )
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- Linen models


class MLP(nn.Module):
    widths: tuple[int, ...] = (8, 6, 3)

    @nn.compact
    def __call__(self, x):
        TRACES["n"] += 1
        for i, w in enumerate(self.widths):
            x = nn.Dense(w)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(6, (3, 3), strides=2, use_bias=False)(x)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


class Residual(nn.Module):
    def setup(self):
        self.conv1 = nn.Conv(4, (3, 3))
        self.conv2 = nn.Conv(4, (3, 3))
        self.proj = nn.Conv(4, (1, 1), use_bias=False)

    def __call__(self, x):
        skip = self.proj(x)  # called first: discovery follows calls, not definitions
        h = self.conv2(nn.relu(self.conv1(x)))
        return nn.relu(h + skip)


class ConvZoo(nn.Module):
    """A linear chain of convs with assorted geometry."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), strides=2, padding="SAME", name="strided")(x)
        x = nn.Conv(6, (3, 3), feature_group_count=6, name="depthwise")(x)
        x = nn.Conv(4, (3, 3), kernel_dilation=2, name="dilated")(x)
        x = nn.Conv(4, (2, 2), padding=((1, 0), (0, 1)), name="explicit")(x)
        return nn.Conv(2, (3, 3), padding="VALID", name="valid")(x)


def init(model, x, **kw):
    return model.init(jax.random.key(0), x, **kw)


# ----------------------------------------------------------------------------- Linen tests


def test_mlp_discovery_and_capture_by_hand():
    model, x = MLP(), jax.random.normal(jax.random.key(1), (4, 5))
    v = init(model, x)
    layers = discover_layers(model, v, x)
    assert [lay.path for lay in layers] == [("Dense_0",), ("Dense_1",), ("Dense_2",)]
    assert [lay.kind for lay in layers] == ["dense"] * 3
    assert [lay.kernel_shape for lay in layers] == [(5, 8), (8, 6), (6, 3)]
    assert layers[1].input_shape == (4, 8) and layers[1].has_bias
    assert layers[1].name == "Dense_1" and layers[1].call_index == 1
    assert layers[0].geometry is None

    p = v["params"]
    f = make_input_capturer(model, v, layers[1])
    want = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    np.testing.assert_allclose(f(v, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(make_input_capturer(model, v, layers[0])(v, x), x)


def test_new_variables_change_capture_without_retrace():
    model, x = MLP(), jax.random.normal(jax.random.key(1), (4, 5))
    v = init(model, x)
    layers = discover_layers(model, v, x)
    f = make_input_capturer(model, v, layers[1])
    TRACES["n"] = 0
    a = f(v, x)
    w0 = get_kernel(v, layers[0])
    v2 = set_kernel(v, layers[0], jnp.round(w0 * 4) / 4)
    b = f(v2, x)
    assert TRACES["n"] == 1  # one trace for both variable trees
    np.testing.assert_array_equal(get_kernel(v, layers[0]), w0)  # original untouched
    b0 = v["params"]["Dense_0"]["bias"]
    np.testing.assert_allclose(b, jax.nn.relu(x @ (jnp.round(w0 * 4) / 4) + b0), atol=1e-5)
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="shape"):
        set_kernel(v, layers[0], jnp.zeros((2, 2)))


def test_cnn_with_batchnorm_eval_mode():
    model, x = CNN(), jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    v = init(model, x, train=False)
    stats = v["batch_stats"]["BatchNorm_0"]
    v = {
        "params": v["params"],
        "batch_stats": {"BatchNorm_0": {"mean": stats["mean"] + 0.3, "var": stats["var"] * 2.0}},
    }
    layers = discover_layers(model, v, x, train=False, mutable=False)
    assert [(lay.name, lay.kind) for lay in layers] == [
        ("Conv_0", "conv"),
        ("Conv_1", "conv"),
        ("Dense_0", "dense"),
    ]
    c0, c1 = layers[0], layers[1]
    assert c0.kernel_shape == (3, 3, 3, 4) and c0.geometry.padding == ((1, 1), (1, 1))
    assert (
        c1.geometry.strides == (2, 2)
        and c1.geometry.padding == ((0, 1), (0, 1))
        and not c1.has_bias
    )
    assert c1.input_shape == (2, 8, 8, 4)

    p, bn = v["params"], v["batch_stats"]["BatchNorm_0"]
    h = conv_ref(x, p["Conv_0"]["kernel"], c0, p["Conv_0"]["bias"])
    h = (h - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-5) * p["BatchNorm_0"]["scale"]
    want = jax.nn.relu(h + p["BatchNorm_0"]["bias"])
    got = make_input_capturer(model, v, c1, train=False, mutable=False)(v, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_residual_call_order_and_skip_input():
    model, x = Residual(), jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    v = init(model, x)
    layers = discover_layers(model, v, x)
    assert [lay.name for lay in layers] == ["proj", "conv1", "conv2"]
    assert layers[0].kernel_shape == (1, 1, 3, 4) and layers[0].geometry.padding == ((0, 0), (0, 0))
    p = v["params"]
    got_proj = make_input_capturer(model, v, layers[0])(v, x)
    np.testing.assert_allclose(got_proj, x)
    got = make_input_capturer(model, v, layers[2])(v, x)
    want = jax.nn.relu(conv_ref(x, p["conv1"]["kernel"], layers[1], p["conv1"]["bias"]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_geometry_reproduces_each_layer():
    model, x = ConvZoo(), jax.random.normal(jax.random.key(4), (2, 9, 9, 3))
    v = init(model, x)
    layers = discover_layers(model, v, x)
    by = {lay.name: lay for lay in layers}
    assert [lay.name for lay in layers] == ["strided", "depthwise", "dilated", "explicit", "valid"]
    assert by["strided"].geometry.padding == ((1, 1), (1, 1)) and by[
        "strided"
    ].geometry.strides == (2, 2)
    assert by["depthwise"].feature_group_count == 6
    assert by["depthwise"].kernel_shape == (3, 3, 1, 6)
    assert by["dilated"].geometry.kernel_dilation == (2, 2) and by["dilated"].geometry.padding == (
        (2, 2),
        (2, 2),
    )
    assert by["explicit"].geometry.padding == ((1, 0), (0, 1))
    assert by["valid"].geometry.padding == ((0, 0), (0, 0))

    ins = [make_input_capturer(model, v, lay)(v, x) for lay in layers]
    outs = ins[1:] + [model.apply(v, x)]
    for lay, xin, xout in zip(layers, ins, outs):
        assert xin.shape == lay.input_shape
        p = v["params"][lay.name]
        y = conv_ref(xin, p["kernel"], lay, p["bias"])
        np.testing.assert_allclose(y, xout, rtol=1e-5, atol=1e-5, err_msg=lay.name)


def test_capture_prunes_the_rest_of_the_network():
    model = MLP(widths=(256,) * 6 + (10,))
    x = jnp.ones((32, 256))
    v = init(model, x)
    layers = discover_layers(model, v, x)

    def flops(fn, *args):
        cost = fn.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return cost["flops"]

    early = flops(make_input_capturer(model, v, layers[1]), v, x)
    full = flops(jax.jit(model.apply), v, x)
    assert early < full / 4


class Shared(nn.Module):
    def setup(self):
        self.dense = nn.Dense(4)

    def __call__(self, x):
        return self.dense(nn.relu(self.dense(x)))


class WithConvTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(2, (3, 3), name="up")(x)


class Circular(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (3, 3), padding="CIRCULAR", name="circ")(x)


class RematBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.remat(nn.Dense)(4, name="inner")(x)
        return nn.Dense(2)(x)


@pytest.mark.parametrize(
    "model,shape,err,match",
    [
        (Shared(), (2, 4), ValueError, "shared layer 'dense' called 2 times"),
        (WithConvTranspose(), (1, 4, 4, 2), NotImplementedError, "'up' \\(ConvTranspose\\)"),
        (Circular(), (1, 4, 4, 2), NotImplementedError, "'circ'.*CIRCULAR"),
        (RematBlock(), (2, 3), NotImplementedError, "'inner'.*lifted"),
    ],
)
def test_linen_errors(model, shape, err, match):
    x = jnp.ones(shape)
    v = init(model, x)
    with pytest.raises(err, match=match):
        discover_layers(model, v, x)


# ----------------------------------------------------------------------------- NNX models


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])

    def __call__(self, x):
        TRACES["n"] += 1
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


class NnxResidual(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)
        self.proj = nnx.Conv(3, 4, (1, 1), strides=2, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        h = self.conv2(jax.nn.relu(self.bn(self.conv1(x))))
        h = jax.nn.relu(h + self.proj(x))
        return self.head(h.mean(axis=(1, 2)))


def nnx_snapshot(model):
    graphdef, state = nnx.split(model)
    return graphdef, [np.asarray(a) for a in jax.tree.leaves(state)]


def assert_untouched(model, snap):
    graphdef, leaves = nnx_snapshot(model)
    assert graphdef == snap[0]
    for a, b in zip(leaves, snap[1], strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- NNX tests


def test_nnx_mlp_discovery_capture_and_no_retrace():
    model, x = NnxMLP(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (4, 5))
    snap = nnx_snapshot(model)
    layers = discover_layers(model, None, x)
    assert [lay.path for lay in layers] == [("layers", 0), ("layers", 1)]
    assert [lay.name for lay in layers] == ["layers/0", "layers/1"]
    assert layers[1].kernel_shape == (8, 3) and layers[1].input_shape == (4, 8)

    f = make_input_capturer(model, None, layers[1])
    TRACES["n"] = 0
    w0, b0 = model.layers[0].kernel[...], model.layers[0].bias[...]
    np.testing.assert_allclose(f(nnx.state(model), x), jax.nn.relu(x @ w0 + b0), atol=1e-6)
    q_model = set_kernel(model, layers[0], w0 * 2)
    q_state = set_kernel(nnx.state(model), layers[0], w0 * 3)
    want2 = jax.nn.relu(x @ (w0 * 2) + b0)
    np.testing.assert_allclose(f(q_model, x), want2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f(q_state, x), jax.nn.relu(x @ (w0 * 3) + b0), atol=1e-5)
    assert TRACES["n"] == 1
    np.testing.assert_array_equal(get_kernel(q_model, layers[0]), w0 * 2)
    np.testing.assert_array_equal(get_kernel(q_state, layers[0]), w0 * 3)
    assert type(model.layers[1]) is nnx.Linear
    assert_untouched(model, snap)


def test_nnx_residual_with_batchnorm():
    model = NnxResidual(nnx.Rngs(0))
    model.bn.mean[...] = jnp.full((4,), 0.2)
    model.bn.var[...] = jnp.full((4,), 1.5)
    model.eval()
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    snap = nnx_snapshot(model)
    layers = discover_layers(model, None, x)
    assert [lay.name for lay in layers] == ["conv1", "conv2", "proj", "head"]
    assert [lay.kind for lay in layers] == ["conv", "conv", "conv", "dense"]
    conv1, conv2, proj = layers[:3]
    assert conv2.geometry.strides == (2, 2) and conv2.geometry.padding == ((0, 1), (0, 1))
    assert proj.geometry.padding == ((0, 0), (0, 0)) and not proj.has_bias

    h = conv_ref(x, model.conv1.kernel[...], conv1, model.conv1.bias[...])
    h = (h - 0.2) / jnp.sqrt(1.5 + 1e-5) * model.bn.scale[...] + model.bn.bias[...]
    got = make_input_capturer(model, None, conv2)(nnx.state(model), x)
    np.testing.assert_allclose(got, jax.nn.relu(h), rtol=1e-4, atol=1e-5)
    f_proj = make_input_capturer(model, None, proj)
    np.testing.assert_allclose(f_proj(model, x), x)
    other = nnx.clone(model)
    other.train()  # static attributes differ -> different graph
    with pytest.raises(ValueError, match="graph"):
        f_proj(other, x)
    assert type(model.conv2) is nnx.Conv
    assert_untouched(model, snap)


class NnxShared(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.dense(x))


class NnxConvTranspose(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.ConvTranspose(1, 2, (3,), rngs=rngs)])

    def __call__(self, x):
        return self.blocks[0](x[..., None])


class NnxRemat(nnx.Module):
    def __init__(self, rngs):
        self.inner = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda m, y: m(y))(self.inner, x)


@pytest.mark.parametrize(
    "cls,err,match",
    [
        (NnxShared, ValueError, "shared layer 'dense' called 2 times"),
        (NnxConvTranspose, NotImplementedError, "'blocks/0' \\(ConvTranspose\\)"),
        (NnxRemat, NotImplementedError, "'inner'.*lifted"),
    ],
)
def test_nnx_errors(cls, err, match):
    model = cls(nnx.Rngs(0))
    snap = nnx_snapshot(model)
    with pytest.raises(err, match=match):
        discover_layers(model, None, jnp.ones((2, 4)))
    assert_untouched(model, snap)


def test_nnx_rejects_variables_and_warns_in_train_mode():
    model = NnxResidual(nnx.Rngs(0))
    x = jnp.ones((1, 4, 4, 3))
    with pytest.raises(TypeError, match="variables=None"):
        discover_layers(model, nnx.state(model), x)
    with pytest.warns(UserWarning, match="training"):
        discover_layers(model, None, x)
