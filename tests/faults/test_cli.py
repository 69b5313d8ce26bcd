"""Faults at the command line: bad arguments and environment, and resuming an interrupted run.

Every bad invocation must fail within seconds with one clear line (no traceback), touch no
network, create nothing in the home directory and leave no workdir behind when it fails
before any work. A network guard (``sitecustomize`` on PYTHONPATH) records and refuses every
socket connection and DNS lookup of the child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _faultkit import fault

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(
    os.environ.get("GPFQ_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared" / "data"
)

GUARD = """
import os, socket
_log = os.environ["GPFQ_TEST_NETWORK_LOG"]
open(_log + ".loaded", "w").close()

def _refuse(*args, **kwargs):
    with open(_log, "a") as f:
        f.write(repr(args[:2]) + "\\n")
    raise OSError("network disabled by the test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.getaddrinfo = _refuse
"""


@pytest.fixture
def sandbox(tmp_path):
    """An empty HOME and a network guard for the child process."""
    home = tmp_path / "home"
    home.mkdir()
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(guard), str(REPO)]),
        "GPFQ_TEST_NETWORK_LOG": str(log),
        "GPFQ_DATA_DIR": str(DATA_DIR),
    }
    env.pop("GPFQ_TRACEBACK", None)
    return tmp_path, home, log, env


def run_script(script: str, args: list[str], env: dict, timeout: float = 120):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc, time.perf_counter() - start


# (script, arguments with {tmp} for the test folder, environment changes, stderr regex)
BAD_INVOCATIONS = [
    pytest.param(
        "quantize.py", ["--config=configs/default.py", "--workdir={tmp}/wd"],
        {"GPFQ_DATA_DIR": "{tmp}/missing"},
        r"FileNotFoundError: data directory .*missing \(from \$GPFQ_DATA_DIR\) does not exist",
        id="quantize-missing-data-dir-env",
    ),
    pytest.param(
        "quantize.py",
        ["--config=configs/default.py", "--workdir={tmp}/wd", "--config.data_dir={tmp}/missing"],
        {}, r"data directory .*missing \(from data_dir\) does not exist",
        id="quantize-missing-data-dir-flag",
    ),
    pytest.param(
        "train.py", ["--config=configs/mnist_mlp.py", "--workdir={tmp}/wd"],
        {"GPFQ_DATA_DIR": "{tmp}/missing"}, r"data directory .*missing .*does not exist",
        id="train-missing-data-dir",
    ),
    pytest.param(
        "quantize.py",
        ["--config=configs/default.py", "--workdir={tmp}/wd", "--config.data_dir={tmp}/afile"],
        {}, r"NotADirectoryError: data directory .*afile .*is not a directory",
        id="data-dir-is-a-file",
    ),
    pytest.param(
        "quantize.py", ["--config=configs/default.py", "--workdir={tmp}/afile"], {},
        r"NotADirectoryError: --workdir .*afile is a file, not a directory",
        id="quantize-workdir-is-a-file",
    ),
    pytest.param(
        "train.py", ["--config=configs/mnist_mlp.py", "--workdir={tmp}/afile"], {},
        r"--workdir .*afile is a file, not a directory", id="train-workdir-is-a-file",
    ),
    pytest.param(
        "quantize.py", ["--config=configs/no_such_config.py", "--workdir={tmp}/wd"], {},
        r"no_such_config\.py", id="config-file-missing",
    ),
    pytest.param(
        "quantize.py",
        ["--config=configs/default.py", "--workdir={tmp}/wd", "--config.quant.no_such_key=1"],
        {}, r"no_such_key", id="unknown-config-key",
    ),
    pytest.param(
        "quantize.py",
        ["--config=configs/default.py", "--workdir={tmp}/wd", "--config.quant.calib_size=abc"],
        {}, r"calib_size", id="config-value-of-wrong-type",
    ),
    pytest.param(
        "quantize.py", ["--config=configs/default.py"], {}, r"workdir", id="workdir-missing",
    ),
    pytest.param(
        "quantize.py", ["--config=configs/default.py", "--workdir={tmp}/wd", "extra"], {},
        r"unexpected arguments", id="unexpected-positional-argument",
    ),
]  # fmt: skip


@fault("cli", "error")
@pytest.mark.parametrize("script,args,env_changes,message", BAD_INVOCATIONS)
def test_bad_invocation_fails_fast_and_clearly(sandbox, script, args, env_changes, message):
    tmp, home, log, env = sandbox
    (tmp / "afile").write_text("a user's file\n")
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    env = {**env, **{k: v.replace("{tmp}", str(tmp)) for k, v in env_changes.items()}}
    proc, seconds = run_script(script, args, env)
    assert proc.returncode != 0
    assert __import__("re").search(message, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert seconds < 60, f"took {seconds:.1f} s"
    assert Path(str(log) + ".loaded").exists(), "the network guard was not active"
    assert not log.exists(), f"network touched: {log.read_text()}"
    assert list(home.iterdir()) == [], f"created in HOME: {list(home.rglob('*'))}"
    assert not (tmp / "wd").exists(), "a failed start left a workdir behind"
    assert (tmp / "afile").read_text() == "a user's file\n"


QUICK = [
    "--config=configs/mnist_mlp.py",
    "--config.float_checkpoint=checkpoints/mnist_mlp",
    "--config.quant.calib_size=200",
    "--config.quant.calib_batch_size=100",
    "--config.quant.methods=('gpfq', 'rtn')",
    "--config.quant.bits=(4,)",
    "--config.quant.extra_runs=()",
    "--config.quant.scale=max",
]


def need_mnist() -> None:
    if not (DATA_DIR / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files missing under {DATA_DIR} (set GPFQ_DATA_DIR)")


@fault("cli", "result")
@pytest.mark.slow
def test_rerun_keeps_finished_runs_and_redoes_the_rest(sandbox):
    """An interrupted quantize.py resumes: finished runs with the same setup are kept."""
    need_mnist()
    tmp, _, _, env = sandbox
    wd = tmp / "wd"
    proc, _ = run_script("quantize.py", [*QUICK, f"--workdir={wd}"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads((wd / "results.json").read_text())
    names = [r["name"] for r in full["runs"]]
    assert names == ["gpfq_int_4", "rtn_int_4"] and full["complete"]

    # Interrupted after the first run: results.json holds it alone, not complete.
    partial = {**full, "runs": full["runs"][:1], "complete": False}
    (wd / "results.json").write_text(json.dumps(partial))
    proc, _ = run_script("quantize.py", [*QUICK, f"--workdir={wd}"], env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((wd / "results.json").read_text())
    by_name = {r["name"]: r for r in resumed["runs"]}
    assert resumed["complete"] and list(by_name) == names
    assert by_name["gpfq_int_4"].get("resumed") is True
    assert {k: v for k, v in by_name["gpfq_int_4"].items() if k != "resumed"} == full["runs"][0]
    assert "resumed" not in by_name["rtn_int_4"]
    assert by_name["rtn_int_4"]["test_accuracy"] == full["runs"][1]["test_accuracy"]

    # Another setup (calibration seed): nothing is kept.
    proc, _ = run_script(
        "quantize.py", [*QUICK, f"--workdir={wd}", "--config.quant.seed=1"], env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads((wd / "results.json").read_text())
    assert not any(r.get("resumed") for r in fresh["runs"])
