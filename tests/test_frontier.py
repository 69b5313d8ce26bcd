"""The frontier driver (``quantize_params(blocks="auto")``) against the reference driver
(``blocks=None``): code for code in float64, with shared statistics, bias correction, a disk
spill, resumed runs, block detection and streamed calibration.

The models (``_transformers``) are tiny pre-norm transformer stacks: a Dense, 2 chained
blocks with extra arguments (positions, a mask), a Dense head. Runs are cached per module
(``_run``): a configuration several tests compare with is quantized once.
"""

from __future__ import annotations

import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _transformers import (
    calib,
    linen_layer_names,
    linen_model,
    nnx_layer_names,
    nnx_model,
    to_f64,
)
from flax import nnx

import gpfq_jax as gq
from gpfq_jax.flax import frontier as frontier_mod
from gpfq_jax.flax import schedule as schedule_mod
from gpfq_jax.flax.blocks import BlockStructureError

S3 = gq.QuantSpec(bits=3)
S4G = gq.QuantSpec(bits=4, group_size=4, grid="asym")
BASE = dict(batch_size=4, progress=False, stats_dtype=jnp.float64, spec=S3)
N_LAYERS = 20  # inp, 2 blocks of 9, head


@pytest.fixture(autouse=True)
def _float64(x64):
    """Every test runs with 64-bit JAX: code-for-code comparisons are exact."""
    yield


def quantize(model, variables, data, **kw):
    return gq.quantize_params(model, variables, data, **{**BASE, **kw})


_RUNS: dict = {}


def _run(framework: str, n: int = 2, **kw):
    """``quantize`` on the standard model and calibration data, cached per configuration."""
    key = (framework, n, repr(sorted(kw.items())))
    if key not in _RUNS:
        if framework == "linen":
            m, v = linen_model(n)
        else:
            m, v = nnx_model(n), None
        _RUNS[key] = quantize(m, v, calib(), **kw)
    return _RUNS[key]


# ------------------------------------------------------------- comparisons


def _leaves(tree):
    return [
        (jax.tree_util.keystr(p), np.asarray(a))
        for p, a in jax.tree_util.tree_leaves_with_path(tree)
    ]


def assert_same_tree(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, u), (_, w) in zip(la, lb):
        assert u.dtype == w.dtype, p
        np.testing.assert_array_equal(u, w, err_msg=p)


def assert_same_codes(a, b):
    """Two QuantizeResults with the same layers, codes, steps, rel_error and bias shifts."""
    assert [r.name for r in a.layers] == [r.name for r in b.layers]
    assert a.skipped == b.skipped
    for r, s in zip(a.layers, b.layers):
        np.testing.assert_array_equal(np.asarray(r.codes), np.asarray(s.codes), err_msg=r.name)
        np.testing.assert_array_equal(np.asarray(r.scale), np.asarray(s.scale), err_msg=r.name)
        assert r.rel_error == s.rel_error, r.name
        assert (r.bias_shift is None) == (s.bias_shift is None), r.name
        if r.bias_shift is not None:
            np.testing.assert_array_equal(r.bias_shift, s.bias_shift, err_msg=r.name)


def kernel_names(tree) -> set[str]:
    """Names ("a/b/c") of every module holding a ``kernel`` in a params tree / pure dict."""
    out = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if keys[-1] == "kernel":
            out.add("/".join(keys[:-1]))
    return out


def block_of(name: str) -> str | None:
    parts = name.split("/")
    if parts[0].startswith("layers_"):
        return parts[0]
    if parts[0] == "layers":
        return "/".join(parts[:2])
    return None


def check_frontier_report(res, names: list[str], blocks: list[str]) -> None:
    assert res.driver.mode == "frontier", res.driver
    assert res.driver.blocks == blocks
    assert [r.name for r in res.layers] == names
    for r in res.layers:
        assert r.block == block_of(r.name), r.name


# ------------------------------------------------------------- 1. frontier == reference


# every method and both specs, a few combinations (each case is two whole runs)
@pytest.mark.parametrize(
    "method,spec",
    [("gpfq", S3), ("gptq", S4G), ("rtn", S3)],
    ids=["gpfq-3bit", "gptq-4bit-g4-asym", "rtn-3bit"],
)
def test_linen_frontier_equals_reference(method, spec):
    m, v = linen_model()
    x = calib()
    ref = _run("linen", method=method, spec=spec, blocks=None)
    res = _run("linen", method=method, spec=spec)
    assert ref.driver.mode == "reference" and ref.driver.blocks == []
    assert all(r.block is None for r in ref.layers)
    check_frontier_report(res, linen_layer_names(2), ["layers_0", "layers_1"])
    assert_same_codes(res, ref)
    assert_same_tree(res.variables, ref.variables)
    assert res.skipped == []
    assert kernel_names(v["params"]) == {r.name for r in res.layers}
    out = m.apply(res.variables, x)
    assert out.shape == (8, 5, 3) and np.isfinite(np.asarray(out)).all()
    if method != "rtn":  # the codes were fitted to the data, so the model still works
        full = m.apply(v, x)
        assert float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full)) < 0.5


