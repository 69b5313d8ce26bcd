"""The one abstract pass that maps a model before it is quantized.

``trace_model`` runs the forward pass once under ``jax.eval_shape`` (no FLOPs) through
``gpfq_jax.flax.intercept`` and returns everything the driver needs to know first: the
quantizable layers in the order of their first call (kernel shape, input shape, conv
geometry), which BatchNorm directly follows which layer (for folding), and the first layer
whose input does not fit its kernel (``InputShapeError``). Unsupported kernel layers, shared
layers and layers inside lifted transforms raise errors that name the module path.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpfq_jax.core.patches import ConvGeometry, MatrixView
from gpfq_jax.flax.intercept import (
    SUPPORTED,
    check_not_lifted,
    intercepted_forward,
    is_nnx,
    outer_trace,
    recorded_base,
)
from gpfq_jax.flax.paths import Path, first_input, get_in, param_name, path_name

# --------------------------------------------------------------------------- the model map


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer found by :func:`trace_model`.

    path: Linen, module path inside ``variables['params']``; NNX, attribute path to the module.
    kind: "dense", "conv", "dense_general", "einsum" or "embed". kernel_shape: the stored
    kernel's shape ((in, out), (kh, kw, cin/g, cout), any for the general kinds, (vocab, d)
    for an embedding table: its view makes each token's row a neuron of d features).
    input_shape: the input of its call on the traced batch. geometry: the conv's patches
    (explicit padding resolved for ``input_shape``), None for the other kinds. view: how a
    general layer's input and kernel become (g, N, n) problems, None for Dense / Conv.
    call_index: position in the forward pass (first call). same_input_as: the call_index of
    the first layer that reads the very same input tensor (q, k and v; gate and up), its own
    call_index when it is that layer.
    """

    path: Path
    name: str
    kind: str
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    geometry: ConvGeometry | None = None
    has_bias: bool = False
    call_index: int = 0
    view: MatrixView | None = None
    same_input_as: int = 0

    @property
    def param(self) -> str:
        """The weight's name in the module: "kernel", or "embedding" for an embedding."""
        return param_name(self.kind)

    @property
    def feature_group_count(self) -> int:
        if self.view is not None:
            return self.view.groups
        return 1 if self.geometry is None else self.geometry.feature_group_count

    @property
    def features(self) -> int:
        """N, the input features of each of the layer's problems."""
        return self.view.features if self.view is not None else math.prod(self.kernel_shape[:-1])

    @property
    def neurons(self) -> int:
        """n, the neurons of each of the layer's problems."""
        if self.view is not None:
            return self.view.neurons
        return self.kernel_shape[-1] // self.feature_group_count


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


class ModelStructureError(ValueError):
    """The model's structure is not supported as is (e.g. a layer called more than once)."""


class InputShapeError(ValueError):
    """A layer's input does not fit its kernel (raised during the abstract pass)."""

    def __init__(self, name: str, got: tuple[int, ...], expected: str):
        self.name, self.got, self.expected = name, got, expected
        super().__init__(f"layer {name!r} expects inputs of shape {expected}, got {got}")


@dataclasses.dataclass(frozen=True)
class ModelTrace:
    """What one abstract pass learns: the layers (forward order) and the BN-follow pairs."""

    layers: list[LayerInfo]
    bn_follows: list[BNFollow]


def _bn_reason(module: Any, x: Any, args: tuple, kwargs: dict) -> str:
    """Why this BN call cannot be folded ('' if it can)."""
    ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if ura is None:
        ura = module.use_running_average
    if ura is not True:
        return "not in inference mode (use_running_average is not True)"
    if kwargs.get("mask") is not None:
        return "masked"
    axis, ndim = module.axis, len(getattr(x, "shape", ()))
    if not isinstance(axis, int) or axis not in (-1, ndim - 1):
        return f"normalizes axis {axis}, not the last (output-channel) axis"
    return ""


def _kernel_shape(module: Any, path: Path, params: Any, kind: str) -> tuple[int, ...]:
    """The layer's stored kernel shape (Linen: from ``params``; NNX: from the module)."""
    name = param_name(kind)
    if params is None:
        return tuple(getattr(module, name)[...].shape)
    kernel = get_in(params, (*path, name))
    if kernel is None:
        raise KeyError(f"no {name!r} at variables['params'][{path_name(path)!r}]")
    return tuple(kernel.shape)


def _einsum_labels(eq: str, shape: tuple[int, ...], name: str) -> tuple[list, list, list]:
    """Input, kernel and output axis labels of a two-operand einsum (``...`` expanded)."""
    eq = eq.replace(" ", "")
    if eq.count("->") != 1 or eq.count(",") != 1:
        raise NotImplementedError(f"einsum layer {name!r}: {eq!r} is not 'in,kernel->out'")
    lhs, out = eq.split("->")
    ins, ker = lhs.split(",")
    if "..." in ker:
        raise NotImplementedError(f"einsum layer {name!r}: '...' in the kernel operand of {eq!r}")
    explicit = len(ins.replace("...", ""))
    if len(shape) < explicit or ("..." not in ins and len(shape) != explicit):
        raise InputShapeError(name, shape, f"{len(ins)} axes for {eq!r}")
    ell = [("...", i) for i in range(len(shape) - explicit)]

    def labels(spec: str) -> list:
        head, _, tail = spec.partition("...")
        return [*head, *(ell if "..." in spec else []), *tail]

    return labels(ins), list(ker), labels(out)


