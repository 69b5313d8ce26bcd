"""One interception mechanism for Linen and NNX layer calls.

``intercepted_forward`` runs a model's forward pass with a hook called on every Dense / Conv /
DenseGeneral / Einsum / BatchNorm call (and on unsupported kernel layers). Linen calls are seen
through ``flax.linen.intercept_methods``. NNX has no interception hook: the state is merged into a
throwaway module copy (``nnx.merge``) whose observed modules get their class swapped to a
recording subclass (cached per class) that reports each call to the hook active in a context
variable; the user's model is never touched. The abstract pass that maps a model
(``gpfq_jax.flax.tracing``) and the jitted input capturers (``gpfq_jax.flax.capture``) both
run through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from gpfq_jax.flax.paths import Path, path_name

SUPPORTED = (
    "supported layers: Dense / nnx.Linear (kernel (in, out) applied to the last axis), "
    "Conv / nnx.Conv (shared-weight convolution, zero padding), DenseGeneral / "
    "nnx.LinearGeneral and Einsum / nnx.Einsum (one kernel operand)"
)

# (Linen classes, NNX classes) per kind. Unsupported kernel layers are listed so that they
# raise instead of being left float silently.
_KINDS = (
    ("unsupported", (nn.ConvTranspose, nn.ConvLocal), (nnx.ConvTranspose,)),
    ("bn", (nn.BatchNorm,), (nnx.BatchNorm,)),
    ("dense", (nn.Dense,), (nnx.Linear,)),
    ("conv", (nn.Conv,), (nnx.Conv,)),
    ("dense_general", (nn.DenseGeneral,), (nnx.LinearGeneral,)),
    ("einsum", (nn.Einsum,), (nnx.Einsum,)),
    ("embed", (nn.Embed,), (nnx.Embed,)),
)  # fmt: skip
HookFn = Callable[[Any, Path, str, tuple, dict, Callable[[], Any]], Any]


def layer_kind(module: Any) -> str | None:
    """'dense', 'conv', 'dense_general', 'einsum', 'embed', 'bn', 'unsupported', or None (not
    a layer this package looks at)."""
    for kind, linen, nnx_classes in _KINDS:
        if isinstance(module, linen + nnx_classes):
            return kind
    return None


def is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


# --------------------------------------------------------------------------- interception

_NNX_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "gpfq_nnx_hook", default=None
)
_TAG = "_gpfq_path"


@functools.cache
def _recording_class(base: type) -> type:
    """Subclass of ``base`` whose __call__ reports to the active NNX hook (if any)."""

    def __call__(self, *args, **kwargs):
        hook = _NNX_HOOK.get()
        call = lambda: base.__call__(self, *args, **kwargs)  # noqa: E731
        return call() if hook is None else hook(self, args, kwargs, call)

    return type(base)(f"_Recording{base.__name__}", (base,), {"__call__": __call__})


def recorded_base(module: Any) -> type:
    """The user's class of a module (behind the recording subclass, if one was swapped in)."""
    return type(module).__mro__[1] if hasattr(module, _TAG) else type(module)


@contextlib.contextmanager
def _nnx_hook(hook: Callable) -> Iterator[None]:
    token = _NNX_HOOK.set(hook)
    try:
        yield
    finally:
        _NNX_HOOK.reset(token)


def intercepted_forward(
    model: Any,
    graphdef: Any,
    variables_or_state: Any,
    args: tuple,
    kwargs: dict,
    hook: HookFn,
    only: Path | None = None,
    watch: frozenset[Path] = frozenset(),
) -> Any:
    """Run ``model(*args, **kwargs)``, calling ``hook(module, path, kind, args, kwargs, call)``
    on every layer call of a known kind (``call()`` runs the layer; the hook returns its output).

    Linen: ``model.apply(variables, *args, **kwargs)``. NNX: ``graphdef`` and the state of
    ``nnx.split(model)``; the call runs on a merged copy (``model`` itself is not used).
    ``only``: observe just the layer at this path (NNX installs one recorder; Linen filters).
    ``watch``: paths of other modules (blocks) whose ``__call__`` the hook also sees, with kind
    "block". Paths are relative to the module run.
    """
    if graphdef is None:

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            path = tuple(module.path)
            kind = None
            if context.method_name == "__call__":
                kind = "block" if path in watch else layer_kind(module)
            if kind is None or (only is not None and path != only):
                return next_fun(*call_args, **call_kwargs)
            run = lambda: next_fun(*call_args, **call_kwargs)  # noqa: E731
            return hook(module, path, kind, call_args, call_kwargs, run)

        with nn.intercept_methods(interceptor):
            return model.apply(variables_or_state, *args, **kwargs)

    copy = nnx.merge(graphdef, variables_or_state)
    for path, mod in list(nnx.iter_modules(copy)):
        path = tuple(path)
        kind = "block" if path in watch else layer_kind(mod)
        if kind is not None and (only is None or path == only):
            if not hasattr(mod, _TAG):  # a module reachable by two paths keeps the first
                mod.__class__ = _recording_class(type(mod))
                setattr(mod, _TAG, (path, kind))

    def nnx_hook(mod, call_args, call_kwargs, call):
        path, kind = getattr(mod, _TAG)
        return hook(mod, path, kind, call_args, call_kwargs, call)

    with _nnx_hook(nnx_hook):
        return copy(*args, **kwargs)


def outer_trace(tree: Any) -> Any:
    """The trace of the first traced leaf of ``tree`` (the top-level trace), or None."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return getattr(leaf, "_trace", None)
    return None


def check_not_lifted(x: Any, outer: Any, path: Path) -> None:
    """Raise if ``x`` belongs to an inner trace (layer inside scan/vmap/remat/...)."""
    trace = getattr(x, "_trace", None) if isinstance(x, jax.core.Tracer) else None
    if outer is not None and trace is not None and trace is not outer:
        raise NotImplementedError(
            f"layer {path_name(path)!r} is called inside a lifted transform (nn.scan / nn.vmap "
            "/ nn.remat / nnx.scan / nnx.vmap / nnx.remat / jax transforms inside the model); "
            f"capturing its inputs is not supported. {SUPPORTED}, called directly in the "
            "forward pass."
        )


__all__ = [
    "SUPPORTED",
    "HookFn",
    "layer_kind",
    "is_nnx",
    "intercepted_forward",
    "outer_trace",
    "check_not_lifted",
    "recorded_base",
]