@pytest.mark.parametrize("method,spec", [("gpfq", S4G)], ids=["gpfq-4bit-g4-asym"])
def test_nnx_frontier_equals_reference(method, spec):
    x = calib()
    ref = _run("nnx", method=method, spec=spec, blocks=None)
    res = _run("nnx", method=method, spec=spec)
    check_frontier_report(res, nnx_layer_names(2), ["layers/0", "layers/1"])
    assert_same_codes(res, ref)
    assert_same_tree(res.variables, ref.variables)
    assert res["layers/0/attn/key"].shape == (8, 2, 2)  # grouped-query: 2 kv heads of 2
    assert res["layers/0/attn/query"].shape == (8, 4, 2)
    assert kernel_names(nnx.to_pure_dict(nnx.state(nnx_model()))) == {r.name for r in res.layers}
    out = res.model(x)
    assert out.shape == (8, 5, 3) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(out, ref.model(x))


# ------------------------------------------------------------- 2. bias correction


def test_bias_correction_frontier_equals_reference():
    ref = _run("linen", bias_correction=True, blocks=None)
    res = _run("linen", bias_correction=True)
    assert res.driver.mode == "frontier"
    corrected = [r.name for r in res.layers if r.bias_shift is not None]
    assert "layers_1/down" in corrected and "layers_1/dg" in corrected and "head" in corrected
    assert "layers_0/gate" not in corrected  # no bias
    assert_same_codes(res, ref)
    assert_same_tree(res.variables, ref.variables)
    plain = _run("linen")
    assert not np.array_equal(  # the corrected biases are in the result
        res.variables["params"]["head"]["bias"], plain.variables["params"]["head"]["bias"]
    )


# ------------------------------------------------------------- 3. shared statistics


def test_shared_statistics_equal_separate_accumulation():
    shared, alone = _run("linen"), _run("linen", shared_stats=False)
    assert_same_codes(shared, alone)
    assert_same_tree(shared.variables, alone.variables)
    groups = [tuple(f"layers_{i}/{n}" for n in names) for i in range(2)
              for names in (("attn/query", "attn/key", "attn/value"), ("gate", "up"))]  # fmt: skip
    assert sorted(map(tuple, shared.driver.shared)) == sorted(groups)
    assert alone.driver.shared == []
    leaders = {g[j]: g[0] for g in groups for j in range(1, len(g))}
    for r in shared.layers:
        assert r.shares_stats_with == leaders.get(r.name), r.name
    assert all(r.shares_stats_with is None for r in alone.layers)
    # the followers accumulated nothing themselves
    assert shared["layers_1/attn/value"].capture_seconds == 0.0


def test_skipped_member_is_not_in_a_shared_group():
    m, v = linen_model()
    res = quantize(m, v, calib(), rules=[gq.Rule("layers_0/attn/key", skip=True)])
    assert res.skipped == ["layers_0/attn/key"]
    assert res.driver.mode == "frontier"
    shared = [tuple(g) for g in res.driver.shared]
    assert ("layers_0/attn/query", "layers_0/attn/value") in shared
    assert ("layers_1/attn/query", "layers_1/attn/key", "layers_1/attn/value") in shared
    assert all("layers_0/attn/key" not in g for g in shared)
    assert res["layers_0/attn/value"].shares_stats_with == "layers_0/attn/query"
    names = {r.name for r in res.layers}
    assert "layers_0/attn/key" not in names
    assert names | set(res.skipped) == kernel_names(v["params"])
    key = ("params", "layers_0", "attn", "key", "kernel")
    got, want = res.variables, v
    for k in key:
        got, want = got[k], want[k]
    np.testing.assert_array_equal(got, want)  # left float
    plain = _run("linen")  # the other layers of block 0 quantized as without the rule
    np.testing.assert_array_equal(
        res["layers_0/attn/query"].codes, plain["layers_0/attn/query"].codes
    )


# ------------------------------------------------------------- 4. compile sharing