def _view(module: Any, kind: str, x: Any, args: tuple, kwargs: dict, kshape, name: str):
    """The MatrixView of a DenseGeneral / LinearGeneral / Einsum call with input ``x``."""
    shape = tuple(int(s) for s in jnp.shape(x))
    if kind == "einsum":
        eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
        ins, ker, out = _einsum_labels(eq, shape, name)
        expected = kshape
    else:
        nnx_ = hasattr(module, "batch_axis")
        batch = tuple(module.batch_axis) if nnx_ else module.batch_dims
        axis, feats = module.axis, module.out_features if nnx_ else module.features
        canon = lambda a: (a,) if isinstance(a, int) else tuple(a)  # noqa: E731
        batch, axis, feats = canon(batch), canon(axis), canon(feats)
        if any(not -len(shape) <= a < len(shape) for a in batch + axis):
            raise InputShapeError(name, shape, f"an input with axes {batch + axis}")
        batch, axis = [a % len(shape) for a in batch], [a % len(shape) for a in axis]
        ins = list(range(len(shape)))
        ker = [*batch, *axis, *(("out", j) for j in range(len(feats)))]
        out = [a for a in ins if a not in axis] + ker[len(batch) + len(axis) :]
        expected = (*(shape[a] for a in batch), *(shape[a] for a in axis), *feats)
    if tuple(kshape) != tuple(expected) or len(ker) != len(kshape):
        raise NotImplementedError(
            f"layer {name!r}: stored kernel shape {kshape} does not match its call (input "
            f"{shape}); stacked kernels (nn.scan / nn.vmap) are not supported."
        )
    size = dict(zip(ker, kshape))
    for lab, n in zip(ins, shape):
        if lab in size and size[lab] != n:
            raise InputShapeError(name, shape, f"axis {lab!r} of size {size[lab]}")
    try:
        return MatrixView.create(ins, ker, out, kshape)
    except NotImplementedError as e:
        raise NotImplementedError(f"layer {name!r}: {e}") from e


