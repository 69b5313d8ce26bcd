"""General kernel layers: DenseGeneral / LinearGeneral, Einsum (Linen and NNX), attention.

A general layer is quantized as (g, N, n) problems through the ``MatrixView`` recorded at
trace time: contracted input axes -> N features, kernel-only axes -> n neurons, axes shared by
input, kernel and output -> g groups. Exactness tests build those problems BY HAND (numpy
reshapes, not the view) and compare codes in float64.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gpfq_jax as gq
from gpfq_jax.core import accumulate, init_stats, quantize_from_stats, view_kernel, view_rows
from gpfq_jax.core.alphabets import dequantize
from gpfq_jax.flax.tracing import trace_model

SPECS = [gq.QuantSpec(bits=3), gq.QuantSpec(bits=4, group_size=4, grid="asym")]


def run(model, variables, calib, **kw):
    kw.setdefault("progress", False)
    return gq.quantize_params(model, variables, calib, **kw)


def f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


# ----------------------------------------------------------------------------- models


class LinenBlock(nn.Module):
    """Pre-norm block: Flax attention, SwiGLU MLP (nn.Dense), DenseGeneral with batch_dims and
    multi-axis features, an Einsum with a batch letter."""

    @nn.compact
    def __call__(self, x):  # x (b, t, 8)
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h, h)
        h = nn.LayerNorm()(x)
        gate = nn.Dense(16, use_bias=False, name="gate")(h)
        up = nn.Dense(16, use_bias=False, name="up")(h)
        x = x + nn.Dense(8, use_bias=False, name="down")(nn.silu(gate) * up)
        b, t = x.shape[:2]
        y = nn.DenseGeneral((2, 3), axis=(-2, -1), batch_dims=(0,), name="dg")(
            x.reshape(b, t, 2, 4)
        )  # (b, t, 2, 3)
        return nn.Einsum((2, 3, 5), "bthe,hed->bthd", name="ein")(y)  # (b, t, 2, 5)


class NnxBlock(nnx.Module):
    """The same in NNX, with grouped-query attention (num_kv_heads)."""

    def __init__(self, rngs, batch=4):
        self.norm1 = nnx.LayerNorm(8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, num_kv_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(8, rngs=rngs)
        self.gate = nnx.Linear(8, 16, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(8, 16, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(16, 8, use_bias=False, rngs=rngs)
        self.dg = nnx.LinearGeneral((2, 4), (2, 3), axis=(-2, -1), batch_axis={0: batch},
                                    rngs=rngs)  # fmt: skip
        self.ein = nnx.Einsum("bthe,hed->bthd", (2, 3, 5), (2, 5), rngs=rngs)

    def __call__(self, x):
        h = self.norm1(x)
        x = x + self.attn(h)
        h = self.norm2(x)
        x = x + self.down(nnx.silu(self.gate(h)) * self.up(h))
        b, t = x.shape[:2]
        return self.ein(self.dg(x.reshape(b, t, 2, 4)))


LINEN_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "gate", "up", "down",
                "dg", "ein"]  # fmt: skip
NNX_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "gate", "up", "down", "dg",
              "ein"]  # fmt: skip


def _x(shape=(4, 6, 8), dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(0), shape, dtype)


# ----------------------------------------------------------------------------- whole blocks


@pytest.mark.parametrize("spec", SPECS, ids=["3bit", "4bit-g4-asym"])
def test_linen_block_every_linear_layer_quantized(spec):
    m, x = LinenBlock(), _x()
    v = m.init(jax.random.PRNGKey(1), x)
    res = run(m, v, x, spec=spec)
    assert [r.name for r in res.layers] == LINEN_LAYERS
    assert [r.kind for r in res.layers][:4] == ["dense_general"] * 4
    assert res["ein"].kind == "einsum" and res["gate"].kind == "dense"
    for r in res.layers:
        path = ("params", *r.path, "kernel")
        k = v
        for p in path:
            k = k[p]
        assert r.codes.shape == k.shape == r.shape
        rr = r.result
        q = dequantize(r.codes, rr.weight_step, r.offset, zero_point=rr.weight_zero_point)
        got = res.variables
        for p in path:
            got = got[p]
        np.testing.assert_array_equal(np.asarray(q, k.dtype), got)  # broadcastable steps
        assert 0 < r.rel_error < 0.5, r.name
    if spec.group_size is None:
        assert res["attn/query"].scale.shape == (1, 2, 4)  # per neuron, size 1 on (d,)
        assert res["attn/out"].scale.shape == (1, 1, 8)
        assert res["dg"].scale.shape == (4, 1, 1, 2, 3)  # batch dim kept: 4 groups
    out = m.apply(res.variables, x)
    ref = m.apply(v, x)
    assert out.shape == ref.shape and np.isfinite(np.asarray(out)).all()
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.5


def test_nnx_block_gqa_every_linear_layer_quantized():
    m, x = NnxBlock(nnx.Rngs(0)), _x()
    res = run(m, None, x, spec=SPECS[0])
    assert [r.name for r in res.layers] == NNX_LAYERS
    assert res["attn/key"].shape == (8, 2, 2)  # 2 kv heads for 4 query heads (head_dim 2)
    assert res["attn/query"].shape == (8, 4, 2)
    out, ref = res.model(x), m(x)
    assert np.isfinite(np.asarray(out)).all()
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.5
    for r in res.layers:
        np.testing.assert_array_equal(
            dequantize(r.codes, r.scale, r.offset),
            gq.flax.paths.module_at(res.model, r.path).kernel[...],
        )


# ----------------------------------------------------------------------------- the view


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.DenseGeneral((2, 4)), (3, 5, 8)),
        (lambda: nn.DenseGeneral(8, axis=(-2, -1)), (3, 5, 2, 4)),
        (lambda: nn.DenseGeneral((2, 3), axis=(1, -1), batch_dims=(0,)), (2, 4, 5, 3)),
        (lambda: nn.DenseGeneral(6, axis=0), (4, 3, 5)),
        (lambda: nn.Einsum((2, 3, 5), "bthe,hed->bthd"), (2, 4, 2, 3)),
        (lambda: nn.Einsum((3, 5, 2), "bte,etk->kbt"), (2, 5, 3)),
        (lambda: nn.Einsum((4, 6), "...d,df->...f"), (2, 3, 4)),
    ],
)
def test_view_rows_times_kernel_is_the_layer(make, shape):
    """rows (m, g, N) @ kernel (g, N, n) gives the layer's output (bias off), for every view."""
    layer = make().clone(use_bias=False)
    x = _x(shape)
    v = layer.init(jax.random.PRNGKey(2), x)
    info = trace_model(layer, v, x).layers[0]
    out = np.einsum(
        "mgi,gin->mgn", view_rows(x, info.view), view_kernel(v["params"]["kernel"], info.view)
    )
    ref = layer.apply(v, x)
    assert np.sort(np.abs(np.asarray(ref)).ravel()) == pytest.approx(
        np.sort(np.abs(out).ravel()), rel=1e-4, abs=1e-5
    )