def test_identical_blocks_share_compiled_functions():
    two, three, ref = _run("linen"), _run("linen", n=3), _run("linen", blocks=None)
    assert three.driver.blocks == ["layers_0", "layers_1", "layers_2"]
    assert [r.name for r in three.layers] == linen_layer_names(3)
    assert two.driver.traced_functions == three.driver.traced_functions > 0
    assert two.driver.traced_functions < ref.driver.traced_functions
    assert two.driver.frontier_seconds > 0 and ref.driver.frontier_seconds == 0


def test_one_float_pass_per_block_feeds_every_captured_layer(monkeypatch):
    """The float inputs of a block's captured layers and its float output come from one float
    run of the block (per batch); the codes still equal the reference driver's."""
    from gpfq_jax.flax import frontier

    passes = []
    original = frontier.Frontier._float_pass

    def spy(self, block, layers):
        passes.append((block.name, [layer.name for layer in layers]))
        return original(self, block, layers)

    monkeypatch.setattr(frontier.Frontier, "_float_pass", spy)
    m, v = linen_model(2)
    res = quantize(m, v, calib(), shared_stats=False)
    assert [b for b, _ in passes] == res.driver.blocks == ["layers_0", "layers_1"]
    for block, names in passes:
        assert names == [r.name for r in res.layers if r.block == block]
    assert_same_codes(res, _run("linen", blocks=None, shared_stats=False))


# ------------------------------------------------------------- 5. spill


def test_spill_to_disk_gives_the_same_codes():
    mem, disk = _run("linen"), _run("linen", cache_bytes=0)
    assert_same_codes(mem, disk)
    assert_same_tree(mem.variables, disk.variables)
    assert disk.driver.spilled_bytes > 0 and disk.driver.cache_peak_bytes == 0
    assert mem.driver.spilled_bytes == 0 and mem.driver.cache_peak_bytes > 0


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                     ("1GB", TypeError)])  # fmt: skip
def test_bad_cache_bytes_raise(bad, err):
    m, v = linen_model()
    with pytest.raises(err, match="cache_bytes"):
        quantize(m, v, calib(), cache_bytes=bad)


# ------------------------------------------------------------- 6. resume


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _fail_on(monkeypatch, module, name: str, when, exc: BaseException):
    """Patch ``module.name`` to raise ``exc`` when ``when(call_number, *args)`` is true."""
    orig, calls = getattr(module, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if when(calls[0], *args):
            raise exc
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)
    return calls


RESUME_KW = dict(bias_correction=True)


def test_resume_after_interrupted_frontier_advance(tmp_path, monkeypatch):
    """Interrupted while moving the frontier out of block 0 (its 9 layers and inp done): the
    rerun (spilling the saved frontier to disk) finishes with the uninterrupted run's codes,
    biases and variables; a third run quantizes nothing."""
    m, v = linen_model()
    full = _run("linen", **RESUME_KW)
    _fail_on(monkeypatch, frontier_mod.Frontier, "advance", lambda c, *a: c == 1,
             KeyboardInterrupt("stop"))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        quantize(m, v, calib(), resume_dir=tmp_path, **RESUME_KW)
    monkeypatch.undo()
    assert (tmp_path / "resume.json").exists()
    res = quantize(m, v, calib(), resume_dir=tmp_path, cache_bytes=0, **RESUME_KW)
    assert res.driver.resumed_layers == 9  # inp and layers_0 up to dg (ein was in flight)
    assert res.driver.spilled_bytes > 0  # the saved frontier went back into the cache
    assert res.driver.mode == "frontier"
    assert_same_codes(res, full)
    assert_same_tree(res.variables, full.variables)
    assert [r.block for r in res.layers] == [r.block for r in full.layers]
    assert [r.shares_stats_with for r in res.layers] == [r.shares_stats_with for r in full.layers]
    again = quantize(m, v, calib(), resume_dir=tmp_path, **RESUME_KW)
    assert again.driver.resumed_layers == N_LAYERS
    assert again.driver.traced_functions == 0
    assert_same_codes(again, full)
    assert_same_tree(again.variables, full.variables)


