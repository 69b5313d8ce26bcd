"""Saves killed outright (SIGKILL): the checkpoint at the path is always the old or the new one,
complete and loadable; the next save removes the hidden temporaries a kill leaves behind.

Two pre-built QuantizeResults (the Linen MLP from seeds 0 and 1: A and B) are pickled. A
helper process imports gpfq_jax, Flax and orbax once and forks one saver per kill (JAX is
imported but its backend not yet started when it forks, so each fork starts its own); a saver
unpickles A and B and saves B, A, B, ... onto its path with overwrite=True until it is killed.
The test kills each saver with SIGKILL after a seeded random delay spanning several saves,
then loads the path. Forking from a warm helper makes a kill cost well under a second instead
of a fresh interpreter's import time.
"""

from __future__ import annotations

import os
import pickle
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _faultkit import DATA_LOST, check, fault, mlp_result, same_tree

import gpfq_jax as gq
from gpfq_jax.flax import checkpoints

HELPER = r"""
import os, pickle, signal, sys, traceback
import gpfq_jax as gq
import gpfq_jax.atomic as atomic
from gpfq_jax.flax import checkpoints  # noqa: F401  (imported once, before any fork)

RESULTS = sys.argv[1]


def save_loop(path, ready):
    results = pickle.load(open(RESULTS, "rb"))
    i = 0
    while True:
        gq.save_quantized(path, results[1 - i % 2], overwrite=True)  # B, A, B, ...
        if i == 0:
            open(ready, "w").close()
        i += 1


def die_between_renames(path, ready):
    results = pickle.load(open(RESULTS, "rb"))
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in os.path.basename(dst):  # path moved aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.os.rename = rename
    gq.save_quantized(path, results[1], overwrite=True)


MODES = {"loop": save_loop, "kill-between-renames": die_between_renames}
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "run":  # run MODE PATH READY: fork a saver, answer its pid
        pid = os.fork()
        if pid == 0:
            try:
                MODES[args[0]](*args[1:])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(3)
        print(pid, flush=True)
    elif cmd == "reap":  # reap PID: wait for it, answer its raw wait status
        print(os.waitpid(int(args[0]), 0)[1], flush=True)
"""

KILLS = 12  # savers killed, in total
AT_ONCE = 3  # savers running side by side (each on its own path)
MAX_DELAY = 0.4  # seconds after a saver's first completed save (one save: ~30-150 ms)
TIMEOUT = 120.0