# ----------------------------------------------------------------------------- exactness


class OneGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):  # (b, t, 2, 4): 4 batch groups, N = 8, n = 6
        return nn.DenseGeneral((2, 3), axis=(-2, -1), batch_dims=(0,), use_bias=False)(x)


@pytest.mark.parametrize("spec", SPECS, ids=["3bit", "4bit-g4-asym"])
def test_dense_general_equals_the_grouped_problem_by_hand(x64, spec):
    x = _x((4, 6, 2, 4), jnp.float64)
    m = OneGeneral()
    v = f64(m.init(jax.random.PRNGKey(3), x))
    res = run(m, v, x, spec=spec, stats_dtype=jnp.float64)
    k = np.asarray(v["params"]["DenseGeneral_0"]["kernel"])  # (4, 2, 4, 2, 3)
    rows = np.asarray(x).transpose(1, 0, 2, 3).reshape(6, 4, 8)  # (m, g, N)
    mat = k.reshape(4, 8, 6).transpose(1, 0, 2).reshape(8, 24)  # (N, g*n), group-major columns
    stats = accumulate(init_stats(8, 4, jnp.float64), jnp.asarray(rows))
    ref = quantize_from_stats(jnp.asarray(mat), stats, spec)
    codes = np.asarray(res.layers[0].codes).reshape(4, 8, 6).transpose(1, 0, 2).reshape(8, 24)
    np.testing.assert_array_equal(codes, ref.codes)
    w = np.asarray(res.layers[0].result.weight_step)
    w = np.broadcast_to(w, k.shape).reshape(4, 8, 6).transpose(1, 0, 2).reshape(8, 24)
    np.testing.assert_array_equal(w, np.broadcast_to(ref.weight_step, (8, 24)))
    assert res.layers[0].rel_error == pytest.approx(ref.rel_error, rel=1e-12)


