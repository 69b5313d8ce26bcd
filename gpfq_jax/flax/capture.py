"""Layer-input capture and functional kernel access for Linen and NNX models.

``make_input_capturer`` builds a jitted function that returns one layer's input for a batch:
the forward pass runs under ``intercept.intercepted_forward`` and everything downstream of the
layer is pruned by XLA. ``get_kernel`` / ``set_kernel`` read and write a layer's kernel
without modifying their input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpfq_jax.flax.intercept import check_not_lifted, intercepted_forward, is_nnx, outer_trace
from gpfq_jax.flax.paths import Path, first_input, get_in, module_at, path_name, replace_in
from gpfq_jax.flax.tracing import LayerInfo, require_no_variables


def _linen_kernel(variables: Any, layer: LayerInfo) -> Any:
    kernel = get_in(variables, ("params", *layer.path, layer.param))
    if kernel is None:
        raise KeyError(f"no {layer.param!r} at variables['params'][{layer.name!r}]")
    return kernel


def _state_kernel(state: nnx.State, layer: LayerInfo) -> Any:
    node: Any = state
    try:
        for key in layer.path:
            node = node[key]
        return node[layer.param]
    except (KeyError, IndexError, TypeError) as e:
        raise KeyError(f"no kernel at path {layer.name!r} in the NNX state") from e


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


_TRACES = [0]


def traced_functions() -> int:
    """How many capture / block functions have been traced (each trace is one compilation)
    in this process: a counter the driver reports differences of."""
    return _TRACES[0]


def count_trace() -> None:
    """Call inside a function being traced by ``jax.jit`` (runs once per compilation)."""
    _TRACES[0] += 1


def layer_input(
    model: Any,
    graphdef: Any,
    variables_or_state: Any,
    args: tuple,
    kwargs: dict,
    path: Path,
    kind: str,
) -> jax.Array:
    """The input of the layer at ``path`` (of ``kind``) when ``model(*args, **kwargs)`` runs
    (see ``intercepted_forward`` for the model arguments). Meant to be traced: everything
    downstream of the layer is pruned. Raises if the layer is not called or is inside a lifted
    transform."""
    count_trace()
    outer, box = outer_trace((args, kwargs)), []

    def hook(module, at, at_kind, call_args, call_kwargs, call):
        if not box and at_kind == kind:
            box.append(first_input(call_args, call_kwargs))
        return call()

    intercepted_forward(model, graphdef, variables_or_state, args, kwargs, hook, only=path)
    if not box:
        raise ValueError(f"layer {path_name(path)!r} was not called in the forward pass")
    check_not_lifted(box[0], outer, path)
    return box[0]


def output_and_layer_inputs(
    model: Any,
    graphdef: Any,
    variables_or_state: Any,
    args: tuple,
    kwargs: dict,
    wanted: Sequence[tuple[Path, str]],
) -> tuple[Any, list[jax.Array]]:
    """``(model(*args, **kwargs), [the input of each (path, kind) of wanted])`` from one
    forward pass (each layer's first call; model arguments as ``intercepted_forward``).
    Meant to be traced. Raises if a wanted layer is not called or is inside a lifted
    transform."""
    count_trace()
    outer, box, kinds = outer_trace((args, kwargs)), {}, dict(wanted)

    def hook(module, at, at_kind, call_args, call_kwargs, call):
        if at not in box and kinds.get(at) == at_kind:
            box[at] = first_input(call_args, call_kwargs)
        return call()

    out = intercepted_forward(model, graphdef, variables_or_state, args, kwargs, hook)
    for path, _ in wanted:
        if path not in box:
            raise ValueError(f"layer {path_name(path)!r} was not called in the forward pass")
        check_not_lifted(box[path], outer, path)
    return out, [box[path] for path, _ in wanted]


def make_input_capturer(
    model: Any, variables_or_none: Any, layer: LayerInfo, **apply_kwargs
) -> Callable[[Any, Any], jax.Array]:
    """Jitted ``f(variables_or_state, batch) -> input of layer``.

    Only the layer's input is returned, so XLA prunes everything downstream. ``f`` recompiles
    only when the tree structure, shapes or dtypes of its arguments change; ``f.lower`` lowers
    it. Linen: pass the variables dict. NNX: pass ``nnx.state(m)`` (or ``m`` itself) for a
    model ``m`` with the same graph as ``model`` (e.g. from :func:`set_kernel`).
    """
    graphdef = None
    if is_nnx(model):
        require_no_variables(variables_or_none)
        graphdef = nnx.graphdef(model)
        module_at(model, layer.path)  # validate the path early
    elif variables_or_none is not None:
        _linen_kernel(variables_or_none, layer)

    def capture(variables_or_state: Any, batch: Any) -> jax.Array:
        return layer_input(
            model, graphdef, variables_or_state, (batch,), apply_kwargs, layer.path, layer.kind
        )

    jitted = jax.jit(capture)
    if graphdef is None:
        return jitted

    def capturer(state_or_model: Any, batch: Any) -> jax.Array:
        return jitted(_as_state(state_or_model, graphdef), batch)

    capturer.lower = lambda s, b: jitted.lower(_as_state(s, graphdef), b)  # type: ignore[attr-defined]
    return capturer


def get_kernel(model_or_variables: Any, layer: LayerInfo) -> jax.Array:
    """The layer's kernel from Linen variables, an NNX model or an NNX state."""
    if isinstance(model_or_variables, nnx.State):
        return _state_kernel(model_or_variables, layer)[...]
    if is_nnx(model_or_variables):
        return getattr(module_at(model_or_variables, layer.path), layer.param)[...]
    return _linen_kernel(model_or_variables, layer)


def set_kernel(model_or_variables: Any, layer: LayerInfo, new_kernel: jax.Array) -> Any:
    """Copy of the input with the layer's kernel replaced (cast to the old dtype).

    Linen variables -> new variables dict (sharing untouched subtrees); NNX model -> new model
    (``nnx.clone``); NNX state -> new state. The input is never modified.
    """
    old = get_kernel(model_or_variables, layer)
    new = jnp.asarray(new_kernel)
    if new.shape != old.shape:
        raise ValueError(
            f"new kernel for {path_name(layer.path)!r} has shape {new.shape}, expected {old.shape}"
        )
    new = new.astype(old.dtype)
    if isinstance(model_or_variables, nnx.State):
        state = jax.tree.map(lambda a: a, model_or_variables)
        _state_kernel(state, layer).set_value(new)
        return state
    if is_nnx(model_or_variables):
        clone = nnx.clone(model_or_variables)
        getattr(module_at(clone, layer.path), layer.param).set_value(new)
        return clone
    return replace_in(model_or_variables, ("params", *layer.path, layer.param), new)


__all__ = [
    "make_input_capturer",
    "output_and_layer_inputs",
    "layer_input",
    "get_kernel",
    "set_kernel",
    "traced_functions",
    "count_trace",
]
