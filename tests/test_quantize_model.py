"""Tests for the whole-model driver (gpfq_jax.quantize_params), rules and BatchNorm folding.

Exactness tests recompute every layer's float and partially quantized inputs BY HAND (plain
jnp / lax code, not the driver's capture) and compare codes with the one-layer API. They run
in float64 (``x64`` fixture, ``stats_dtype=float64``) so that different but equivalent
computation paths give identical codes.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gpfq_jax as gq
from gpfq_jax.core import ConvGeometry, accumulate, conv_rows, init_stats
from gpfq_jax.core.alphabets import dequantize
from gpfq_jax.flax.bn_fold import fold_linen, fold_nnx
from gpfq_jax.flax.rules import plan_layers
from gpfq_jax.flax.tracing import trace_model

NHWC = ("NHWC", "HWIO", "NHWC")
SPEC = gq.QuantSpec(bits=3)


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def run(model, variables, calib, **kw):
    kw.setdefault("progress", False)
    return gq.quantize_params(model, variables, calib, **kw)


# ----------------------------------------------------------------------------- models


class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x)


class MLP3(nn.Module):
    widths: tuple[int, ...] = (12, 10, 4)

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
                x = nn.Dropout(0.5, deterministic=not train)(x)
        return x


class NNXMLP3(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, widths=(8, 12, 10, 4)):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.relu(x)
        return x


class ResCNN(nn.Module):
    """conv0 -> BN -> relu -> residual block (conv1, conv2) -> strided conv3 -> pool -> fc."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv0")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(x))
        h = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = x + nn.Conv(4, (3, 3), use_bias=False, name="conv2")(h)
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv3")(x))
        x = nn.avg_pool(x, (3, 3), strides=(3, 3))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def _random_bn(variables, name, key, n):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    p, s = dict(variables["params"]), dict(variables["batch_stats"])
    p[name] = {"scale": 1 + 0.3 * jax.random.normal(k1, (n,)), "bias": jax.random.normal(k2, (n,))}
    s[name] = {"mean": jax.random.normal(k3, (n,)), "var": jax.random.uniform(k4, (n,)) + 0.5}
    return {"params": p, "batch_stats": s}


# ----------------------------------------------------------------------------- exactness


def test_one_dense_equals_quantize_layer():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    model = OneDense()
    v = model.init(jax.random.PRNGKey(1), x)
    res = run(model, v, x, spec=SPEC)
    ref = gq.quantize_layer(v["params"]["Dense_0"]["kernel"], x, spec=SPEC)
    rec = res.layers[0]
    np.testing.assert_array_equal(rec.codes, ref.codes)
    np.testing.assert_array_equal(rec.scale, ref.scale)
    np.testing.assert_array_equal(res.variables["params"]["Dense_0"]["kernel"], ref.q)
    assert rec.rel_error == pytest.approx(ref.rel_error, rel=1e-6)
    assert (rec.name, rec.kind, rec.shape, rec.rows) == ("Dense_0", "dense", (8, 5), 64)
    np.testing.assert_array_equal(
        res.variables["params"]["Dense_0"]["bias"], v["params"]["Dense_0"]["bias"]
    )


def test_mlp_partially_quantized_inputs_by_hand(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (96, 8), jnp.float64)
    model = MLP3()
    v = f64(model.init(jax.random.PRNGKey(1), x))
    res = run(model, v, x, spec=SPEC, batch_size=32, stats_dtype=jnp.float64)  # 3 batches
    p, names = v["params"], ["Dense_0", "Dense_1", "Dense_2"]
    xf = xq = x
    for i, name in enumerate(names):
        w, b = p[name]["kernel"], p[name]["bias"]
        ref = gq.quantize_layer(w, xf, xq, spec=SPEC)
        rec = res[name]
        np.testing.assert_array_equal(rec.codes, ref.codes)
        q = res.variables["params"][name]["kernel"]
        np.testing.assert_array_equal(q, dequantize(ref.codes, ref.scale, ref.offset, w.dtype))
        if i < 2:
            xf, xq = jax.nn.relu(xf @ w + b), jax.nn.relu(xq @ q + b)
    assert [r.name for r in res.layers] == names


def _conv(x, k, strides=(1, 1), padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)


