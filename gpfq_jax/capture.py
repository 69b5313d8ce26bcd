"""Model traversal and layer-input capture for Flax Linen and NNX models.

``discover_layers`` lists every quantizable layer (Dense / nnx.Linear, Conv / nnx.Conv) in the
order of its first call in the forward pass; ``make_input_capturer`` builds a jitted function
that returns one layer's input for a batch; ``get_kernel`` / ``set_kernel`` read and write a
layer's kernel functionally.

Linen: calls are observed with ``flax.linen.intercept_methods``; the capturer is
``jax.jit(f)(variables, batch)``.

NNX: NNX has no method-interception hook. The model is split once (``nnx.split``) into a fixed
graphdef and a state; inside the traced function the state is merged into a fresh module copy,
and the instance(s) to observe get their class swapped to a recording subclass (cached per
layer class) whose ``__call__`` reports its inputs to a hook active only while tracing. Only
this throwaway copy is touched: the user's model is never mutated. The capturer takes
``f(state, batch)`` with ``state = nnx.state(model)`` (a model is accepted too and converted).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.linen.linear import canonicalize_padding

Path = tuple[Any, ...]

SUPPORTED = (
    "supported layers: Dense / nnx.Linear (kernel (in, out) applied to the last axis) and "
    "Conv / nnx.Conv (shared-weight convolution, zero padding)"
)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer found by :func:`discover_layers`.

    ``path``: Linen: module path inside ``variables['params']``; NNX: attribute path to the
    module. Conv fields are normalized for ``jax.lax.conv_general_dilated`` (NHWC, explicit
    padding resolved for the discovered ``input_shape``); they are ``None`` for dense layers.
    """

    path: tuple[Any, ...]
    name: str
    kind: str
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None
    input_dilation: tuple[int, ...] | None = None
    kernel_dilation: tuple[int, ...] | None = None
    feature_group_count: int = 1
    has_bias: bool = False
    call_index: int = 0


# --------------------------------------------------------------------------- common helpers


def _name(path: Path) -> str:
    return "/".join(str(p) for p in path)


def _is_nnx(model: Any) -> bool:
    return isinstance(model, nnx.Module)


def _first_input(args: tuple, kwargs: dict) -> Any:
    """The layer input: first positional argument, else the ``inputs`` keyword."""
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise TypeError(f"cannot find the layer input in call arguments {list(kwargs)}")


def _outer_trace(tree: Any) -> Any:
    """The trace of the first traced leaf of ``tree`` (the top-level trace), or None."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return getattr(leaf, "_trace", None)
    return None


def _check_not_lifted(x: Any, outer: Any, path: Path) -> None:
    """Raise if ``x`` belongs to an inner trace (layer inside scan/vmap/remat/...)."""
    trace = getattr(x, "_trace", None) if isinstance(x, jax.core.Tracer) else None
    if outer is not None and trace is not None and trace is not outer:
        raise NotImplementedError(
            f"layer {_name(path)!r} is called inside a lifted transform (nn.scan / nn.vmap / "
            "nn.remat / nnx.scan / nnx.vmap / nnx.remat / jax transforms inside the model); "
            f"capturing its inputs is not supported. {SUPPORTED}, called directly in the "
            "forward pass."
        )


def _tuple(x: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    """Broadcast an int (or None = 1) to an n-tuple, as Flax's conv does."""
    if x is None:
        x = 1
    if isinstance(x, int):
        return (x,) * n
    return tuple(int(v) for v in x)


def _kernel_size(kernel_size: int | Sequence[int]) -> tuple[int, ...]:
    return (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)


