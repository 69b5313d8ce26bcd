"""Abstract forward pass that logs Dense/Conv/BatchNorm calls (Linen and NNX).

An adapter beside ``gpfq_jax.capture`` for two things it does not record:

* which BatchNorm directly follows a Dense/Conv (called next, on that layer's very output
  array), for BatchNorm folding;
* the first layer whose input does not fit its kernel, for a clear "wrong input shape" error.

One ``jax.eval_shape`` pass (no FLOPs). Linen calls are seen with ``nn.intercept_methods``; NNX
calls through a recording subclass swapped onto the layers of a throwaway ``nnx.merge`` copy
(the user's model is never touched).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

Path = tuple[Any, ...]


class InputShapeError(ValueError):
    """A layer's input does not fit its kernel (raised during the abstract pass)."""

    def __init__(self, name: str, got: tuple[int, ...], expected: str):
        self.name, self.got, self.expected = name, got, expected
        super().__init__(f"layer {name!r} expects inputs of shape {expected}, got {got}")


@dataclasses.dataclass(frozen=True)
class BNFollow:
    """A BatchNorm at ``bn_path`` applied directly to the output of the layer at ``path``.

    ``foldable`` is False (with ``reason``) when the BN is not in inference mode, does not
    normalize the last (output-channel) axis, or is masked.
    """

    path: Path
    bn_path: Path
    foldable: bool
    reason: str = ""
    epsilon: float = 1e-5


@dataclasses.dataclass
class _Event:
    path: Path
    kind: str  # "layer" | "bn"
    inp: Any
    out: Any = None
    reason: str = ""
    epsilon: float = 0.0


def _name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("inputs", kwargs.get("x"))


def _bn_reason(module: Any, x: Any, args: tuple, kwargs: dict) -> str:
    """Why this BN call cannot be folded ('' if it can)."""
    ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if ura is None:
        ura = module.use_running_average
    if ura is not True:
        return "not in inference mode (use_running_average is not True)"
    if kwargs.get("mask") is not None:
        return "masked"
    axis = module.axis
    ndim = len(getattr(x, "shape", ()))
    if not isinstance(axis, int) or axis not in (-1, ndim - 1):
        return f"normalizes axis {axis}, not the last (output-channel) axis"
    return ""


def _check_fit(name: str, x: Any, kernel_shape: tuple[int, ...], kind: str, groups: int) -> None:
    shape = tuple(getattr(x, "shape", ()))
    n_in = kernel_shape[-2] * groups
    if kind == "dense":
        if not shape or shape[-1] != kernel_shape[0]:
            raise InputShapeError(name, shape, f"(..., {kernel_shape[0]})")
        return
    nd = len(kernel_shape) - 2
    if len(shape) < nd + 1 or shape[-1] != n_in:
        raise InputShapeError(name, shape, f"(batch, {', '.join(['*'] * nd)}, {n_in})")


def _pairs(events: list[_Event]) -> list[BNFollow]:
    out = []
    for prev, ev in zip(events, events[1:]):
        if ev.kind == "bn" and prev.kind == "layer" and ev.inp is prev.out:
            out.append(BNFollow(prev.path, ev.path, not ev.reason, ev.reason, ev.epsilon))
    return out


# --------------------------------------------------------------------------- Linen


def _linen_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.BatchNorm):
        return "bn"
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv):
        return "conv"
    return None


def _linen_kernel_shape(params: Any, path: Path) -> tuple[int, ...] | None:
    node = params
    for key in (*path, "kernel"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return tuple(node.shape)


def _linen_trace(
    model: nn.Module, variables: Mapping, x: Any, apply_kwargs: dict
) -> list[BNFollow]:
    result: list[BNFollow] = []
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}

    def run(v, batch):
        events: list[_Event] = []

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            kind = _linen_kind(module)
            if context.method_name != "__call__" or kind is None:
                return next_fun(*args, **kwargs)
            path = tuple(module.path)
            x_in = _first_input(args, kwargs)
            if kind == "bn":
                reason = _bn_reason(module, x_in, args, kwargs)
                events.append(
                    _Event(path, "bn", x_in, reason=reason, epsilon=float(module.epsilon))
                )
                return next_fun(*args, **kwargs)
            kshape = _linen_kernel_shape(params, path)
            if kshape is not None:
                groups = module.feature_group_count if kind == "conv" else 1
                _check_fit(_name(path), x_in, kshape, kind, groups)
            ev = _Event(path, "layer", x_in)
            events.append(ev)
            ev.out = next_fun(*args, **kwargs)
            return ev.out

        with nn.intercept_methods(interceptor):
            model.apply(v, batch, **apply_kwargs)
        result.extend(_pairs(events))

    jax.eval_shape(run, variables, x)
    return result


# --------------------------------------------------------------------------- NNX

_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "gpfq_calls_hook", default=None
)


@functools.cache
def _recording(base: type) -> type:
    def __call__(self, *args, **kwargs):
        hook = _HOOK.get()
        call = lambda: base.__call__(self, *args, **kwargs)  # noqa: E731
        return call() if hook is None else hook(self, args, kwargs, call)

    return type(base)(
        f"_Traced{base.__name__}", (base,), {"__call__": __call__, "__module__": __name__}
    )


@contextlib.contextmanager
def _hook(fn: Callable) -> Iterator[None]:
    token = _HOOK.set(fn)
    try:
        yield
    finally:
        _HOOK.reset(token)


def _nnx_kind(module: Any) -> str | None:
    if isinstance(module, nnx.BatchNorm):
        return "bn"
    if isinstance(module, nnx.Linear):
        return "dense"
    if isinstance(module, nnx.Conv):
        return "conv"
    return None


def _nnx_trace(model: nnx.Module, x: Any, apply_kwargs: dict) -> list[BNFollow]:
    graphdef, state = nnx.split(model)
    result: list[BNFollow] = []

    def run(st, batch):
        m = nnx.merge(graphdef, st)
        paths = {}
        for path, mod in list(nnx.iter_modules(m)):
            if _nnx_kind(mod) is not None and id(mod) not in paths:
                paths[id(mod)] = tuple(path)
                mod.__class__ = _recording(type(mod))
        events: list[_Event] = []

        def hook(mod, args, kwargs, call):
            path, kind, x_in = paths[id(mod)], _nnx_kind(mod), _first_input(args, kwargs)
            if kind == "bn":
                events.append(
                    _Event(
                        path,
                        "bn",
                        x_in,
                        reason=_bn_reason(mod, x_in, args, kwargs),
                        epsilon=float(mod.epsilon),
                    )
                )
                return call()
            groups = mod.feature_group_count if kind == "conv" else 1
            _check_fit(_name(path), x_in, tuple(mod.kernel[...].shape), kind, groups)
            ev = _Event(path, "layer", x_in)
            events.append(ev)
            ev.out = call()
            return ev.out

        with _hook(hook):
            m(batch, **apply_kwargs)
        result.extend(_pairs(events))

    jax.eval_shape(run, state, x)
    return result


def trace_bn_follows(model: Any, variables: Any, x: Any, apply_kwargs: dict) -> list[BNFollow]:
    """BatchNorms that directly follow a Dense/Conv, in forward order.

    Also checks every Dense/Conv input against its kernel: raises ``InputShapeError`` for the
    first layer whose input does not fit. Other failures of the model propagate unchanged.
    """
    if isinstance(model, nnx.Module):
        return _nnx_trace(model, x, apply_kwargs)
    return _linen_trace(model, variables, x, apply_kwargs)


__all__ = ["BNFollow", "InputShapeError", "trace_bn_follows"]
