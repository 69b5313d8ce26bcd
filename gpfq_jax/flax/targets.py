"""The float and the partially quantized model of one framework, behind one interface.

The driver reads float kernels, writes quantized kernels and biases, folds BatchNorms and
builds input capturers through a ``Target``; ``LinenTarget`` keeps two variables trees,
``NNXTarget`` two private module copies (the user's model is never modified).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gpfq_jax.flax.bn_fold import fold_linen, fold_nnx
from gpfq_jax.flax.capture import make_input_capturer, set_kernel
from gpfq_jax.flax.paths import Path, get_in, module_at, replace_in
from gpfq_jax.flax.tracing import LayerInfo, require_no_variables


class Target:
    """The float and the partially quantized model of one framework."""

    framework: str
    model: Any
    kwargs: dict
    discover_vars: Any
    float_arg: Any  # what a capturer takes for the float model
    quant_arg: Any  # ... and for the partially quantized model

    def capturer(self, layer: LayerInfo) -> Callable:
        raise NotImplementedError

    def block_vars(self, path: Path, quant: bool) -> Any:
        """The variables (Linen) or state (NNX) of the submodule at ``path``, float or quant."""
        raise NotImplementedError

    def block_graphdef(self, path: Path) -> Any:
        """NNX: the graph of the submodule at ``path``; Linen: None."""
        return None


class LinenTarget(Target):
    framework = "linen"

    def __init__(self, model: nn.Module, variables: Any, kwargs: dict):
        if variables is None or not hasattr(variables, "keys") or "params" not in variables:
            raise TypeError(
                "a Linen model needs its variables dict (with 'params'); got "
                f"{type(variables).__name__}"
            )
        self.model, self.kwargs = model, kwargs
        self.float_arg = self.quant_arg = self.discover_vars = variables
        self._apply = jax.jit(lambda v, x: model.apply(v, x, **kwargs))

    def capturer(self, layer):
        return make_input_capturer(self.model, self.float_arg, layer, **self.kwargs)

    def forward(self, batch, fold=None):
        v = self.float_arg if fold is None else fold_linen(self.discover_vars, fold)
        return self._apply(v, batch)

    def fold(self, pairs):
        self.float_arg = self.quant_arg = fold_linen(self.float_arg, pairs)

    def float_kernel(self, layer):
        return jnp.asarray(get_in(self.float_arg, ("params", *layer.path, layer.param)))

    def set_kernel(self, layer, q):
        self.quant_arg = set_kernel(self.quant_arg, layer, q)

    def quant_bias(self, layer):
        return jnp.asarray(get_in(self.quant_arg, ("params", *layer.path, "bias")))

    def set_bias(self, layer, b):
        self.quant_arg = replace_in(self.quant_arg, ("params", *layer.path, "bias"), jnp.asarray(b))

    def block_vars(self, path, quant):
        tree = self.quant_arg if quant else self.float_arg
        subs = {col: get_in(tree[col], path) for col in tree}
        return {col: sub for col, sub in subs.items() if sub is not None}

    def result(self):
        return self.quant_arg, None


class NNXTarget(Target):
    framework = "nnx"
    discover_vars = None

    def __init__(self, model: nnx.Module, kwargs: dict):
        self.kwargs = kwargs
        self.model = nnx.clone(model)  # the float model (folded later); the user's is untouched
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.qmodel = nnx.clone(self.model)  # the partially quantized model
        self._fstate = self._qstate = None  # cached nnx.state of each
        self._graphdef = nnx.graphdef(self.model)
        self._apply = jax.jit(lambda st, x: nnx.merge(self._graphdef, st)(x, **kwargs))

    @property
    def float_arg(self):
        if self._fstate is None:
            self._fstate = nnx.state(self.model)
        return self._fstate

    @property
    def quant_arg(self):
        if self._qstate is None:
            self._qstate = nnx.state(self.qmodel)
        return self._qstate

    def capturer(self, layer):
        return make_input_capturer(self.model, None, layer, **self.kwargs)

    def forward(self, batch, fold=None):
        m = self.model
        if fold is not None:
            m = nnx.clone(self._unfolded)
            fold_nnx(m, fold)
        return self._apply(nnx.state(m), batch)

    def fold(self, pairs):
        self._unfolded = nnx.clone(self.model)
        fold_nnx(self.model, pairs)
        self.qmodel = nnx.clone(self.model)
        self._fstate = self._qstate = None

    def float_kernel(self, layer):
        return getattr(module_at(self.model, layer.path), layer.param)[...]

    def set_kernel(self, layer, q):
        getattr(module_at(self.qmodel, layer.path), layer.param).set_value(q)
        self._qstate = None

    def quant_bias(self, layer):
        return module_at(self.qmodel, layer.path).bias[...]

    def set_bias(self, layer, b):
        module_at(self.qmodel, layer.path).bias.set_value(jnp.asarray(b))
        self._qstate = None

    def block_vars(self, path, quant):
        return nnx.state(module_at(self.qmodel if quant else self.model, path))

    def block_graphdef(self, path):
        return nnx.graphdef(module_at(self.model, path))

    def result(self):
        return nnx.to_pure_dict(nnx.state(self.qmodel)), self.qmodel


def make_target(model: Any, variables: Any, kwargs: dict) -> Target:
    if isinstance(model, nnx.Module):
        require_no_variables(variables)
        return NNXTarget(model, kwargs)
    if isinstance(model, nn.Module):
        return LinenTarget(model, variables, kwargs)
    raise TypeError(
        f"model must be a flax.linen Module or a flax.nnx Module, got {type(model).__name__}"
    )


__all__ = ["Target", "LinenTarget", "NNXTarget", "make_target"]