def test_resume_after_failure_inside_a_shared_group(tmp_path, monkeypatch):
    """Fails between q and k of block 1's shared q/k/v group (with the cache on disk): the
    rerun redoes k's statistics and gives the uninterrupted run's codes."""
    m, v = linen_model()
    full = _run("linen", **RESUME_KW)
    calls = _fail_on(monkeypatch, schedule_mod, "quantize_layer",
                     lambda c, target, layer, *a: layer.name == "layers_1/attn/key",
                     RuntimeError("disk full"))  # fmt: skip
    with pytest.raises(RuntimeError, match="disk full"):
        quantize(m, v, calib(), resume_dir=tmp_path, cache_bytes=0, **RESUME_KW)
    assert calls[0] == 12  # inp, block 0, and q of block 1
    monkeypatch.undo()
    assert not (tmp_path / "spill").exists()  # the spill files are removed on the way out
    res = quantize(m, v, calib(), resume_dir=tmp_path, **RESUME_KW)
    assert res.driver.resumed_layers == 11
    assert_same_codes(res, full)
    assert_same_tree(res.variables, full.variables)
    assert res["layers_1/attn/key"].shares_stats_with == "layers_1/attn/query"
    assert res["layers_1/attn/value"].shares_stats_with == "layers_1/attn/query"


def _interrupted_dir(tmp_path, monkeypatch, model, variables, **kw) -> Path:
    d = tmp_path / "run"
    _fail_on(monkeypatch, frontier_mod.Frontier, "advance", lambda c, *a: c == 1,
             KeyboardInterrupt("stop"))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        quantize(model, variables, calib(), resume_dir=d, **kw)
    monkeypatch.undo()
    return d


def test_resume_with_other_arguments_raises_and_changes_nothing(tmp_path, monkeypatch):
    m, v = linen_model()
    d = _interrupted_dir(tmp_path, monkeypatch, m, v)
    before = snapshot(d)
    assert "resume.json" in before and any(k.startswith("layer_") for k in before)
    other_weights = jax.tree.map(lambda a: a, v)
    other_weights["params"]["head"]["kernel"] = v["params"]["head"]["kernel"] * 1.01
    others = [
        (v, calib(), dict(spec=S4G)),
        (v, calib(), dict(method="gptq")),
        (v, calib(seed=2), {}),
        (v, calib()[:, ::-1], {}),  # the same values, tokens reversed
        (other_weights, calib(), {}),
        (v, calib(), dict(blocks=None)),
        (v, calib(), dict(shared_stats=False)),
    ]
    for i, (variables, data, kw) in enumerate(others):
        with pytest.raises(ValueError, match="other arguments"):
            quantize(m, variables, data, resume_dir=d, **kw)
        assert snapshot(d) == before, i


def test_non_resume_directory_is_refused_untouched(tmp_path):
    m, v = linen_model()
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "sub" / "w.npy").write_bytes(b"\x00\x01")
    before = snapshot(d)
    with pytest.raises(ValueError, match="resume.json"):
        quantize(m, v, calib(), resume_dir=d)
    assert snapshot(d) == before
    assert sorted(os.listdir(d)) == ["notes.txt", "sub"]


def test_nnx_resume(tmp_path, monkeypatch):
    full = _run("nnx", spec=S4G)
    model = nnx_model()
    d = tmp_path / "run"
    _fail_on(monkeypatch, frontier_mod.Frontier, "advance", lambda c, *a: c == 2,
             KeyboardInterrupt("stop"))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        quantize(model, None, calib(), resume_dir=d, spec=S4G)
    monkeypatch.undo()
    res = quantize(model, None, calib(), resume_dir=d, spec=S4G)
    assert res.driver.resumed_layers == 18
    assert_same_codes(res, full)
    assert_same_tree(res.variables, full.variables)
    np.testing.assert_array_equal(res.model(calib()), full.model(calib()))


# ------------------------------------------------------------- 7. block detection


def test_explicit_block_pattern_equals_auto():
    auto = _run("linen")
    res = _run("linen", blocks=[r"layers_\d+"])
    assert res.driver.blocks == auto.driver.blocks == ["layers_0", "layers_1"]
    assert_same_codes(res, auto)
    assert_same_tree(res.variables, auto.variables)


def test_block_pattern_matching_nothing_raises():
    m, v = linen_model()
    with pytest.raises(BlockStructureError, match="'encoder_.*' matches no module"):
        quantize(m, v, calib(), blocks=[r"encoder_\d+"])


class Mini(nn.Module):
    """A small block (LayerNorm, two Dense); ``mlp=False``: the norm only (no layer)."""

    @nn.compact
    def __call__(self, x, mlp: bool = True):
        h = nn.LayerNorm(name="norm")(x)
        if not mlp:
            return x + h
        return nn.Dense(8, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(h)))