class QkvAndOut(nn.Module):
    general: bool

    @nn.compact
    def __call__(self, x):  # (b, t, 8)
        if self.general:
            h = nn.DenseGeneral((2, 4), name="q")(x)
            return nn.DenseGeneral(8, axis=(-2, -1), name="o")(h)
        h = nn.Dense(8, name="q")(x).reshape(*x.shape[:-1], 2, 4)
        return nn.Dense(8, name="o")(h.reshape(*x.shape[:-1], 8))


@pytest.mark.parametrize("spec", SPECS, ids=["3bit", "4bit-g4-asym"])
@pytest.mark.parametrize("method", ["gpfq", "gptq", "qronos", "rtn"])
def test_attention_projections_equal_dense_by_reshape(x64, spec, method):
    """DenseGeneral q (d, heads, hd) and out (heads, hd, d) give the codes of the equivalent
    Dense layers (kernels reshaped), code for code."""
    x = _x((4, 6, 8), jnp.float64)
    gen, dense = QkvAndOut(True), QkvAndOut(False)
    vg = f64(gen.init(jax.random.PRNGKey(4), x))
    vd = {"params": {
        "q": {"kernel": vg["params"]["q"]["kernel"].reshape(8, 8),
              "bias": vg["params"]["q"]["bias"].reshape(8)},
        "o": {"kernel": vg["params"]["o"]["kernel"].reshape(8, 8),
              "bias": vg["params"]["o"]["bias"]},
    }}  # fmt: skip
    np.testing.assert_allclose(gen.apply(vg, x), dense.apply(vd, x), rtol=1e-12)
    kw = dict(spec=spec, method=method, stats_dtype=jnp.float64, bias_correction=True)
    rg, rd = run(gen, vg, x, **kw), run(dense, vd, x, **kw)
    for a, b in zip(rg.layers, rd.layers):
        np.testing.assert_array_equal(np.asarray(a.codes).reshape(8, 8), b.codes)
        np.testing.assert_array_equal(
            np.broadcast_to(a.result.weight_step, a.shape).reshape(8, 8),
            np.broadcast_to(b.result.weight_step, (8, 8)),
        )
        np.testing.assert_array_equal(np.asarray(a.bias_shift).reshape(-1), b.bias_shift)


def test_einsum_batch_letter_equals_per_head_problems_by_hand(x64):
    class Ein(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 3, 5), "bthe,hed->bthd", use_bias=False)(x)

    x = _x((4, 6, 2, 3), jnp.float64)
    m = Ein()
    v = f64(m.init(jax.random.PRNGKey(5), x))
    res = run(m, v, x, spec=SPECS[0], stats_dtype=jnp.float64)
    k = np.asarray(v["params"]["Einsum_0"]["kernel"])  # (h, e, d)
    rows = np.asarray(x).reshape(24, 2, 3)  # (m, g=h, N=e)
    stats = accumulate(init_stats(3, 2, jnp.float64), jnp.asarray(rows))
    ref = quantize_from_stats(jnp.asarray(k.transpose(1, 0, 2).reshape(3, 10)), stats, SPECS[0])
    codes = np.asarray(res.layers[0].codes).transpose(1, 0, 2).reshape(3, 10)
    np.testing.assert_array_equal(codes, ref.codes)


# ----------------------------------------------------------------------------- checkpoints, errors


def _same(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, u), (_, w) in zip(la, lb):
        assert u.dtype == w.dtype, p
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w), err_msg=str(p))


@pytest.mark.parametrize("spec", SPECS, ids=["3bit", "4bit-g4-asym"])
def test_save_load_round_trip_is_bit_identical(tmp_path, spec):
    m, x = LinenBlock(), _x()
    v = m.init(jax.random.PRNGKey(1), x)
    res = run(m, v, x, spec=spec)
    gq.save_quantized(tmp_path / "q", res)
    loaded = gq.load_quantized(tmp_path / "q")
    _same(loaded, res.variables)
    np.testing.assert_array_equal(m.apply(loaded, x), m.apply(res.variables, x))