def _resolve_padding(
    padding: Any,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    input_dilation: tuple[int, ...],
    kernel_dilation: tuple[int, ...],
    spatial: tuple[int, ...],
    path: Path,
) -> tuple[tuple[int, int], ...]:
    """Explicit (lo, hi) zero padding per spatial dim, as conv_general_dilated applies it."""
    pad = canonicalize_padding(padding, len(kernel_size))
    if not isinstance(pad, str):
        return tuple((int(lo), int(hi)) for lo, hi in pad)
    mode = pad.upper()
    if mode in ("CIRCULAR", "REFLECT", "CAUSAL"):
        raise NotImplementedError(
            f"conv layer {_name(path)!r} uses padding={pad!r}, which pads the input before the "
            f"convolution; only zero padding ('SAME', 'VALID', explicit pairs) is supported."
        )
    if mode == "VALID":
        return tuple((0, 0) for _ in kernel_size)
    if any(d != 1 for d in input_dilation):
        raise NotImplementedError(
            f"conv layer {_name(path)!r}: padding={pad!r} with input_dilation "
            f"{input_dilation} is not supported; use explicit padding."
        )
    eff = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation))
    pads = jax.lax.padtype_to_pads(spatial, eff, strides, mode)
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _conv_fields(
    kernel_size: int | Sequence[int],
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
    input_shape: tuple[int, ...],
    path: Path,
) -> dict[str, Any]:
    """Normalized conv geometry (strides, padding, dilations) for LayerInfo."""
    ks = _kernel_size(kernel_size)
    n = len(ks)
    st, ind, kd = _tuple(strides, n), _tuple(input_dilation, n), _tuple(kernel_dilation, n)
    spatial = tuple(input_shape[-(n + 1) : -1])
    pad = _resolve_padding(padding, ks, st, ind, kd, spatial, path)
    return {"strides": st, "padding": pad, "input_dilation": ind, "kernel_dilation": kd}


def _make_info(
    path: Path,
    kind: str,
    kernel_shape: tuple[int, ...],
    input_shape: tuple[int, ...],
    conv: dict[str, Any] | None,
    groups: int,
    has_bias: bool,
    call_index: int,
) -> LayerInfo:
    return LayerInfo(
        path=tuple(path),
        name=_name(path),
        kind=kind,
        kernel_shape=tuple(int(s) for s in kernel_shape),
        input_shape=tuple(int(s) for s in input_shape),
        feature_group_count=int(groups),
        has_bias=bool(has_bias),
        call_index=call_index,
        **(conv or {}),
    )


def _unsupported_error(found: list[tuple[Path, str]]) -> NotImplementedError:
    items = ", ".join(f"{_name(p)!r} ({t})" for p, t in found)
    return NotImplementedError(f"unsupported layer(s) in the forward pass: {items}; {SUPPORTED}.")


def _shared_error(path: Path, n: int) -> ValueError:
    return ValueError(
        f"shared layer {_name(path)!r} called {n} times is not supported: each quantizable "
        "layer must be called exactly once per forward pass."
    )


class _CallLog:
    """Records supported calls (in order), unsupported calls and call counts."""

    def __init__(self) -> None:
        self.infos: dict[Path, dict[str, Any]] = {}
        self.counts: dict[Path, int] = {}
        self.unsupported: dict[Path, str] = {}

    def add(self, path: Path, record: dict[str, Any] | None, type_name: str) -> None:
        self.counts[path] = self.counts.get(path, 0) + 1
        if record is None:
            self.unsupported.setdefault(path, type_name)
        else:
            self.infos.setdefault(path, record)

    def layers(self) -> list[LayerInfo]:
        if self.unsupported:
            raise _unsupported_error(list(self.unsupported.items()))
        for path, n in self.counts.items():
            if n > 1:
                raise _shared_error(path, n)
        return [_make_info(call_index=i, **rec) for i, rec in enumerate(self.infos.values())]


# --------------------------------------------------------------------------- Linen

_LINEN_UNSUPPORTED = (nn.DenseGeneral, nn.Einsum, nn.ConvTranspose, nn.ConvLocal)


def _linen_kind(module: nn.Module) -> str | None:
    """'dense', 'conv', 'unsupported', or None (not a kernel layer)."""
    if isinstance(module, _LINEN_UNSUPPORTED):
        return "unsupported"
    if isinstance(module, nn.Dense):
        return "dense"
    if isinstance(module, nn.Conv):
        return "conv"
    return None


def _module_conv_fields(module: Any, shape: tuple[int, ...], path: Path):
    """``_conv_fields`` of a Linen nn.Conv or NNX nnx.Conv module (same attribute names)."""
    if module.mask is not None:
        raise NotImplementedError(f"masked conv layer {_name(path)!r} is not supported")
    return _conv_fields(
        module.kernel_size,
        module.strides,
        module.padding,
        module.input_dilation,
        module.kernel_dilation,
        shape,
        path,
    )


