"""Serve quantized models through Qwix: our integer codes and steps as Qwix PTQ ``QArray`` s.

``to_qwix(res, model)`` and ``load_qwix(path, model)`` give the user's model wrapped by
``qwix.quantize_model(model, qwix.PtqProvider(rules))`` (one rule per quantized layer, matched
by its exact module path) and its variables, each quantized kernel a
``WithAux(QArray(qvalue, scale, zero_point))`` holding OUR codes (int4 when they fit, else
int8) and steps; Qwix does not round anything again. Qwix's PTQ forward pass consumes them
(weight only: with float activations it dequantizes ``(qvalue - zero_point) * scale`` and
runs a float matmul, the same values as ``res.variables``' kernels).

Layout (Qwix 0.1.8, ``qwix._src.core.qarray``): ``qvalue`` has the kernel's shape (Flax
layout, (in, ..., out)); ``scale`` (and ``zero_point``) have the kernel's rank, each axis
dividing the kernel's: size 1 on a contracted axis without groups, the axis size on
channelwise (output and batch) axes, ``axis // tile`` on a tiled contracted axis. Our groups
of ``group_size`` consecutive inputs over the flattened contracted axes become tiles: the last
contracted axis tiled by ``group_size`` (or taken whole, the axis before it tiled by the rest);
a group size that does not tile the contracted axes this way (or does not divide them) cannot
be held. Qwix is imported lazily: it is optional (``pip install "gpfq_jax[experiments]"``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gpfq_jax.core.alphabets import Alphabet, make_alphabet
from gpfq_jax.core.code_dtypes import storage_layout
from gpfq_jax.core.patches import MatrixView
from gpfq_jax.core.result import per_weight
from gpfq_jax.flax.checkpoint_format import check_arrays, read_metadata
from gpfq_jax.flax.checkpoints import (
    flatten_tree,
    kernel_path,
    restore_arrays,
    unflatten_tree,
    view_from_dict,
)
from gpfq_jax.flax.results import QuantizeResult

_SERVED_KINDS = ("dense", "dense_general", "einsum")
_INT4, _INT8 = jnp.dtype(jnp.int4), jnp.dtype(jnp.int8)


def _qwix() -> Any:
    """The qwix module, or an ImportError saying how to install it."""
    try:
        import qwix
    except ImportError as e:
        raise ImportError(
            "serving through Qwix needs the optional package qwix: "
            'pip install "gpfq_jax[experiments]" (or pip install qwix==0.1.8)'
        ) from e
    return qwix


# --------------------------------------------------------------------------- codes


def _fitting_dtype(lo: int, hi: int) -> Any:
    """int4 if [lo, hi] fits it, int8 if that fits, else None."""
    for dtype, a, b in ((_INT4, -8, 7), (_INT8, -128, 127)):
        if a <= lo and hi <= b:
            return dtype
    return None


def qvalue_layout(alphabet: Alphabet, where: str) -> tuple[Any, int, int, float, int]:
    """How an alphabet's code k becomes a Qwix qvalue: ``(dtype, mult, add, step_factor,
    shift)``: qvalue = mult * k + add in ``dtype`` (int4 or int8), scale = step * step_factor,
    zero point = z + shift (``shift`` alone on a symmetric grid whose codes were shifted).

    Offset 0: qvalue = k + shift (the checkpoints' ``storage_layout``; the "asym" grid's
    0..2^b-1 shifted into the signed range, its zero point shifted alike). Offset 0.5 ("ls"):
    step * (k + 1/2) == (step / 2) * (2k + 1), odd codes at half the step (one more bit).
    ValueError naming ``where`` (grid and layer) when the codes fit no 8-bit integer.
    """
    if alphabet.offset == 0:
        dtype, shift = storage_layout(alphabet)
        mult, add, factor = 1, int(shift), 1.0
    elif alphabet.offset == 0.5:
        mult, add, factor = 2, 1, 0.5
        dtype = _fitting_dtype(2 * alphabet.kmin + 1, 2 * alphabet.kmax + 1)
    else:
        raise ValueError(f"{where}: offset {alphabet.offset} cannot be held by a Qwix QArray")
    shift = add if mult == 1 else 0
    lo, hi = mult * alphabet.kmin + add, mult * alphabet.kmax + add
    if dtype is None or _fitting_dtype(lo, hi) is None:
        raise ValueError(
            f"{where}: codes {alphabet.kmin}..{alphabet.kmax} (offset {alphabet.offset}) need "
            f"more than 8 bits as Qwix qvalues ({lo}..{hi}); Qwix QArrays hold int4 / int8"
        )
    return jnp.dtype(dtype), mult, add, factor, shift


def _as_qvalue(codes: Any, mult: int, add: int, dtype: Any, base: int = 0) -> jax.Array:
    """Integers k + ``base`` (any int or integral float dtype; a checkpoint's stored codes have
    its shift as ``base``) -> ``mult * k + add`` in ``dtype``; kept as they are when that is
    what they already are (int arithmetic in int32: XLA on CPU does not compute in int4)."""
    codes = jnp.asarray(codes)
    if codes.dtype == dtype and mult == 1 and add == base:
        return codes
    return ((codes.astype(jnp.int32) - base) * mult + add).astype(dtype)


# --------------------------------------------------------------------------- scale layout


def contracted_axes(kind: str, shape: tuple[int, ...], view: MatrixView | None) -> tuple:
    """The kernel axes summed over (in kernel order): Dense (0,), a general layer its view's."""
    if kind == "dense":
        return tuple(range(len(shape) - 1))
    nb, nc = len(view.batch_shape), len(view.contract_shape)
    return tuple(sorted(view.kernel_perm[nb : nb + nc]))


