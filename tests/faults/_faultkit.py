"""Shared helpers of the fault suite (tests/faults): verdict checks, tiny models, checkpoints.

Every failure of a fault test carries one tag, so that ``conftest.py`` can count it:

  [unclear error]       an error was raised, but of another type or without the key words
  [silent wrong result] no error where one was due, or a result that is not the right one
  [data lost]           a checkpoint (or a user's file) was damaged, lost or unreadable
  anything else         counted as a crash (an exception where a result was due)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gpfq_jax as gq

UNCLEAR = "[unclear error]"
SILENT = "[silent wrong result]"
DATA_LOST = "[data lost]"

# --------------------------------------------------------------------------- verdicts


def expect_error(call: Callable[[], Any], exc: type[BaseException], pattern: str) -> BaseException:
    """``call()`` must raise exactly ``exc`` with a message matching ``pattern`` (re.search)."""
    try:
        out = call()
    except Exception as e:  # noqa: BLE001 - classify every exception
        if type(e) is not exc:
            raise AssertionError(
                f"{UNCLEAR} expected {exc.__name__}, got {type(e).__name__}: {e}"
            ) from e
        if not re.search(pattern, str(e), flags=re.S):
            raise AssertionError(
                f"{UNCLEAR} the {exc.__name__} message does not match {pattern!r}: {e}"
            ) from e
        return e
    raise AssertionError(f"{SILENT} no error was raised; the call returned {type(out).__name__}")


def check(ok: bool, message: str, tag: str = SILENT) -> None:
    """Assert ``ok``, tagging the failure (default: a silent wrong result)."""
    if not ok:
        raise AssertionError(f"{tag} {message}")


def error_cases(*rows: tuple) -> list:
    """pytest.params from rows ``(id, call, exc, pattern[, bug])``; a row with a ``bug``
    string is a known library bug: ``xfail(strict=True, reason="BUG: ...")``."""
    out = []
    for row in rows:
        case_id, call, exc, pattern, *bug = row
        marks = [xfail_bug(bug[0])] if bug else []
        out.append(pytest.param(call, exc, pattern, id=case_id, marks=marks))
    return out


BUG_TAGS = (UNCLEAR, SILENT, DATA_LOST)


def xfail_bug(text: str):
    """A known library bug: ``xfail(strict=True, reason="BUG: [kind] ...")``; ``text`` starts
    with the tag of what goes wrong (unclear error, silent wrong result, data lost)."""
    assert text.startswith(BUG_TAGS), f"a bug's text must start with one of {BUG_TAGS}: {text}"
    return pytest.mark.xfail(strict=True, reason=f"BUG: {text}")


def fault(kind: str, expect: str = "error"):
    """Mark a test for the counts: its class of input and what it expects
    ("error": a clear error; "result": the correct result; "data": no data lost)."""
    return pytest.mark.fault(kind, expect)


# --------------------------------------------------------------------------- data


def normal(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def poke(a: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    """A copy of ``a`` with ``a[index] = value``."""
    out = np.array(a, copy=True)
    out[index] = value
    return out


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Flatten, Dense(8), relu, Dense(3): layers Dense_0 and Dense_1."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class NMLP(nnx.Module):
    """nnx.Linear(6, 8), relu, nnx.Linear(8, 3): layers l1 and l2."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


CALIB = normal((32, 6), seed=1)  # the MLPs' calibration inputs (32 samples of 6 features)


@functools.cache
def linen_variables(seed: int = 0) -> Any:
    return MLP().init(jax.random.PRNGKey(seed), CALIB[:1])


def nnx_model(seed: int = 0) -> NMLP:
    return NMLP(nnx.Rngs(seed))


def qp(model: Any = None, variables: Any = "default", calib: Any = None, **kwargs) -> Any:
    """``quantize_params`` on the Linen MLP by default, without a progress bar."""
    model = MLP() if model is None else model
    if isinstance(variables, str) and variables == "default":
        variables = linen_variables()
    kwargs.setdefault("progress", False)
    return gq.quantize_params(model, variables, CALIB if calib is None else calib, **kwargs)


@functools.cache
def mlp_result(seed: int = 0) -> Any:
    """A deterministic QuantizeResult of the Linen MLP (initialised from ``seed``)."""
    return gq.quantize_params(
        MLP(), linen_variables(seed), CALIB, method="rtn", progress=False
    )  # fmt: skip


# --------------------------------------------------------------------------- trees


def flat(tree: Any) -> dict[tuple, np.ndarray]:
    """{key path (str/int entries): numpy array} of a nested mapping of arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        key = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        out[key] = np.asarray(leaf)
    return out


def same_tree(a: Any, b: Any) -> bool:
    """Same key paths, dtypes, shapes and bytes."""
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(
        fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa
    )


def as_f32(a: Any) -> jax.Array:
    return jnp.asarray(a, jnp.float32)