def _cnn_inputs(p, s, x, eps=1e-5):
    """Inputs of conv0, conv1, conv2, conv3, fc of ResCNN for params p / batch stats s."""
    ins = [x]
    y = _conv(x, p["conv0"]["kernel"]) + p["conv0"]["bias"]
    bn, st = p["bn0"], s["bn0"]
    y = jax.nn.relu((y - st["mean"]) / jnp.sqrt(st["var"] + eps) * bn["scale"] + bn["bias"])
    ins.append(y)
    h = jax.nn.relu(_conv(y, p["conv1"]["kernel"]) + p["conv1"]["bias"])
    ins.append(h)
    y = y + _conv(h, p["conv2"]["kernel"])
    ins.append(y)
    y = jax.nn.relu(_conv(y, p["conv3"]["kernel"], (2, 2), ((0, 0), (0, 0))) + p["conv3"]["bias"])
    y = y.reshape(y.shape[0], 1, 3, 1, 3, 4).mean(axis=(2, 4)).reshape(y.shape[0], -1)
    ins.append(y)
    return ins


@pytest.mark.slow  # > 10 s on 2 CPU cores
def test_cnn_with_bn_and_residual_by_hand(x64):
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 8, 8, 3), jnp.float64)
    model = ResCNN()
    v = f64(_random_bn(model.init(jax.random.PRNGKey(1), x), "bn0", jax.random.PRNGKey(2), 4))
    res = run(model, v, x, spec=SPEC, batch_size=4, stats_dtype=jnp.float64)
    names = ["conv0", "conv1", "conv2", "conv3", "fc"]
    assert [r.name for r in res.layers] == names
    assert [r.kind for r in res.layers] == ["conv"] * 4 + ["dense"]
    p, s = v["params"], v["batch_stats"]
    qp = {k: dict(val) for k, val in p.items()}
    for i, name in enumerate(names):
        xf = _cnn_inputs(p, s, x)[i]
        xq = _cnn_inputs(qp, s, x)[i]  # layers < i already quantized in qp
        w = p[name]["kernel"]
        if name == "fc":
            ref = gq.quantize_layer(w, xf, xq, spec=SPEC)
        else:
            geo = ConvGeometry.create(
                w.shape,
                strides=2 if name == "conv3" else 1,
                padding="VALID" if name == "conv3" else "SAME",
                input_shape=xf.shape,
            )
            stats = accumulate(
                init_stats(int(np.prod(w.shape[:-1])), 1, jnp.float64),
                conv_rows(xf, geo),
                conv_rows(xq, geo),
            )
            ref = gq.quantize_from_stats(w, stats, SPEC)
        np.testing.assert_array_equal(res[name].codes, ref.codes, err_msg=name)
        qp[name]["kernel"] = res.variables["params"][name]["kernel"]
    assert res.layers[0].rows == 10 * 64 and res.layers[3].rows == 10 * 9
    # BatchNorm statistics and biases pass through unchanged
    np.testing.assert_array_equal(res.variables["batch_stats"]["bn0"]["var"], s["bn0"]["var"])