def _linen_record(module: nn.Module, kind: str, x: Any, params: Any) -> dict[str, Any]:
    """LayerInfo fields for a Linen Dense/Conv call with input ``x``."""
    path = tuple(module.path)
    kernel = _linen_kernel_leaf(params, path)
    shape = tuple(jnp.shape(x))
    conv = None
    if kind == "conv":
        conv = _module_conv_fields(module, shape, path)
        ks = _kernel_size(module.kernel_size)
        expected = ks + (shape[-1] // module.feature_group_count, module.features)
    else:
        expected = (shape[-1], module.features)
    if tuple(kernel.shape) != expected:
        raise NotImplementedError(
            f"layer {_name(path)!r}: stored kernel shape {tuple(kernel.shape)} does not match "
            f"its call (input {shape}); stacked kernels (nn.scan / nn.vmap) are not supported."
        )
    groups = module.feature_group_count if kind == "conv" else 1
    return {
        "path": path,
        "kind": kind,
        "kernel_shape": tuple(kernel.shape),
        "input_shape": shape,
        "conv": conv,
        "groups": groups,
        "has_bias": module.use_bias,
    }


def _linen_kernel_leaf(params: Any, path: Path) -> Any:
    node = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"no parameters at path {_name(path)!r} in variables['params']")
        node = node[key]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise KeyError(f"no 'kernel' at variables['params'][{_name(path)!r}]")
    return node["kernel"]


def _linen_discover(
    model: nn.Module, variables: Mapping, sample_input: Any, apply_kwargs: dict
) -> list[LayerInfo]:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("Linen models need the variables dict with a 'params' collection")
    log = _CallLog()
    params = variables["params"]

    def run(v: Any, x: Any) -> None:
        outer = _outer_trace(x)
        active: set[Path] = set()

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            kind = _linen_kind(module)
            path = tuple(module.path)
            if context.method_name != "__call__" or kind is None or path in active:
                return next_fun(*args, **kwargs)
            x_in = _first_input(args, kwargs)
            _check_not_lifted(x_in, outer, path)
            rec = None if kind == "unsupported" else _linen_record(module, kind, x_in, params)
            log.add(path, rec, type(module).__name__)
            active.add(path)
            try:
                return next_fun(*args, **kwargs)
            finally:
                active.discard(path)

        with nn.intercept_methods(interceptor):
            model.apply(v, x, **apply_kwargs)

    jax.eval_shape(run, variables, sample_input)
    return log.layers()


def _linen_capturer(model: nn.Module, layer: LayerInfo, apply_kwargs: dict) -> Callable:
    def capture(variables: Any, batch: Any) -> jax.Array:
        outer = _outer_trace(batch)
        box: list[Any] = []

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if (
                not box
                and context.method_name == "__call__"
                and _linen_kind(module) == layer.kind
                and tuple(module.path) == layer.path
            ):
                box.append(_first_input(args, kwargs))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, batch, **apply_kwargs)
        return _unbox(box, outer, layer)

    return jax.jit(capture)


def _unbox(box: list[Any], outer: Any, layer: LayerInfo) -> jax.Array:
    if not box:
        raise ValueError(f"layer {layer.name!r} was not called in the forward pass")
    _check_not_lifted(box[0], outer, layer.path)
    return box[0]


# --------------------------------------------------------------------------- NNX

_NNX_UNSUPPORTED = (nnx.LinearGeneral, nnx.Einsum, nnx.ConvTranspose)
_NNX_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "gpfq_nnx_hook", default=None
)
_TAG = "_gpfq_capture_path"


def _nnx_kind(module: Any) -> str | None:
    if isinstance(module, _NNX_UNSUPPORTED):
        return "unsupported"
    if isinstance(module, nnx.Linear):
        return "dense"
    if isinstance(module, nnx.Conv):
        return "conv"
    return None


@functools.cache
def _recording_class(base: type) -> type:
    """Subclass of ``base`` whose __call__ reports (module, args, kwargs) to the active hook."""

    def __call__(self, *args, **kwargs):
        hook = _NNX_HOOK.get()
        if hook is None:
            return base.__call__(self, *args, **kwargs)
        return hook(self, args, kwargs, lambda: base.__call__(self, *args, **kwargs))

    name = f"_Recording{base.__name__}"
    return type(base)(name, (base,), {"__call__": __call__, "__module__": __name__})


def _install_recorder(module: nnx.Module, path: Path) -> None:
    """Swap ``module``'s class for its recording subclass (on a throwaway copy only)."""
    module.__class__ = _recording_class(type(module))
    setattr(module, _TAG, tuple(path))


@contextlib.contextmanager
def _nnx_hook(hook: Callable) -> Iterator[None]:
    token = _NNX_HOOK.set(hook)
    try:
        yield
    finally:
        _NNX_HOOK.reset(token)


