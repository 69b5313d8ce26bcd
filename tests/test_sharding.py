"""Device sharding and streamed calibration in ``quantize_params``.

Sharded vs unsharded runs go through a subprocess with 4 simulated CPU devices (XLA_FLAGS
must be set before JAX starts). They compare in float64 (x64, ``stats_dtype=float64``):
data-parallel statistics differ from serial ones only in float summation order, which at
float64 never moves a code of these small problems.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpfq_jax as gq

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "gpfq_jax_test_compile_cache"


def _subprocess_env(devices: int) -> dict:
    """CPU-only, ``devices`` simulated devices, JAX's persistent compilation cache (it is
    keyed by program, options and versions, and makes repeated runs much faster)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        ).strip(),
        JAX_COMPILATION_CACHE_DIR=str(CACHE),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    import gpfq_jax as gq

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16)(x))    # statistics with F (2 n >= N)
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(10)(x)          # 10 outputs: padded to 12 on 4 devices; norms
                                            # instead of F (2 n < N), padded alike

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
            h = nn.BatchNorm(use_running_average=not train)(
                nn.Conv(16, (3, 3), use_bias=False)(x))
            x = nn.relu(x + h)              # residual
            return nn.Dense(16)(x.mean(axis=(1, 2)))

    rng = np.random.default_rng(0)
    cases = {"mlp": (MLP(), rng.standard_normal((42, 16)).astype(np.float32)),
             "cnn": (CNN(), rng.standard_normal((42, 6, 6, 16)).astype(np.float32))}
    out = {"devices": jax.device_count()}
    for name, (model, x) in cases.items():
        v = model.init(jax.random.PRNGKey(1), x[:1])
        if "batch_stats" in v:  # non-trivial BatchNorm
            v["batch_stats"] = jax.tree.map(lambda a: a + 0.3, v["batch_stats"])
        for method in ("gpfq", "rtn") if name == "mlp" else ("gpfq",):
            kw = dict(method=method, batch_size=16, progress=False, stats_dtype=jnp.float64)
            a = gq.quantize_params(model, v, x, **kw)              # last batch: 10 samples
            b = gq.quantize_params(model, v, x, mesh="auto", **kw)
            out[f"{name}_{method}"] = {
                "layers": [r.name for r in a.layers],
                "equal": [bool(np.array_equal(r.codes, s.codes))
                          for r, s in zip(a.layers, b.layers)],
                "rel_error_diff": max(abs(r.rel_error - s.rel_error)
                                      for r, s in zip(a.layers, b.layers)),
                "sharded_over": max(len(s.codes.sharding.device_set) for s in b.layers)}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_result() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        cwd=ROOT,
        env=_subprocess_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow  # > 10 s on 2 CPU cores
@pytest.mark.parametrize("case", ["mlp_gpfq", "mlp_rtn", "cnn_gpfq"])
def test_sharded_codes_equal_unsharded(sharded_result, case):
    assert sharded_result["devices"] == 4
    r = sharded_result[case]
    assert len(r["layers"]) == 3
    assert all(r["equal"]), dict(zip(r["layers"], r["equal"]))
    assert r["rel_error_diff"] < 1e-6  # float32 forward passes may differ in the last bits
    assert r["sharded_over"] == 4  # the mesh was really used


# ----------------------------------------------------------------------------- streaming


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(5)(x)


def _setup():
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    model = MLP()
    return model, model.init(jax.random.PRNGKey(0), x[:1]), [x[:16], x[16:32], x[32:]]