def test_nnx_and_linen_twin_give_same_codes():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    net = NNXMLP3(nnx.Rngs(3))
    lin = MLP3()
    params = {
        f"Dense_{i}": {"kernel": layer.kernel[...], "bias": layer.bias[...]}
        for i, layer in enumerate(net.layers)
    }
    before = [layer.kernel[...] for layer in net.layers]
    r_lin = run(lin, {"params": params}, x, spec=SPEC)
    r_nnx = run(net, None, x, spec=SPEC)
    assert [r.name for r in r_nnx.layers] == ["layers/0", "layers/1", "layers/2"]
    for a, b in zip(r_lin.layers, r_nnx.layers):
        np.testing.assert_array_equal(a.codes, b.codes)
    for layer, k in zip(net.layers, before):  # the user's model is untouched
        np.testing.assert_array_equal(layer.kernel[...], k)
    for i, layer in enumerate(r_nnx.model.layers):
        np.testing.assert_array_equal(
            layer.kernel[...], r_lin.variables["params"][f"Dense_{i}"]["kernel"]
        )
    np.testing.assert_array_equal(
        r_nnx.variables["layers"][1]["kernel"], r_nnx.model.layers[1].kernel[...]
    )
    np.testing.assert_allclose(r_nnx.model(x), lin.apply(r_lin.variables, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- rules


def test_rules_skip_and_respec_only_their_layers():
    x = jax.random.normal(jax.random.PRNGKey(0), (48, 8))
    model = MLP3()
    v = model.init(jax.random.PRNGKey(1), x)
    rules = [gq.Rule("_0$", skip=True), ("Dense_2", False, {"bits": 8}, "rtn")]
    res = run(model, v, x, spec=SPEC, rules=rules)
    assert res.skipped == ["Dense_0"] and [r.name for r in res.layers] == ["Dense_1", "Dense_2"]
    np.testing.assert_array_equal(
        res.variables["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"]
    )
    assert (res["Dense_1"].spec, res["Dense_1"].method) == (SPEC, "gpfq")
    assert (res["Dense_2"].spec.bits, res["Dense_2"].method, res["Dense_2"].levels) == (
        8,
        "rtn",
        255,
    )
    assert res["Dense_2"].spec.grid == SPEC.grid
    # the first layer stays float, so the second layer's quantized input equals its float input
    xin = jax.nn.relu(x @ v["params"]["Dense_0"]["kernel"] + v["params"]["Dense_0"]["bias"])
    ref = gq.quantize_layer(v["params"]["Dense_1"]["kernel"], xin, spec=SPEC)
    np.testing.assert_array_equal(res["Dense_1"].codes, ref.codes)
    table = str(res.summary())
    assert "Dense_2" in table and "rtn" in table and "Dense_0" not in table


def test_rule_forms_and_first_match_wins():
    names = ["a/conv", "a/dense", "b/dense"]
    plans = plan_layers(
        names, [{"pattern": "dense", "bits": 8}, gq.Rule("b/", skip=True)], SPEC, "gpfq"
    )
    assert [(p.skip, p.spec.bits) for p in plans] == [(False, 3), (False, 8), (False, 8)]
    with pytest.raises(ValueError, match="invalid regex|not a valid regex"):
        gq.Rule("(")
    with pytest.raises(ValueError, match="unknown method"):
        gq.Rule("a", method="magic")


def test_unmatched_rule_raises_naming_pattern_and_layers():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
    model = MLP3()
    v = model.init(jax.random.PRNGKey(1), x)
    with pytest.raises(ValueError, match=r"'conv_7'.*matches no layer.*Dense_0, Dense_1, Dense_2"):
        run(model, v, x, rules=[gq.Rule("conv_7", skip=True)])


# ----------------------------------------------------------------------------- BN folding


class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            nn.BatchNorm(use_running_average=not train, name="bn0")(
                nn.Conv(4, (3, 3), name="conv0")(x)
            )
        )
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, name="bn1")(
            nn.Conv(5, (3, 3), use_bias=False, name="conv1")(x)
        )
        x = x.mean(axis=(1, 2))
        return nn.BatchNorm(use_running_average=not train, name="bn2")(nn.Dense(3, name="fc")(x))


def _convbn_variables(x):
    model = ConvBN()
    v = model.init(jax.random.PRNGKey(1), x)
    v = _random_bn(v, "bn0", jax.random.PRNGKey(2), 4)
    v = _random_bn(v, "bn2", jax.random.PRNGKey(3), 3)
    s = dict(v["batch_stats"])
    s["bn1"] = {
        "mean": jax.random.normal(jax.random.PRNGKey(4), (5,)),
        "var": jax.random.uniform(jax.random.PRNGKey(5), (5,)) + 0.5,
    }
    p = dict(v["params"])
    p["bn1"] = {"bias": jax.random.normal(jax.random.PRNGKey(6), (5,))}
    return model, {"params": p, "batch_stats": s}


def test_bn_folding_keeps_float_outputs():
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 3))
    model, v = _convbn_variables(x)
    pairs = trace_model(model, v, x, train=False).bn_follows
    assert [(p.path, p.bn_path, p.foldable) for p in pairs] == [
        (("conv0",), ("bn0",), True),
        (("conv1",), ("bn1",), True),
        (("fc",), ("bn2",), True),
    ]
    folded = fold_linen(v, pairs)
    y0, y1 = model.apply(v, x), model.apply(folded, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * float(jnp.abs(y0).max()))
    bn0 = folded["batch_stats"]["bn0"]
    assert float(jnp.abs(bn0["mean"]).max()) == 0.0
    np.testing.assert_array_equal(bn0["var"] + 1e-5, jnp.ones(4))
    np.testing.assert_array_equal(folded["params"]["bn0"]["scale"], jnp.ones(4))
    assert "bias" not in folded["params"]["conv1"]  # no bias created: the BN keeps the shift
    # a train-mode BN is not foldable
    pairs_train = trace_model(model, v, x, train=True, mutable=["batch_stats"]).bn_follows
    assert not any(p.foldable for p in pairs_train)
    # through the driver: folded pairs reported, quantized model still drop-in
    res = run(model, v, x, spec=gq.QuantSpec(bits=8), method="rtn", fold_batchnorm=True)
    assert res.folded == [("conv0", "bn0"), ("conv1", "bn1"), ("fc", "bn2")]
    np.testing.assert_allclose(
        model.apply(res.variables, x), y0, rtol=0.05, atol=0.05 * float(jnp.abs(y0).max())
    )


