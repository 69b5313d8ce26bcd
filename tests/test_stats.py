"""Streaming statistics: conv patches, accumulation, error from statistics, Conv GPFQ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpfq_jax as gq
from gpfq_jax.core import (
    ConvGeometry,
    StatsAccumulator,
    accumulate,
    conv_row_count,
    conv_rows,
    conv_rows_at,
    grouped_kernel,
    init_stats,
    output_error_sq,
)

CONV_CASES = [
    # (kernel (kh, kw), cin, cout, strides, padding, kernel_dilation, groups)
    ((3, 3), 4, 6, 1, "SAME", 1, 1),
    ((3, 3), 4, 6, 2, "SAME", 1, 1),
    ((3, 3), 4, 6, 1, "VALID", 1, 1),
    ((3, 3), 4, 6, 2, "VALID", 1, 1),
    ((2, 3), 3, 5, (2, 1), ((1, 0), (2, 1)), 1, 1),
    ((3, 3), 4, 6, 1, "SAME", 2, 1),
    ((3, 3), 4, 6, 1, "SAME", 1, 2),
    ((3, 3), 4, 8, 2, "SAME", 1, 4),  # depthwise, channel multiplier 2
    ((1, 1), 4, 6, 1, "VALID", 1, 1),
]


def _conv_case(rng, case, n=3, hw=(9, 8)):
    ksize, cin, cout, strides, padding, dil, groups = case
    x = jnp.asarray(rng.normal(size=(n, *hw, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*ksize, cin // groups, cout)), jnp.float32)
    geom = ConvGeometry.create(kernel.shape, strides, padding, 1, dil, groups, x.shape)
    return x, kernel, geom


def _conv(x, kernel, geom):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        geom.strides,
        geom.padding,
        geom.input_dilation,
        geom.kernel_dilation,
        ("NHWC", "HWIO", "NHWC"),
        geom.feature_group_count,
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("case", CONV_CASES)
def test_patches_times_kernel_equal_conv(rng, case):
    x, kernel, geom = _conv_case(rng, case)
    y = _conv(x, kernel, geom)
    rows = conv_rows(x, geom)  # (m, g, N)
    g, cout = geom.feature_group_count, kernel.shape[-1]
    k_g = kernel.reshape(-1, g, cout // g).transpose(1, 0, 2)  # (g, N, cout/g)
    out = jnp.einsum("mgi,gio->mgo", rows, k_g, precision="highest").reshape(-1, cout)
    np.testing.assert_allclose(out, y.reshape(-1, cout), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CONV_CASES)
def test_rows_at_equal_selected_rows(rng, case):
    """conv_rows_at builds exactly the chosen rows of conv_rows; conv_row_count counts them."""
    x, _, geom = _conv_case(rng, case)
    rows = conv_rows(x, geom)
    assert conv_row_count(x.shape, geom) == rows.shape[0]
    idx = jnp.asarray(rng.choice(rows.shape[0], size=min(7, rows.shape[0]), replace=False))
    np.testing.assert_array_equal(conv_rows_at(x, geom, idx), rows[idx])


def test_subsampled_stats_equal_stats_of_the_kept_rows(x64, rng):
    """patch_fraction < 1: the statistics are those of the seeded subset of conv_rows."""
    x = jnp.asarray(rng.normal(size=(3, 9, 9, 4)))
    xq = x + 0.1 * jnp.asarray(rng.normal(size=x.shape))
    geom = ConvGeometry.create((3, 3, 2, 6), 2, "SAME", feature_group_count=2, input_shape=x.shape)
    acc = StatsAccumulator(18, geom, dtype=jnp.float64, patch_fraction=0.3, seed=7)
    got = acc.update(x, xq).result()
    m = conv_row_count(x.shape, geom)
    idx = jax.random.choice(
        jax.random.fold_in(jax.random.PRNGKey(7), 0), m, (round(0.3 * m),), replace=False
    )
    want = accumulate(
        init_stats(18, 2, jnp.float64), conv_rows(x, geom)[idx], conv_rows(xq, geom)[idx]
    )
    for name in ("hess", "cross", "xtx", "count"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12)


def test_flax_conv_matches_geometry(rng):
    """ConvGeometry.create resolves Flax's SAME padding exactly like nn.Conv."""
    import flax.linen as nn

    x = jnp.asarray(rng.normal(size=(2, 10, 7, 3)), jnp.float32)
    conv = nn.Conv(5, (3, 3), strides=2, padding="SAME", kernel_dilation=1, use_bias=False)
    v = conv.init(jax.random.PRNGKey(0), x)
    k = v["params"]["kernel"]
    geom = ConvGeometry.create(k.shape, 2, "SAME", input_shape=x.shape)
    np.testing.assert_allclose(_conv(x, k, geom), conv.apply(v, x), rtol=1e-5, atol=1e-5)