class Helper:
    """The forking helper process (line protocol on its stdin / stdout)."""

    def __init__(self, folder: Path):
        script, results = folder / "helper.py", folder / "results.pkl"
        script.write_text(HELPER)
        with open(results, "wb") as f:
            pickle.dump([mlp_result(0), mlp_result(1)], f)
        self.stderr = folder / "helper-stderr.txt"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(results)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(self.stderr, "wb"), text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip
        check(self._answer() == "ready", "the helper did not start", "[crash]")

    def _answer(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            pytest.fail(f"the helper stopped answering:\n{self.stderr.read_text()[-3000:]}")
        return line.strip()

    def _ask(self, *words) -> str:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def run(self, mode: str, path: Path, ready: Path) -> int:
        return int(self._ask("run", mode, path, ready))

    def reap(self, pid: int) -> int:
        """The saver's exit: the signal that killed it (negative), or its exit code."""
        status = int(self._ask("reap", pid))
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def wait_ready(self, pid: int, ready: Path) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z" or time.monotonic() > deadline:
                pytest.fail(f"saver {pid} never saved:\n{self.stderr.read_text()[-3000:]}")
            time.sleep(0.005)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    h = Helper(tmp_path_factory.mktemp("kill"))
    yield h
    h.close()


def _state(path: Path) -> str:
    """'A' or 'B' (the variables loaded from path); a failure is data lost."""
    try:
        got = gq.load_quantized(path)
    except Exception as e:  # noqa: BLE001 - any error here is a lost checkpoint
        msg = f"{DATA_LOST} load after SIGKILL failed: {type(e).__name__}: {e}"
        raise AssertionError(msg) from e
    for name, seed in (("A", 0), ("B", 1)):
        if same_tree(got, mlp_result(seed).variables):
            return name
    raise AssertionError(f"{DATA_LOST} the loaded variables are neither the old nor the new")


def _litter(path: Path) -> list[str]:
    return sorted(p.name for k in ("tmp", "old") for p in path.parent.glob(f".{path.name}.{k}-*"))


@fault("checkpoints", "data")
def test_sigkill_during_saves_never_loses_the_checkpoint(helper, tmp_path):
    rng = random.Random(20240611)
    paths = [tmp_path / f"run{i}" / "ck" for i in range(AT_ONCE)]
    for p in paths:
        gq.save_quantized(p, mlp_result(0))  # A is there before the first kill
    seen, mid_save = [], 0
    while len(seen) < KILLS:
        batch = paths[: min(AT_ONCE, KILLS - len(seen))]
        ready = [tmp_path / f"ready-{len(seen) + i}" for i in range(len(batch))]
        pids = [helper.run("loop", p, r) for p, r in zip(batch, ready)]
        for pid, r in zip(pids, ready):
            helper.wait_ready(pid, r)
        for pid in pids:  # each killed after its own seeded random delay
            time.sleep(rng.uniform(0.0, MAX_DELAY / len(pids)))
            os.kill(pid, signal.SIGKILL)
        for pid, p in zip(pids, batch):
            check(helper.reap(pid) == -signal.SIGKILL, f"saver {pid} was not the one killed")
            seen.append(_state(p))
            mid_save += bool(_litter(p))  # a temporary left behind: killed inside a save
            bad = sorted(e for e in os.listdir(p.parent)
                         if e != "ck" and not e.startswith((".ck.tmp-", ".ck.old-")))  # fmt: skip
            check(not bad, f"unexpected entries beside the checkpoint: {bad}", DATA_LOST)
    print(f"after each of {len(seen)} kills the path held {''.join(seen)}; {mid_save} kills "
          "left a temporary (landed inside a save)")  # fmt: skip
    for p in paths:  # a final, complete save cleans up every temporary a kill left behind
        gq.save_quantized(p, mlp_result(1), overwrite=True)
        check(not _litter(p), f"litter after the final save: {_litter(p)}", DATA_LOST)
        check(_state(p) == "B", "the final save did not land")


@fault("checkpoints", "data")
def test_kill_between_the_two_renames_of_an_overwrite(helper, tmp_path):
    """A saver killed right after path was moved aside (before the new one is renamed in)."""
    path = tmp_path / "ck"
    gq.save_quantized(path, mlp_result(0))
    pid = helper.run("kill-between-renames", path, tmp_path / "unused")
    check(helper.reap(pid) == -signal.SIGKILL, "the saver was not killed between the renames")
    check(_state(path) in ("A", "B"), "no checkpoint")


@fault("checkpoints", "data")
def test_failed_save_after_a_swap_kill_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """The state a kill between the two renames leaves (path moved to .ck.old-*, a partial
    .ck.tmp-*), then a save that fails while writing (disk full): the old checkpoint must
    still be recoverable, not deleted as a stale sibling."""
    path = tmp_path / "ck"
    gq.save_quantized(path, mlp_result(0))
    os.rename(path, tmp_path / ".ck.old-0badf00d")
    (tmp_path / ".ck.tmp-0badf00d").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_write_arrays", disk_full)
    with pytest.raises(OSError):
        gq.save_quantized(path, mlp_result(1), overwrite=True)
    old = sorted(p.name for p in tmp_path.glob(".ck.old-*"))
    check(path.exists() or bool(old), "the old checkpoint was deleted: nothing is left", DATA_LOST)