def group_tiles(shape: tuple, axes: tuple, group_size: int, where: str) -> dict[int, int]:
    """Qwix tile sizes on the contracted ``axes`` giving our groups of ``group_size`` consecutive
    inputs over the flattened contracted axes; ValueError naming ``where`` if none does."""
    tiles, rest = {}, min(group_size, math.prod(shape[a] for a in axes))  # >= N: one group
    for a in reversed(axes):
        d = shape[a]
        if rest >= d and rest % d == 0:
            tiles[a], rest = d, rest // d
        elif rest < d and d % rest == 0:
            tiles[a], rest = rest, 1
        else:
            break
    if rest != 1:
        sizes = "x".join(str(shape[a]) for a in axes)
        raise ValueError(
            f"{where}: group_size {group_size} does not tile the contracted axes ({sizes}): "
            "Qwix holds only tiles that divide each axis (the last group would be shorter, "
            "or straddle an axis)"
        )
    return {a: tiles.get(a, 1) for a in axes}


def scale_layout(
    step: Any, shape: tuple[int, ...], kind: str, group_size: int | None,
    view: MatrixView | None, where: str,
) -> tuple[jax.Array, dict[int, int], tuple[int, ...]]:  # fmt: skip
    """Our compact steps (or zero points) as a Qwix scale of the kernel's rank, with the tiles
    of the contracted axes ({} without groups) and the channelwise axes."""
    step, ndim = jnp.asarray(step), len(shape)
    if group_size is None:
        if step.ndim == 0:
            return step.reshape((1,) * ndim), {}, ()
        if kind == "dense" and step.ndim == 1:  # (N_out,)
            return step.reshape((1,) * (ndim - 1) + step.shape), {}, (ndim - 1,)
        if step.ndim != ndim:
            raise ValueError(f"{where}: steps of shape {step.shape} for a kernel {shape}")
        return step, {}, tuple(a for a in range(ndim) if step.shape[a] > 1)
    axes = contracted_axes(kind, shape, view)
    tiles = group_tiles(shape, axes, group_size, where)
    channelwise = tuple(a for a in range(ndim) if a not in axes)
    if kind == "dense":  # (N / group_size, N_out): already Qwix's (in / tile, out)
        return (
            step.reshape(tuple(shape[a] // tiles.get(a, 1) for a in range(ndim))),
            tiles,
            channelwise,
        )
    full = per_weight(step, shape, group_size, view)  # kernel-shaped, transient
    return full[tuple(slice(None, None, tiles.get(a, 1)) for a in range(ndim))], tiles, channelwise


# --------------------------------------------------------------------------- one layer


def _calibration_method(alphabet: Alphabet, grid: str, dtype: Any) -> str:
    """Qwix's ``weight_calibration_method`` that gives this grid's "max" step in ``dtype``
    (recorded in the rules; the codes served are ours whatever it says)."""
    if grid == "asym":
        return "minmax"
    bound = 7.5 if dtype == _INT4 else 127.5  # Qwix's symmetric bound, 2^(b-1) - 0.5
    ratio = bound / alphabet.denominator
    return "absmax" if alphabet.offset or ratio == 1 else f"absmax,{ratio!r}"


def served_layer(
    codes: Any, step: Any, zero_point: Any, *, name: str, kind: str, shape: tuple[int, ...],
    grid: str, bits: Any, group_size: int | None, view: MatrixView | None,
    stored_shift: int = 0,
) -> tuple[Any, dict]:  # fmt: skip
    """One layer as ``(WithAux(QArray), rule kwargs)``.

    codes: kernel-shaped integers, the alphabet's codes plus ``stored_shift`` (a checkpoint's
    storage shift; its int4 / int8 codes are then used as they are when they are the qvalues).
    step / zero_point (zero points plus ``stored_shift`` too): our compact arrays ((N_out,),
    (), (ceil(N / group_size), N_out), or a general layer's kernel-shaped or view layout).
    """
    _qwix()  # ImportError with the install hint if qwix is missing
    from qwix._src.core import qarray
    from qwix._src.providers import ptq

    where = f"layer {name!r} (grid {grid!r}, {bits} bits)"
    if kind not in _SERVED_KINDS:
        raise ValueError(
            f"{where}: a {kind!r} layer cannot be served by Qwix 0.1.8 weight-only PTQ (it "
            f"serves Dense, DenseGeneral and Einsum kernels); leave it float with "
            f"Rule({name!r}, skip=True)"
        )
    alphabet = make_alphabet(bits, grid)
    dtype, mult, add, factor, shift = qvalue_layout(alphabet, where)
    qvalue = _as_qvalue(codes, mult, add, dtype, stored_shift)
    scale, tiles, channelwise = scale_layout(step, shape, kind, group_size, view, where)
    scale = scale * factor if factor != 1 else scale
    zp = None
    if zero_point is not None or shift:  # asym, or symmetric codes shifted
        z = jnp.full(jnp.shape(step), stored_shift, jnp.int32) if zero_point is None else zero_point
        z = scale_layout(jnp.asarray(z).astype(jnp.int32), shape, kind, group_size, view, where)[0]
        zp = _as_qvalue(z, 1, shift, dtype, stored_shift)
    qarr = qarray.QArray(qvalue=qvalue, scale=scale, zero_point=zp, qtype=dtype)
    qarray.validate_qarray(qarr)
    method = _calibration_method(alphabet, grid, dtype)
    how = qarray.HowToQuantize(
        qtype=dtype, channelwise_axes=list(channelwise), tiled_axes=tiles,
        calibration_method=method,
    )  # fmt: skip
    # The rule routes the layer to Qwix's PTQ op; its tile_size is what Qwix would use to
    # quantize a float kernel itself: an int tiles the last contracted axis and pools the
    # others, a mapping tiles each (dot_general only: Qwix 0.1.8's einsum takes ints).
    rule = {"weight_qtype": dtype, "weight_calibration_method": method, "tile_size": None}
    if group_size is not None:
        *before, last = sorted(tiles)
        pooled = all(tiles[a] == shape[a] for a in before)
        rule["tile_size"] = tiles[last] if pooled else (tiles if kind != "einsum" else None)
    return ptq.WithAux(qarr, how), rule


# --------------------------------------------------------------------------- whole models


def _module_path(layer_path: tuple) -> str:
    """A layer's path as Qwix matches it ('/'-joined module names, NNX list indices too)."""
    return "/".join(map(str, layer_path))


def _rules(served: dict[tuple, tuple[Any, dict, tuple]]) -> list:
    """One Qwix rule per served layer, matching exactly its module path."""
    qwix = _qwix()
    return [
        qwix.QuantizationRule(module_path=re.escape(_module_path(layer_path)), **rule)
        for layer_path, (_, rule, _) in served.items()
    ]


def _linen(model: Any, floats: list[tuple[tuple, Any]], served: dict) -> tuple[Any, dict]:
    """The Qwix Linen model and its variables: ``floats`` ((path, leaf) pairs) + QArrays."""
    qwix = _qwix()
    pairs = list(floats) + [(kpath, leaf) for leaf, _, kpath in served.values()]
    return qwix.quantize_model(model, qwix.PtqProvider(_rules(served))), unflatten_tree(pairs)


def _nnx(model: nnx.Module, served: dict, floats: list | None = None) -> nnx.Module:
    """A Qwix PTQ copy of the NNX ``model`` (the one copy made) whose served kernels hold the
    QArrays and, if given, whose other leaves are ``floats`` ((path, leaf) pairs)."""
    from qwix._src.utils import flax_util

    qwix = _qwix()
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(_rules(served)), skip_nnx_init=True)
    if floats is not None:
        state = nnx.state(qmodel)
        nnx.replace_by_pure_dict(state, unflatten_tree(floats))
        nnx.update(qmodel, state)
    for leaf, _, kpath in served.values():
        module = qmodel
        for k in kpath[:-1]:
            module = module[k] if isinstance(k, int) else getattr(module, k)
        param = getattr(module, kpath[-1])
        boxed = jax.tree.map(lambda v, p=param: flax_util.update_boxed(p, value=v), leaf)
        setattr(module, kpath[-1], boxed)
    return qmodel


def to_qwix(res: QuantizeResult, model: Any = None) -> tuple[Any, Any]:
    """``(qwix_model, qwix_variables)`` serving ``res``'s integer codes through Qwix PTQ.

    qwix_model: the model wrapped by ``qwix.quantize_model(model, qwix.PtqProvider(rules))``,
    one rule per quantized layer (its exact module path, weight qtype int4 or int8, tile size
    the group size). Linen: ``qwix_model.apply(qwix_variables, x)`` equals
    ``model.apply(res.variables, x)`` up to float rounding; each quantized kernel is a
    ``WithAux(QArray)`` (qvalue kernel-shaped (in, ..., out), int4 / int8; scale of the
    kernel's rank, see the module docstring), every other leaf as in ``res.variables``.
    Linen results hold no model: pass the Linen ``model`` that was quantized. NNX:
    ``qwix_variables`` is None and ``qwix_model(x)`` runs (a Qwix copy of ``res.model``).
    ValueError naming the layer and grid for what Qwix cannot hold (codes wider than 8 bits,
    groups that do not tile the kernel, Conv / Embed layers); ImportError without qwix.
    """
    if not isinstance(res, QuantizeResult):
        raise TypeError(
            f"res must be a QuantizeResult of quantize_params, got {type(res).__name__}"
        )
    if res.framework == "linen" and model is None:
        raise TypeError("to_qwix(res, model): a Linen result needs the Linen model it quantized")
    served = {}
    for r in res.layers:
        leaf, rule = served_layer(
            r.codes, r.scale, r.result.zero_point, name=r.name, kind=r.kind, shape=tuple(r.shape),
            grid=r.spec.grid, bits=r.spec.bits, group_size=r.result.group_size, view=r.result.view,
        )  # fmt: skip
        served[tuple(r.path)] = (leaf, rule, kernel_path(res.framework, tuple(r.path), r.kind))
    if res.framework == "nnx":
        return _nnx(res.model, served), None
    kernels = {kpath for _, _, kpath in served.values()}
    floats = [(p, leaf) for p, leaf in flatten_tree(res.variables) if p not in kernels]
    return _linen(model, floats, served)


def load_qwix(path: str | os.PathLike, model: Any) -> tuple[Any, Any]:
    """``(qwix_model, qwix_variables)`` straight from a ``save_quantized`` checkpoint, like
    ``to_qwix``: the stored int4 / int8 codes become the qvalues as they are (the "ls" grid's
    doubled first), no float kernel is computed. ``model``: the Linen module, or the (float)
    NNX model (not modified); NNX gives ``(qwix_model, None)``.
    """
    from gpfq_jax.atomic import recover_interrupted

    path = Path(path).absolute()
    recover_interrupted(path)
    meta = read_metadata(path)
    tree = restore_arrays(path)
    check_arrays(path, meta, tree)
    linen = meta["framework"] == "linen"
    if linen == isinstance(model, nnx.Module):
        raise TypeError(
            f"{path} holds a {meta['framework']} checkpoint; model is a {type(model).__name__}"
        )
    floats = []
    for e in meta["leaves"]:
        leaf = jnp.asarray(tree["float"][str(e["index"])])
        if "prng_impl" in e:
            leaf = jax.random.wrap_key_data(leaf, impl=e["prng_impl"])
        floats.append((tuple(e["path"]), leaf))
    served = {}
    for i, lay in enumerate(meta["layers"]):
        kpath = tuple(lay["path"])
        zeros = tree["zeros"].get(str(i))
        leaf, rule = served_layer(
            tree["codes"][str(i)], jnp.asarray(tree["scales"][str(i)]), zeros, name=lay["name"],
            kind=lay["kind"], shape=tuple(lay["shape"]), grid=lay["spec"]["grid"],
            bits=lay["spec"]["bits"], group_size=lay["group_size"],
            view=view_from_dict(lay["view"]), stored_shift=lay["code_shift"],
        )  # fmt: skip
        served[kpath[1:-1] if linen else kpath[:-1]] = (leaf, rule, kpath)
    if linen:
        return _linen(model, floats, served)
    return _nnx(model, served, floats), None


__all__ = ["to_qwix", "load_qwix", "served_layer", "qvalue_layout", "scale_layout", "group_tiles"]