def test_patches_with_input_dilation(rng):
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    geom = ConvGeometry.create(kernel.shape, 1, ((1, 1), (2, 1)), input_dilation=2)
    rows = conv_rows(x, geom)
    np.testing.assert_allclose(
        rows[:, 0] @ kernel.reshape(-1, 4),
        _conv(x, kernel, geom).reshape(-1, 4),
        rtol=1e-4,
        atol=1e-4,
    )
    assert conv_row_count(x.shape, geom) == rows.shape[0]
    idx = jnp.asarray([0, 5, rows.shape[0] - 1])
    np.testing.assert_array_equal(conv_rows_at(x, geom, idx), rows[idx])


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_gpfq_data_form_equals_stats_path(x64, rng, case):
    """Per group: GPFQ on explicit patches (data form) == quantize_from_stats (Gram form)."""
    x, kernel, geom = _conv_case(rng, case)
    x, kernel = x.astype(jnp.float64), kernel.astype(jnp.float64)
    xq = x + 0.05 * jnp.asarray(rng.normal(size=x.shape))
    acc = StatsAccumulator(geom.features_per_group, geom, dtype=jnp.float64)
    for i in range(x.shape[0]):  # stream one image at a time
        acc.update(x[i : i + 1], xq[i : i + 1])
    spec = gq.QuantSpec(bits=3)
    res = gq.quantize_from_stats(kernel, acc.result(), spec, block_size=5)
    rows, rows_q = conv_rows(x, geom), conv_rows(xq, geom)
    g, cout = geom.feature_group_count, kernel.shape[-1]
    mat = kernel.reshape(-1, cout)
    delta = gq.step_size(mat, spec)
    codes = np.asarray(res.codes).reshape(-1, cout)
    for i in range(g):
        cols = slice(i * cout // g, (i + 1) * cout // g)
        ref = gq.gpfq_data_form(mat[:, cols], rows[:, i], rows_q[:, i], delta[cols], spec.alphabet)
        np.testing.assert_array_equal(codes[:, cols], np.asarray(ref))
    # And the error from the statistics equals the direct error on the patches.
    q = res.q.reshape(kernel.shape)
    y, yq = _conv(x, kernel, geom), _conv(xq, q, geom)
    direct = float(jnp.linalg.norm(y - yq) / jnp.linalg.norm(y))
    assert res.rel_error == pytest.approx(direct, rel=1e-9)


def test_streaming_equals_one_shot_and_count(rng):
    x = jnp.asarray(rng.normal(size=(7, 5, 12)), jnp.float32)  # leading batch dims flattened
    xq = x + 0.1
    acc = StatsAccumulator(12)
    for i in range(7):
        acc.update(x[i], xq[i])
    one = gq.stats_from_data(x.reshape(-1, 12), xq.reshape(-1, 12))
    s = acc.result()
    assert int(s.count) == 35
    for a, b in zip(s[:3], one[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_float32_accumulation_precision(rng):
    """fp32 accumulation over 100 batches stays within 1e-5 (relative) of float64 numpy."""
    xs = [rng.normal(size=(500, 32)).astype(np.float32) + 1.0 for _ in range(100)]
    acc = StatsAccumulator(32)
    for x in xs:
        acc.update(jnp.asarray(x))
    ref = sum(x.astype(np.float64).T @ x.astype(np.float64) for x in xs)
    err = np.abs(np.asarray(acc.result().hess[0], np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err


def test_error_from_stats_equals_direct(rng):
    m, n, n_out = 300, 20, 7
    x = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    xq = x + 0.2 * jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n, n_out)), jnp.float32)
    q = w + 0.1 * jnp.asarray(rng.normal(size=(n, n_out)), jnp.float32)
    s = gq.stats_from_data(x, xq)
    err, ref = output_error_sq(s, w[None], q[None])
    np.testing.assert_allclose(err[0], jnp.sum((x @ w - xq @ q) ** 2, 0), rtol=1e-3)
    np.testing.assert_allclose(ref[0], jnp.sum((x @ w) ** 2, 0), rtol=1e-4)


def test_patch_subsampling_is_seeded_and_keeps_pairs(rng):
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    geom = ConvGeometry.create((3, 3, 3, 4), 1, "SAME", input_shape=x.shape)
    a = StatsAccumulator(27, geom, patch_fraction=0.25, seed=3).update(x).result()
    b = StatsAccumulator(27, geom, patch_fraction=0.25, seed=3).update(x).result()
    c = StatsAccumulator(27, geom, patch_fraction=0.25, seed=4).update(x).result()
    assert int(a.count) == 64  # 25% of 4*8*8 patches
    np.testing.assert_array_equal(a.hess, b.hess)
    assert not np.allclose(a.hess, c.hess)
    np.testing.assert_array_equal(a.hess, a.cross)  # x_quant = x: same rows kept


def test_patch_fraction_leaves_dense_rows_alone(rng):
    """Subsampling is for conv patches only: a Dense layer keeps one row per sample."""
    x = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
    xq = x + 0.1
    kept = StatsAccumulator(6, patch_fraction=0.25, seed=3).update(x, xq).result()
    full = StatsAccumulator(6).update(x, xq).result()
    assert int(kept.count) == 40
    np.testing.assert_array_equal(kept.hess, full.hess)
    np.testing.assert_array_equal(kept.cross, full.cross)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="features"):
        StatsAccumulator(5).update(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        StatsAccumulator(4).update(jnp.ones((3, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="patch_fraction"):
        StatsAccumulator(4, patch_fraction=0.0)


def test_same_inputs_take_one_product(rng):
    """x_quant omitted (first layer): H = G = F from one product, equal to the general path."""
    x = jnp.asarray(rng.normal(size=(40, 9)), jnp.float32)
    one = StatsAccumulator(9).update(x).result()
    three = StatsAccumulator(9).update(x, x + 0.0).result()  # a different array object
    for a, b in zip(one[:3], three[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_array_equal(one.hess, one.xtx)
    assert int(one.count) == int(three.count) == 40


def _kernel_mode_case(rng, conv: bool):
    """Float / quantized inputs and a kernel of a grouped conv (g = 2) or a Dense layer."""
    if conv:
        x = rng.normal(size=(3, 7, 7, 4))
        kernel = rng.normal(size=(3, 3, 2, 6))
        geom = ConvGeometry.create(
            kernel.shape, 2, "SAME", feature_group_count=2, input_shape=x.shape
        )
        features = 18
    else:
        x = rng.normal(size=(30, 5))
        kernel = rng.normal(size=(5, 7))
        geom, features = None, 5
    xq = x + 0.3 * rng.normal(size=x.shape)
    return jnp.asarray(x), jnp.asarray(xq), jnp.asarray(kernel), geom, features


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_kernel_mode_replaces_f_by_output_norms(x64, rng, conv, fraction):
    """With the kernel, H and G are unchanged, F is dropped, and the per-neuron norms equal
    ||X w_j||^2 and ||(X - X~) w_j||^2 on the same (sub)sampled rows; the error from them equals
    the error from F."""
    x, xq, kernel, geom, n = _kernel_mode_case(rng, conv)
    kw = dict(dtype=jnp.float64, patch_fraction=fraction, seed=5)
    full = StatsAccumulator(n, geom, **kw)
    lean = StatsAccumulator(n, geom, kernel=kernel, **kw)
    for part in (slice(0, 2), slice(2, None)):  # two batches
        full.update(x[part], xq[part])
        lean.update(x[part], xq[part])
    full.update(x[:1])  # and a first-layer style batch
    lean.update(x[:1])
    a, b = full.result(), lean.result()
    assert b.xtx is None and int(a.count) == int(b.count)
    np.testing.assert_array_equal(a.hess, b.hess)
    np.testing.assert_array_equal(a.cross, b.cross)
    w = grouped_kernel(kernel, a.groups)
    ref = jnp.einsum("gin,gij,gjn->gn", w, a.xtx, w)
    drift = jnp.einsum(
        "gin,gij,gjn->gn", w, a.xtx - a.cross - jnp.swapaxes(a.cross, 1, 2) + a.hess, w
    )
    np.testing.assert_allclose(b.out_ref, ref, rtol=1e-10)
    np.testing.assert_allclose(b.out_drift, drift, rtol=1e-8, atol=1e-8)
    q = w + 0.2 * jnp.asarray(rng.normal(size=w.shape))
    for got, want in zip(output_error_sq(b, w, q), output_error_sq(a, w, q)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["gpfq", "rtn", "gptq"])
def test_kernel_mode_quantizes_like_full_stats(x64, rng, method):
    x, xq, kernel, geom, n = _kernel_mode_case(rng, conv=True)
    full = StatsAccumulator(n, geom, dtype=jnp.float64).update(x, xq).result()
    lean = StatsAccumulator(n, geom, dtype=jnp.float64, kernel=kernel).update(x, xq).result()
    spec = gq.QuantSpec(bits=3, scale="search")
    a = gq.quantize_from_stats(kernel, full, spec, method)
    b = gq.quantize_from_stats(kernel, lean, spec, method)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert b.rel_error == pytest.approx(a.rel_error, rel=1e-8)


def test_kernel_mode_errors(rng):
    x, xq, kernel, geom, n = _kernel_mode_case(rng, conv=False)
    with pytest.raises(ValueError, match="does not match"):
        StatsAccumulator(n + 1, kernel=kernel)
    lean = StatsAccumulator(n, kernel=kernel).update(x.astype(jnp.float32)).result()
    with pytest.raises(ValueError, match="grouped kernel"):
        accumulate(lean, x[:, None, :], xq[:, None, :])
    with pytest.raises(ValueError, match="output norms of this kernel"):
        gq.quantize_from_stats(kernel[:, :3], lean)  # another kernel than accumulated
    with pytest.raises(ValueError, match="output norms of this kernel"):
        gq.quantize_from_stats(kernel, lean._replace(out_ref=None, out_drift=None))