def test_nnx_save_load_round_trip_is_bit_identical(tmp_path):
    m, x = NnxBlock(nnx.Rngs(0)), _x()
    res = run(m, None, x, spec=SPECS[1])
    gq.save_quantized(tmp_path / "q", res)
    _same(gq.load_quantized(tmp_path / "q"), res.variables)


def test_conv_transpose_still_raises_naming_the_layer():
    class WithUp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.DenseGeneral((2, 2), name="heads")(x)
            return nn.ConvTranspose(2, (3,), name="up")(x)

    m, x = WithUp(), _x((2, 5, 4))
    v = m.init(jax.random.PRNGKey(0), x)
    with pytest.raises(NotImplementedError, match="'up' \\(ConvTranspose\\)"):
        run(m, v, x)


def test_einsum_bias_correction_is_refused():
    class Ein(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 3, 5), "bthe,hed->bthd", name="ein")(x)

    m, x = Ein(), _x((4, 6, 2, 3))
    v = m.init(jax.random.PRNGKey(0), x)
    with pytest.raises(NotImplementedError, match="'ein'.*bias correction"):
        run(m, v, x, bias_correction=True)


SHARDED_SCRIPT = """
import json, jax
jax.config.update("jax_enable_x64", True)
import flax.linen as nn, jax.numpy as jnp, numpy as np
import gpfq_jax as gq

class M(nn.Module):
    @nn.compact
    def __call__(self, x):  # (b, t, 8)
        h = nn.DenseGeneral((2, 3), name="q")(x)  # n = 6: padded to 8 on 4 devices
        y = nn.DenseGeneral(5, axis=-1, batch_dims=(0,), name="bd")(h.reshape(4, -1, 6))
        return nn.Einsum((5, 3, 2), "bte,etk->kbt", name="ein")(y.reshape(-1, 3, 5))

x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
v = M().init(jax.random.PRNGKey(1), x)
kw = dict(progress=False, stats_dtype=jnp.float64, spec={"bits": 3})
a = gq.quantize_params(M(), v, x, **kw)
b = gq.quantize_params(M(), v, x, mesh="auto", **kw)
print("RESULT " + json.dumps({"devices": jax.device_count(),
      "layers": [r.name for r in a.layers],
      "equal": [bool(np.array_equal(r.codes, s.codes)) for r, s in zip(a.layers, b.layers)]}))
"""