def _nnx_child(node: Any, key: Any) -> Any:
    if isinstance(key, int) or isinstance(node, (Mapping, list, tuple)):
        return node[key]
    return getattr(node, key)


def _nnx_module_at(model: Any, path: Path) -> Any:
    node = model
    try:
        for key in path:
            node = _nnx_child(node, key)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise KeyError(f"no module at path {_name(path)!r} in the NNX model") from e
    return node


def _nnx_record(module: Any, kind: str, x: Any, path: Path) -> dict[str, Any]:
    shape = tuple(jnp.shape(x))
    kshape = tuple(module.kernel[...].shape)
    conv, groups = None, 1
    if kind == "conv":
        conv = _module_conv_fields(module, shape, path)
        groups = module.feature_group_count
    return {
        "path": path,
        "kind": kind,
        "kernel_shape": kshape,
        "input_shape": shape,
        "conv": conv,
        "groups": groups,
        "has_bias": module.bias is not None,
    }


def _warn_if_training(model: nnx.Module) -> None:
    for path, m in nnx.iter_modules(model):
        if getattr(m, "use_running_average", None) is False or (
            getattr(m, "deterministic", None) is False and getattr(m, "rate", 0) > 0
        ):
            warnings.warn(
                f"NNX module {_name(path) or '<root>'!r} ({type(m).__name__}) is in training "
                "mode; captured inputs will use batch statistics / dropout. Call model.eval() "
                "first.",
                stacklevel=4,
            )
            return


def _nnx_discover(model: nnx.Module, sample_input: Any, apply_kwargs: dict) -> list[LayerInfo]:
    _warn_if_training(model)
    graphdef, state = nnx.split(model)
    log = _CallLog()

    def run(st: Any, x: Any) -> None:
        outer = _outer_trace(x)
        m = nnx.merge(graphdef, st)
        for path, mod in list(nnx.iter_modules(m)):
            if _nnx_kind(mod) is not None:
                _install_recorder(mod, path)
        active: set[Path] = set()

        def hook(mod, args, kwargs, call):
            path, kind = getattr(mod, _TAG), _nnx_kind(mod)
            if path in active:
                return call()
            x_in = _first_input(args, kwargs)
            _check_not_lifted(x_in, outer, path)
            rec = None if kind == "unsupported" else _nnx_record(mod, kind, x_in, path)
            log.add(path, rec, type(mod).__mro__[1].__name__)
            active.add(path)
            try:
                return call()
            finally:
                active.discard(path)

        with _nnx_hook(hook):
            m(x, **apply_kwargs)

    jax.eval_shape(run, state, sample_input)
    return log.layers()


def _nnx_capturer(model: nnx.Module, layer: LayerInfo, apply_kwargs: dict) -> Callable:
    graphdef, _ = nnx.split(model)
    _nnx_module_at(model, layer.path)  # validate the path early

    def capture(state: Any, batch: Any) -> jax.Array:
        outer = _outer_trace(batch)
        m = nnx.merge(graphdef, state)
        _install_recorder(_nnx_module_at(m, layer.path), layer.path)
        box: list[Any] = []

        def hook(mod, args, kwargs, call):
            if not box and getattr(mod, _TAG, None) == layer.path:
                box.append(_first_input(args, kwargs))
            return call()

        with _nnx_hook(hook):
            m(batch, **apply_kwargs)
        return _unbox(box, outer, layer)

    jitted = jax.jit(capture)

    def capturer(state_or_model: Any, batch: Any) -> jax.Array:
        return jitted(_as_state(state_or_model, graphdef), batch)

    def lower(state_or_model: Any, batch: Any) -> Any:
        return jitted.lower(_as_state(state_or_model, graphdef), batch)

    capturer.lower = lower  # type: ignore[attr-defined]
    capturer.jitted = jitted  # type: ignore[attr-defined]
    return capturer


def _as_state(state_or_model: Any, graphdef: Any) -> Any:
    """The state of a model (checked against the capturer's graph), or the state as given."""
    if not isinstance(state_or_model, nnx.Module):
        return state_or_model
    other, state = nnx.split(state_or_model)
    if other != graphdef:
        raise ValueError(
            "this NNX model's graph (module types, static attributes) differs from the model "
            "the capturer was built for; pass a copy made with set_kernel / nnx.clone"
        )
    return state