def _layer_info(
    module: Any, path: Path, kind: str, x: Any, params: Any, args: tuple = (), kwargs=None
) -> dict[str, Any]:
    """LayerInfo fields of a Dense/Conv call with input ``x``; InputShapeError if it does not
    fit the kernel, NotImplementedError for stacked kernels or masked convs."""
    name, shape = path_name(path), tuple(int(s) for s in jnp.shape(x))
    kshape = _kernel_shape(module, path, params, kind)
    if kind == "embed":  # the table (vocab, d): vocab neurons of d features, no input data
        view = MatrixView((), (1, 0), (), (kshape[1],), (kshape[0],))
        return dict(path=path, name=name, kind=kind, kernel_shape=kshape, input_shape=shape,
                    view=view)  # fmt: skip
    has_bias = module.use_bias if params is not None else module.bias is not None
    if kind in ("dense_general", "einsum"):
        view = _view(module, kind, x, args, kwargs or {}, kshape, name)
        return dict(path=path, name=name, kind=kind, kernel_shape=kshape, input_shape=shape,
                    has_bias=bool(has_bias), view=view)  # fmt: skip
    features = module.features if params is not None else module.out_features
    geometry = None
    if kind == "dense":
        if not shape or shape[-1] != kshape[0]:
            raise InputShapeError(name, shape, f"(..., {kshape[0]})")
        expected = (shape[-1], features)
    else:
        groups, nd = module.feature_group_count, len(kshape) - 2
        n_in = kshape[-2] * groups
        if len(shape) < nd + 1 or shape[-1] != n_in:
            raise InputShapeError(name, shape, f"(batch, {', '.join(['*'] * nd)}, {n_in})")
        if module.mask is not None:
            raise NotImplementedError(f"masked conv layer {name!r} is not supported")
        geometry = ConvGeometry.create(
            kshape, module.strides, module.padding, module.input_dilation,
            module.kernel_dilation, groups, shape, layer=f"conv layer {name!r}",
        )  # fmt: skip
        ks = module.kernel_size
        ks = (ks,) if isinstance(ks, int) else tuple(ks)
        expected = (*ks, shape[-1] // groups, features)
    if kshape != tuple(expected):
        raise NotImplementedError(
            f"layer {name!r}: stored kernel shape {kshape} does not match its call (input "
            f"{shape}); stacked kernels (nn.scan / nn.vmap) are not supported."
        )
    return dict(path=path, name=name, kind=kind, kernel_shape=kshape, input_shape=shape,
                geometry=geometry, has_bias=bool(has_bias))  # fmt: skip


class _Recorder:
    """The hook of ``trace_model``: records layers, BN events, counts and unsupported calls."""

    def __init__(self, params: Any, outer: Any):
        self.params, self.outer = params, outer
        self.layers: dict[Path, dict[str, Any]] = {}
        self.counts: dict[Path, int] = {}
        self.unsupported: dict[Path, str] = {}
        self.events: list[tuple[str, Path, Any, Any]] = []  # (kind, path, input, output|BNFollow)
        self.active: set[Path] = set()
        self.readers: dict[int, tuple[Any, int]] = {}  # id(input) -> (input, first reader)

    def __call__(self, module, path, kind, args, kwargs, call):
        if path in self.active:  # a layer calling itself through super().__call__
            return call()
        x = first_input(args, kwargs)
        if kind == "bn":
            reason = _bn_reason(module, x, args, kwargs)
            self.events.append(("bn", path, x, (reason, float(module.epsilon))))
            return call()
        check_not_lifted(x, self.outer, path)
        self.counts[path] = self.counts.get(path, 0) + 1
        if kind == "unsupported":
            self.unsupported.setdefault(path, recorded_base(module).__name__)
            return call()
        if path not in self.layers:
            info = _layer_info(module, path, kind, x, self.params, args, kwargs)
            index = len(self.layers)  # holding x keeps its id unique during the pass
            info["same_input_as"] = self.readers.setdefault(id(x), (x, index))[1]
            self.layers[path] = info
        self.active.add(path)
        try:
            out = call()
        finally:
            self.active.discard(path)
        if kind in ("dense", "conv"):  # BatchNorm folding: last-axis output channels only
            self.events.append(("layer", path, x, out))
        return out

    def result(self) -> ModelTrace:
        if self.unsupported:
            items = ", ".join(f"{path_name(p)!r} ({t})" for p, t in self.unsupported.items())
            raise NotImplementedError(
                f"unsupported layer(s) in the forward pass: {items}; {SUPPORTED}."
            )
        for path, n in self.counts.items():
            if n > 1:
                raise ModelStructureError(
                    f"shared layer {path_name(path)!r} called {n} times is not supported: each "
                    "quantizable layer must be called exactly once per forward pass."
                )
        layers = [LayerInfo(call_index=i, **rec) for i, rec in enumerate(self.layers.values())]
        follows = []
        for prev, ev in zip(self.events, self.events[1:]):
            if ev[0] == "bn" and prev[0] == "layer" and ev[2] is prev[3]:
                reason, eps = ev[3]
                follows.append(BNFollow(prev[1], ev[1], not reason, reason, eps))
        return ModelTrace(layers, follows)


def _warn_if_training(model: nnx.Module) -> None:
    for path, m in nnx.iter_modules(model):
        if getattr(m, "use_running_average", None) is False or (
            getattr(m, "deterministic", None) is False and getattr(m, "rate", 0) > 0
        ):
            warnings.warn(
                f"NNX module {path_name(path) or '<root>'!r} ({type(m).__name__}) is in training "
                "mode; captured inputs will use batch statistics / dropout. Call model.eval() "
                "first.",
                stacklevel=4,
            )
            return


def require_no_variables(variables: Any) -> None:
    """NNX models hold their own state: ``variables`` must be None."""
    if variables is not None:
        raise TypeError(
            "for an NNX model pass variables=None (the model holds its own state); "
            f"got {type(variables).__name__}"
        )


def trace_model(model: Any, variables: Any, sample_input: Any, **apply_kwargs) -> ModelTrace:
    """Map ``model`` with one abstract forward pass (``jax.eval_shape``: no FLOPs).

    Linen: ``variables`` is the variables dict, ``apply_kwargs`` go to ``model.apply`` (e.g.
    ``train=False``). NNX: ``variables`` must be None and ``apply_kwargs`` go to
    ``model(x, ...)``; put the model in eval mode first (``.eval()``). Raises InputShapeError
    for the first layer whose input does not fit its kernel, NotImplementedError for
    unsupported kernel layers and ValueError for a layer called more than once.
    """
    if is_nnx(model):
        require_no_variables(variables)
        _warn_if_training(model)
        graphdef, state = nnx.split(model)
        params = None
    else:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("Linen models need the variables dict with a 'params' collection")
        graphdef, state, params = None, variables, variables["params"]
    recorders: list[_Recorder] = []

    def run(st: Any, x: Any) -> None:
        rec = _Recorder(params, outer_trace(x))
        recorders.append(rec)
        intercepted_forward(model, graphdef, st, (x,), apply_kwargs, rec)

    jax.eval_shape(run, state, sample_input)
    return recorders[0].result()


def discover_layers(
    model: Any, variables: Any, sample_input: Any, **apply_kwargs
) -> list[LayerInfo]:
    """The quantizable layers of ``model`` in the order of their first call
    (``trace_model(...).layers``)."""
    return trace_model(model, variables, sample_input, **apply_kwargs).layers


__all__ = [
    "LayerInfo",
    "BNFollow",
    "InputShapeError",
    "ModelStructureError",
    "ModelTrace",
    "trace_model",
    "discover_layers",
    "require_no_variables",
]