class ResidualOutside(nn.Module):
    """``x = x + block(x)``: block 1's input is not block 0's output."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="inp")(x)
        for i in range(2):
            x = x + Mini(name=f"layers_{i}")(x)
        return nn.Dense(3, name="head")(x)


class CalledTwice(nn.Module):
    """Block 0 is called twice (the second time without its layers)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="inp")(x)
        first = Mini(name="layers_0")
        x = first(first(x), mlp=False)
        x = Mini(name="layers_1")(x)
        return nn.Dense(3, name="head")(x)


class PlainMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


@pytest.mark.parametrize(
    "model,bad,why",
    [(ResidualOutside(), "layers_1", "not the output of 'layers_0'"),
     (CalledTwice(), "layers_0", "called 2 times")],
    ids=["residual-outside", "called-twice"],
)  # fmt: skip
def test_not_a_chain_falls_back_to_reference(model, bad, why):
    x = calib()
    v = to_f64(model.init(jax.random.PRNGKey(0), x))
    auto = quantize(model, v, x)
    assert auto.driver.mode == "reference" and auto.driver.blocks == []
    assert why in auto.driver.note and bad in auto.driver.note
    assert all(r.block is None for r in auto.layers)
    ref = quantize(model, v, x, blocks=None)
    assert_same_codes(auto, ref)
    assert_same_tree(auto.variables, ref.variables)
    with pytest.raises(BlockStructureError, match=f"'{bad}'.*{why}"):
        quantize(model, v, x, blocks=[r"layers_\d+"])


def test_model_without_repeated_blocks_runs_the_reference_driver():
    m, x = PlainMLP(), calib()
    v = to_f64(m.init(jax.random.PRNGKey(0), x))
    res = quantize(m, v, x)
    assert res.driver.mode == "reference" and res.driver.blocks == []
    assert "no repeated submodules" in res.driver.note
    assert [r.name for r in res.layers] == ["Dense_0", "Dense_1", "Dense_2"]
    assert_same_codes(res, quantize(m, v, x, blocks=None))


# ------------------------------------------------------------- 8. streaming


def test_streamed_calibration_equals_arrays():
    m, v = linen_model()
    x = calib()
    calls = [0]

    def stream():
        calls[0] += 1
        return iter([x[:4], x[4:]])

    res = quantize(m, v, stream)
    assert res.driver.mode == "frontier"
    assert calls[0] >= 2
    arr = _run("linen")
    assert_same_codes(res, arr)
    assert_same_tree(res.variables, arr.variables)


# ------------------------------------------------ fixed: data with equal sums, conv sampling


class _Resumed(Exception):
    pass


def test_resume_with_other_data_of_equal_sums_raises(tmp_path, monkeypatch):
    m, v = linen_model()
    x = np.round(np.asarray(calib()) * 4)  # integer values: the sums below are exact
    other = x.copy()
    other.reshape(-1)[0] += 1.0
    other.reshape(-1)[7] -= 1.0  # a different sample 0 (two of its values changed)
    assert not np.array_equal(x, other)
    d = tmp_path / "run"
    _fail_on(monkeypatch, schedule_mod, "quantize_layer", lambda c, *a: c == 2,
             KeyboardInterrupt("stop"))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        quantize(m, v, jnp.asarray(x), resume_dir=d)
    monkeypatch.undo()
    before = snapshot(d)
    _fail_on(monkeypatch, schedule_mod, "quantize_layer", lambda c, *a: True, _Resumed())
    try:
        quantize(m, v, jnp.asarray(other), resume_dir=d)
    except ValueError as e:
        assert "other arguments" in str(e)
    except _Resumed:
        pytest.fail("a run on other calibration data resumed the saved one")
    assert snapshot(d) == before


class SiblingConvs(nn.Module):
    """Two 1x1 convolutions reading one tensor (an Inception-style block)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="stem")(x)
        a, b = nn.Conv(4, (1, 1), name="b1")(x), nn.Conv(4, (1, 1), name="b2")(x)
        return nn.Dense(3, name="head")(jnp.concatenate([a, b], -1).mean((1, 2)))


def test_shared_statistics_with_patch_sampling_equal_separate():
    """Sampled conv patches are per layer (seeded by its index): such layers do not share."""
    m = SiblingConvs()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 3), jnp.float64)
    v = to_f64(m.init(jax.random.PRNGKey(1), x))
    shared = quantize(m, v, x, patch_fraction=0.5)
    assert shared.driver.shared == []
    alone = quantize(m, v, x, patch_fraction=0.5, shared_stats=False)
    assert_same_codes(shared, alone)
    every_patch = quantize(m, v, x)
    assert [tuple(g) for g in every_patch.driver.shared] == [("b1", "b2")]
    assert_same_codes(every_patch, quantize(m, v, x, shared_stats=False))