@pytest.mark.slow  # a subprocess compiling two runs on 4 simulated devices
def test_general_layers_sharded_equal_unsharded():
    """4 simulated CPU devices (a subprocess): the codes do not depend on the device count."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 4 and out["layers"] == ["q", "bd", "ein"]
    assert all(out["equal"]), out


# ----------------------------------------------------------------------------- embeddings


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # (b, t) int -> (b, t, vocab) logits, tied output head
        embed = nn.Embed(50, 16, name="embed")
        return embed.attend(nn.Dense(16, name="fc")(embed(tokens)))


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(0), (8, 12), 0, 50)


def test_embedding_stays_float_by_default():
    tokens = _tokens()
    v = TiedLM().init(jax.random.PRNGKey(1), tokens)
    res = run(TiedLM(), v, tokens)
    assert [r.name for r in res.layers] == ["fc"] and res.skipped == ["embed"]
    same = res.variables["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(same, v["params"]["embed"]["embedding"])


@pytest.mark.parametrize("spec", [gq.QuantSpec(bits=8), gq.QuantSpec(bits=4, grid="asym")])
def test_embedding_rtn_by_rule_rounds_each_token_row(tmp_path, spec):
    tokens = _tokens()
    v = TiedLM().init(jax.random.PRNGKey(1), tokens)
    res = run(TiedLM(), v, tokens, rules=[gq.Rule("embed", method="rtn", spec=spec)])
    r = res["embed"]
    table = np.asarray(v["params"]["embed"]["embedding"], np.float64)  # (vocab, d)
    q = np.asarray(res.variables["params"]["embed"]["embedding"], np.float64)
    assert r.scale.shape == (50, 1)  # one step per token row
    # RTN by hand, per row: the step from the row's range, nearest code.
    step = np.asarray(r.scale, np.float64)
    zp = None if r.result.zero_point is None else np.asarray(r.result.zero_point, np.float64)
    codes = np.asarray(r.codes)
    expect = np.round(table / step + (0 if zp is None else zp))
    a = spec.alphabet
    lo, hi = (0, 2**spec.bits - 1) if zp is not None else (-(a.levels // 2), a.levels // 2)
    np.testing.assert_array_equal(codes, np.clip(expect, lo, hi))
    rel = np.linalg.norm(table - q) / np.linalg.norm(table)
    assert r.rel_error == pytest.approx(rel, rel=1e-4)  # the error of a table is its weights'
    gq.save_quantized(tmp_path / "ck", res)
    back = gq.load_quantized(tmp_path / "ck")["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(back, res.variables["params"]["embed"]["embedding"])


def test_embedding_rule_without_rtn_is_an_error_naming_it():
    tokens = _tokens()
    v = TiedLM().init(jax.random.PRNGKey(1), tokens)
    with pytest.raises(ValueError, match=r"rule 'embed' matches only embeddings .*method='rtn'"):
        run(TiedLM(), v, tokens, rules=[gq.Rule("embed", bits=8)])


def test_nnx_embedding_rtn_by_rule():
    class NnxLM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 16, rngs=rngs)
            self.fc = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, tokens):
            return self.embed.attend(self.fc(self.embed(tokens)))

    model = NnxLM(nnx.Rngs(0))
    res = run(model, None, _tokens(), rules=[gq.Rule("embed", method="rtn")])
    assert [r.name for r in res.layers] == ["embed", "fc"]
    np.testing.assert_array_equal(res.model.embed.embedding[...], res["embed"].result.q)
    assert np.isfinite(np.asarray(res.model(_tokens()))).all()


# ------------------------------------------------------- group-wise steps of general layers


class QAndOut(nn.Module):
    @nn.compact
    def __call__(self, x):  # (b, t, 64)
        q = nn.DenseGeneral((4, 8), use_bias=False, name="q")(x)  # N = 64, n = 32
        return nn.DenseGeneral(64, axis=(-2, -1), use_bias=False, name="o")(q)  # N = 32


def test_grouped_general_layers_store_compact_steps(tmp_path):
    """Group-wise steps of DenseGeneral layers: one (step, zero point) per group and neuron in
    the view's matrix layout, not one per weight; honest bytes in size_report."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 64))
    v = QAndOut().init(jax.random.PRNGKey(1), x)
    spec = gq.QuantSpec(bits=4, grid="asym", group_size=16)
    res = run(QAndOut(), v, x, spec=spec)
    q, o = res["q"].result, res["o"].result
    assert q.step.shape == q.zero_point.shape == (4, 32)  # ceil(64 / 16) groups x 32 neurons
    assert o.step.shape == (2, 64)  # ceil((4 * 8) / 16) groups x 64 neurons
    for r in (q, o):
        assert r.weight_step.shape == r.codes.shape and r.view is not None
        np.testing.assert_array_equal(
            r.values(jnp.float32),
            dequantize(r.codes, r.weight_step, r.offset, zero_point=r.weight_zero_point),
        )
    # By hand: o's kernel (4, 8, 64) is the (32, 64) matrix; group j is its rows 16j..16j+15.
    ko = np.asarray(v["params"]["o"]["kernel"]).reshape(32, 64)
    rows = ko[:16]
    span = rows.max(0) - rows.min(0)
    np.testing.assert_allclose(np.asarray(o.step[0]), span / 15, rtol=1e-5)
    gq.save_quantized(tmp_path / "ck", res)
    back = gq.load_quantized(tmp_path / "ck")
    for name in ("q", "o"):
        np.testing.assert_array_equal(
            back["params"][name]["kernel"], res.variables["params"][name]["kernel"]
        )
    sizes = {d["layer"]: d for d in gq.size_report(tmp_path / "ck", v)["layers"]}
    # 2048 weights at 4 bits = 1024 bytes of codes; steps 4 x 32 float32 + zero points.
    assert sizes["q"]["codes_bytes"] == 1024
    assert sizes["q"]["scale_bytes"] <= 4 * 32 * (4 + 1)