class CountingCalib:
    """A zero-argument callable returning a fresh iterator over ``batches``; counts calls."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __call__(self):
        self.calls += 1
        return (b for b in self.batches)


def test_callable_calib_equals_list_and_is_called_once_per_layer():
    model, v, batches = _setup()
    spec = gq.QuantSpec(bits=3)
    ref = gq.quantize_params(model, v, batches, spec, progress=False)
    calib = CountingCalib(batches)
    res = gq.quantize_params(model, v, calib, spec, progress=False)
    assert calib.calls == len(res.layers) == 2
    for a, b in zip(ref.layers, res.layers):
        np.testing.assert_array_equal(a.codes, b.codes)
        assert a.rows == b.rows == 40
    skip = CountingCalib(batches)
    res = gq.quantize_params(model, v, skip, spec, rules=[("Dense_0", True)], progress=False)
    assert skip.calls == 1 and [r.name for r in res.layers] == ["Dense_1"]


def test_callable_calib_validation():
    model, v, batches = _setup()
    run = lambda calib: gq.quantize_params(
        model,
        v,
        calib,
        method="rtn",  # noqa: E731
        progress=False,
    )
    with pytest.raises(ValueError, match="empty calibration data"):
        run(lambda: iter([]))
    bad = [batches[0], batches[1].copy(), batches[2]]
    bad[1][3, 0] = np.nan
    with pytest.raises(
        ValueError,
        match=r"NaN or Inf: 1 sample\(s\) of batch 1 \(pass 1 of "
        r"calib\(\)\), first at sample 19",
    ):
        run(CountingCalib(bad))
    with pytest.raises(ValueError, match="per-sample shape"):
        run(CountingCalib([batches[0], np.ones((4, 7), np.float32)]))
    with pytest.raises(TypeError, match="iterable of batches"):
        run(lambda: 3)
    shrinking = iter([batches, batches[:2]])
    with pytest.raises(ValueError, match="same batches on every call"):
        run(lambda: iter(next(shrinking)))


def test_float64_stats_need_x64():
    model, v, batches = _setup()
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is enabled in this process")
    with pytest.raises(ValueError, match="jax_enable_x64"):
        gq.quantize_params(model, v, batches, stats_dtype=jnp.float64, progress=False)
    with pytest.raises(ValueError, match="float32 or float64"):
        gq.quantize_params(model, v, batches, stats_dtype=jnp.int32, progress=False)


def test_mesh_auto_on_local_devices_and_bad_mesh():
    model, v, batches = _setup()
    ref = gq.quantize_params(model, v, batches, method="rtn", progress=False)
    res = gq.quantize_params(model, v, batches, method="rtn", progress=False, mesh="auto")
    for a, b in zip(ref.layers, res.layers):
        np.testing.assert_array_equal(a.codes, b.codes)
    with pytest.raises(ValueError, match="mesh must be"):
        gq.quantize_params(model, v, batches, progress=False, mesh="all")


# ----------------------------------------------------------------------------- multi-process

MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import flax.linen as nn
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh
    import gpfq_jax as gq

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))

    x = np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32)
    model = MLP()
    v = model.init(jax.random.PRNGKey(1), x[:1])
    mesh = Mesh(np.array(jax.devices()), ("devices",))      # global: 2 processes x 2 devices
    batches = [x[i:i + 16] for i in range(0, 48, 16)]
    local = [b[8 * pid:8 * (pid + 1)] for b in batches]    # this process's share of each batch
    res = gq.quantize_params(model, v, lambda: iter(local), mesh=mesh, progress=False,
                             stats_dtype=jnp.float64)
    codes = [np.asarray(multihost_utils.process_allgather(r.codes, tiled=True))
             for r in res.layers]
    out = {"processes": jax.process_count(), "devices": jax.device_count(),
           "rows": [r.rows for r in res.layers]}
    if pid == 0:  # the single-process reference, on this process's devices
        ref = gq.quantize_params(model, v, batches, progress=False, stats_dtype=jnp.float64)
        out["equal"] = [bool(np.array_equal(c, r.codes)) for c, r in zip(codes, ref.layers)]
    print("RESULT " + json.dumps(out))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # > 10 s on 2 CPU cores
def test_two_processes_global_mesh_equal_single_process(tmp_path):
    """Multi-host path on one machine: 2 processes x 2 CPU devices, each feeding its half of
    every batch (jax.distributed + gloo collectives) -> the single-process codes."""
    script = tmp_path / "multiprocess.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    env = _subprocess_env(2)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    res = [
        json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        for out in outs
    ]
    for r in res:
        assert (r["processes"], r["devices"], r["rows"]) == (2, 4, [48, 48])
    assert res[0]["equal"] == [True, True]