def test_bn_folding_nnx_keeps_outputs_and_user_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x)).mean(axis=(1, 2))

    net = Net(nnx.Rngs(0))
    net.bn.mean.set_value(jax.random.normal(jax.random.PRNGKey(1), (4,)))
    net.bn.var.set_value(jax.random.uniform(jax.random.PRNGKey(2), (4,)) + 0.5)
    net.bn.scale.set_value(1 + jax.random.normal(jax.random.PRNGKey(3), (4,)))
    net.eval()
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 6, 6, 3))
    pairs = trace_model(net, None, x).bn_follows
    assert [(p.path, p.bn_path) for p in pairs] == [(("conv",), ("bn",))]
    copy = nnx.clone(net)
    fold_nnx(copy, pairs)
    np.testing.assert_allclose(copy(x), net(x), rtol=1e-5, atol=1e-5)
    res = run(net, None, x, spec=gq.QuantSpec(bits=8), method="rtn", fold_batchnorm=True)
    assert res.folded == [("conv", "bn")]
    assert float(jnp.abs(net.bn.mean[...]).min()) > 0  # user's model untouched
    np.testing.assert_allclose(res.model(x), net(x), rtol=0.05, atol=0.05)


class SharedPreBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.Dense(4)(x)
        return nn.BatchNorm(use_running_average=True)(y) + y  # pre-BN output used twice


def test_bn_folding_refuses_when_pre_bn_output_is_reused():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 5))
    model = SharedPreBN()
    v = _random_bn(model.init(jax.random.PRNGKey(1), x), "BatchNorm_0", jax.random.PRNGKey(2), 4)
    with pytest.raises(ValueError, match="Dense_0 -> BatchNorm_0.*fold_batchnorm=False"):
        run(model, v, x, fold_batchnorm=True)


# ----------------------------------------------------------------------------- bias correction


def test_bias_correction_reduces_mean_output_difference():
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 8)) + 0.5
    model = MLP3()
    v = model.init(jax.random.PRNGKey(1), x)
    spec = gq.QuantSpec(bits=2)
    plain = run(model, v, x, spec=spec, method="rtn")
    corr = run(model, v, x, spec=spec, method="rtn", bias_correction=True, batch_size=50)
    p = v["params"]

    def mean_diff(qv, name, prev):
        w, b = p[name]["kernel"], p[name]["bias"]
        qw, qb = qv["params"][name]["kernel"], qv["params"][name]["bias"]
        xf, xq = x, x
        for n in prev:
            xf = jax.nn.relu(xf @ p[n]["kernel"] + p[n]["bias"])
            xq = jax.nn.relu(xq @ qv["params"][n]["kernel"] + qv["params"][n]["bias"])
        return jnp.abs(((xf @ w + b) - (xq @ qw + qb)).mean(0))

    for name, prev in (("Dense_0", []), ("Dense_1", ["Dense_0"])):
        d_plain, d_corr = (
            mean_diff(plain.variables, name, prev),
            mean_diff(corr.variables, name, prev),
        )
        assert float(d_corr.max()) < 1e-4 < float(d_plain.max())
        np.testing.assert_allclose(
            corr[name].bias_shift,
            corr.variables["params"][name]["bias"] - p[name]["bias"],
            rtol=1e-5,
            atol=1e-6,
        )
    np.testing.assert_array_equal(corr["Dense_0"].codes, plain["Dense_0"].codes)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
    model = MLP3()
    v = model.init(jax.random.PRNGKey(1), x)
    msg = "expects inputs of shape (..., 8), got (16, 9)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        run(model, v, jnp.ones((16, 9)))
    with pytest.raises(ValueError, match="NaN or Inf.*first at sample 13"):
        run(model, v, x.at[13, 2].set(jnp.nan), batch_size=5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(model, v, [x[:8], x[8:].at[0, 0].set(jnp.inf)])
    for empty in (jnp.zeros((0, 8)), []):
        with pytest.raises(ValueError, match="empty calibration data"):
            run(model, v, empty)
    with pytest.raises(ValueError, match="per-sample shape"):
        run(model, v, [x[:8], jnp.ones((4, 7))])
    with pytest.raises(ValueError, match="unknown method"):
        run(model, v, x, method="magic")
    with pytest.raises(TypeError, match="variables=None"):
        run(NNXMLP3(nnx.Rngs(0)), v, x)
    net = NNXMLP3(nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape("'layers/0' expects inputs of shape (..., 8)")):
        run(net, None, jnp.ones((4, 3)))