def _nnx_state_kernel(state: nnx.State, path: Path) -> Any:
    node: Any = state
    try:
        for key in path:
            node = node[key]
        return node["kernel"]
    except (KeyError, IndexError, TypeError) as e:
        raise KeyError(f"no kernel at path {_name(path)!r} in the NNX state") from e


# --------------------------------------------------------------------------- public API


def discover_layers(
    model: Any, variables: Any, sample_input: Any, **apply_kwargs
) -> list[LayerInfo]:
    """Quantizable layers of ``model`` in the order of their first call.

    Linen: ``variables`` is the variables dict, ``apply_kwargs`` go to ``model.apply`` (pass
    e.g. ``train=False`` for inference mode). NNX: ``variables`` must be None and
    ``apply_kwargs`` go to ``model(x, ...)``; put the model in eval mode first (``.eval()``).
    Runs one abstract forward pass (``jax.eval_shape``: no FLOPs). Raises NotImplementedError
    for unsupported kernel layers and ValueError for a layer called more than once.
    """
    if _is_nnx(model):
        _require_none(variables)
        return _nnx_discover(model, sample_input, apply_kwargs)
    return _linen_discover(model, variables, sample_input, apply_kwargs)


def make_input_capturer(
    model: Any, variables_or_none: Any, layer: LayerInfo, **apply_kwargs
) -> Callable[[Any, Any], jax.Array]:
    """Jitted ``f(variables_or_state, batch) -> input of layer``.

    Only the layer's input is returned, so XLA prunes everything downstream. ``f`` recompiles
    only when the tree structure, shapes or dtypes of its arguments change. Linen: pass the
    variables dict. NNX: pass ``nnx.state(m)`` (or ``m`` itself) for a model ``m`` with the
    same graph as ``model`` (e.g. from :func:`set_kernel`).
    """
    if _is_nnx(model):
        _require_none(variables_or_none)
        return _nnx_capturer(model, layer, apply_kwargs)
    if variables_or_none is not None:
        _linen_kernel_leaf(variables_or_none["params"], layer.path)
    return _linen_capturer(model, layer, apply_kwargs)


def get_kernel(model_or_variables: Any, layer: LayerInfo) -> jax.Array:
    """The layer's kernel from Linen variables, an NNX model or an NNX state."""
    if isinstance(model_or_variables, nnx.State):
        return _nnx_state_kernel(model_or_variables, layer.path)[...]
    if _is_nnx(model_or_variables):
        return _nnx_module_at(model_or_variables, layer.path).kernel[...]
    return _linen_kernel_leaf(model_or_variables["params"], layer.path)


def set_kernel(model_or_variables: Any, layer: LayerInfo, new_kernel: jax.Array) -> Any:
    """Copy of the input with the layer's kernel replaced (cast to the old dtype).

    Linen variables -> new variables dict (sharing untouched subtrees); NNX model -> new model
    (``nnx.clone``); NNX state -> new state. The input is never modified.
    """
    old = get_kernel(model_or_variables, layer)
    new = _checked_kernel(old, new_kernel, layer)
    if isinstance(model_or_variables, nnx.State):
        state = jax.tree.map(lambda a: a, model_or_variables)
        _nnx_state_kernel(state, layer.path).set_value(new)
        return state
    if _is_nnx(model_or_variables):
        clone = nnx.clone(model_or_variables)
        _nnx_module_at(clone, layer.path).kernel.set_value(new)
        return clone
    return _replace_in(model_or_variables, ("params", *layer.path, "kernel"), new)


def _checked_kernel(old: jax.Array, new: Any, layer: LayerInfo) -> jax.Array:
    new = jnp.asarray(new)
    if new.shape != old.shape:
        raise ValueError(
            f"new kernel for {layer.name!r} has shape {new.shape}, expected {old.shape}"
        )
    return new.astype(old.dtype)


def _replace_in(tree: Mapping, path: Path, value: Any) -> Mapping:
    """Functional nested-dict update keeping the container type (dict / FrozenDict)."""
    key, rest = path[0], path[1:]
    child = value if not rest else _replace_in(tree[key], rest, value)
    items = {**tree, key: child}
    return FrozenDict(items) if isinstance(tree, FrozenDict) else items


def _require_none(variables: Any) -> None:
    if variables is not None:
        raise TypeError(
            "for an NNX model pass variables=None (the model holds its own state); "
            f"got {type(variables).__name__}"
        )
