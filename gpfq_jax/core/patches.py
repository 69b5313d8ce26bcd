"""From layer inputs and kernels to matrix problems: conv geometry, patch rows, grouping.

A layer is ``g`` independent matrix problems (``g`` = feature_group_count; 1 for Dense), each
with N input features and n = cout / g neurons. Rows are the layer's inputs: one row per
sample for Dense (leading batch dimensions flattened), one row per output position for Conv
(the patches at the layer's real stride, padding and dilation). Patch features are ordered
like the kernel's reshape, (kh, kw, cin_per_group), so ``patches @ kernel.reshape(-1, cout)``
is the conv output. ``ConvGeometry.create`` is the one place where a Flax-style padding
argument ("SAME", "VALID", ints, pairs) becomes explicit (lo, hi) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.numerics import HIGHEST

# Padding modes that pad the input with something other than zeros before the convolution.
_NON_ZERO_PADDING = ("CIRCULAR", "REFLECT", "CAUSAL")


def _spatial_tuple(v: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    """Broadcast an int (or None = 1) to an n-tuple, as Flax's conv does."""
    if v is None:
        v = 1
    if np.isscalar(v):
        return (int(v),) * n
    return tuple(int(a) for a in v)


def resolve_padding(
    padding: Any,
    kernel_size: tuple[int, ...],
    strides: tuple[int, ...],
    input_dilation: tuple[int, ...],
    kernel_dilation: tuple[int, ...],
    spatial: tuple[int, ...] | None,
    layer: str = "conv layer",
) -> tuple[tuple[int, int], ...]:
    """Explicit (lo, hi) zero padding per spatial dim, as ``conv_general_dilated`` applies it.

    ``padding``: "SAME" / "VALID" (any case), an int, a sequence of ints, or (lo, hi) pairs.
    "SAME" needs the input's ``spatial`` sizes. ``layer`` names the layer in errors.
    """
    nd = len(kernel_size)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode in _NON_ZERO_PADDING:
            raise NotImplementedError(
                f"{layer} uses padding={padding!r}, which pads the input before the "
                "convolution; only zero padding ('SAME', 'VALID', explicit pairs) is supported."
            )
        if mode == "VALID":
            return ((0, 0),) * nd
        if mode != "SAME":
            raise ValueError(f"{layer}: unknown padding {padding!r}")
        if any(d != 1 for d in input_dilation):
            raise NotImplementedError(
                f"{layer}: padding={padding!r} with input_dilation {input_dilation} is not "
                "supported; use explicit padding."
            )
        if spatial is None:
            raise ValueError(f"{layer}: padding='SAME' needs the input shape to resolve")
        eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
        pads = jax.lax.padtype_to_pads(spatial, eff, strides, "SAME")
        return tuple((int(lo), int(hi)) for lo, hi in pads)
    if np.isscalar(padding):
        return ((int(padding), int(padding)),) * nd
    pads = tuple((int(p), int(p)) if np.isscalar(p) else (int(p[0]), int(p[1])) for p in padding)
    if len(pads) != nd:
        raise ValueError(f"{layer}: padding {padding!r} has {len(pads)} entries for {nd} dims")
    return pads


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """How a Conv layer turns NHWC inputs into patch rows (all spatial tuples, explicit).

    kernel_size: spatial kernel shape (kh, kw) (any number of spatial dims).
    in_features: input channels (cin, all groups). padding: ((lo, hi), ...) per spatial dim.
    """

    kernel_size: tuple[int, ...]
    in_features: int
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    feature_group_count: int = 1

    @classmethod
    def create(
        cls,
        kernel_shape: Sequence[int],
        strides: Any = 1,
        padding: Any = "SAME",
        input_dilation: Any = 1,
        kernel_dilation: Any = 1,
        feature_group_count: int = 1,
        input_shape: Sequence[int] | None = None,
        layer: str = "conv layer",
    ) -> ConvGeometry:
        """From a Flax kernel shape (kh, kw, cin/groups, cout) and Flax-style arguments.

        ``padding`` as ``resolve_padding``; "SAME" needs ``input_shape`` (N, *spatial, C).
        """
        nd = len(kernel_shape) - 2
        ksize = tuple(int(k) for k in kernel_shape[:nd])
        strides = _spatial_tuple(strides, nd)
        lhs_d = _spatial_tuple(input_dilation, nd)
        rhs_d = _spatial_tuple(kernel_dilation, nd)
        spatial = (
            None if input_shape is None else tuple(int(s) for s in input_shape[-(nd + 1) : -1])
        )
        pads = resolve_padding(padding, ksize, strides, lhs_d, rhs_d, spatial, layer)
        groups = int(feature_group_count)
        return cls(ksize, int(kernel_shape[-2]) * groups, strides, pads, lhs_d, rhs_d, groups)

    @property
    def features_per_group(self) -> int:
        return int(np.prod(self.kernel_size)) * self.in_features // self.feature_group_count


def grouped_kernel(kernel: jax.Array, groups: int = 1) -> jax.Array:
    """Flax kernel (..., cin/g, cout) -> (g, N, cout/g): group i owns outputs i*cout/g..."""
    cout = kernel.shape[-1]
    mat = kernel.reshape(-1, cout)
    return jnp.transpose(mat.reshape(mat.shape[0], groups, cout // groups), (1, 0, 2))


def ungrouped_kernel(mats: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of ``grouped_kernel``: (g, N, cout/g) -> a kernel of ``shape`` (..., cout)."""
    return jnp.transpose(mats, (1, 0, 2)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How a general kernel layer (DenseGeneral, Einsum) becomes ``g`` matrix problems.

    The layer computes ``out[r, b, o] = sum_c x[r, b, c] * kernel[b, c, o]`` up to axis order:
    ``c`` the contracted axes (in input and kernel, not in the output), ``b`` the batch axes
    (in input, kernel and output: independent groups), ``o`` the kernel's output axes (kernel
    only), ``r`` the input's other axes (rows). Rows: the input transposed to ``input_perm``
    (r, b, c) and reshaped to (m, g, N); kernel: transposed to ``kernel_perm`` (b, c, o) and
    reshaped to (g, N, n). ``batch_shape``, ``contract_shape``, ``out_shape``: the kernel's
    sizes of those axes (the inverse reshape).
    """

    input_perm: tuple[int, ...]
    kernel_perm: tuple[int, ...]
    batch_shape: tuple[int, ...]
    contract_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @classmethod
    def create(
        cls, input_labels: Sequence[Any], kernel_labels: Sequence[Any],
        output_labels: Sequence[Any], kernel_shape: Sequence[int],
    ) -> MatrixView:  # fmt: skip
        """From one label per axis of the input, the kernel and the output (einsum style)."""
        ins, ker, out = list(input_labels), list(kernel_labels), set(output_labels)
        if len(set(ins)) != len(ins) or len(set(ker)) != len(ker) or len(ker) != len(kernel_shape):
            raise NotImplementedError(f"repeated axis labels (diagonals): {ins}, {ker}")
        for lab in ker:
            if lab not in ins and lab not in out:
                raise NotImplementedError(f"kernel axis {lab!r} is summed over alone")
        for lab in ins:
            if lab not in ker and lab not in out:
                raise NotImplementedError(f"input axis {lab!r} is summed over alone")
        batch = [k for k in ker if k in ins and k in out]
        contract = [k for k in ker if k in ins and k not in out]
        outs = [k for k in ker if k not in ins]
        rest = [k for k in ins if k not in ker]
        size = dict(zip(ker, (int(s) for s in kernel_shape)))
        return cls(
            tuple(ins.index(k) for k in rest + batch + contract),
            tuple(ker.index(k) for k in batch + contract + outs),
            tuple(size[k] for k in batch),
            tuple(size[k] for k in contract),
            tuple(size[k] for k in outs),
        )

    @property
    def groups(self) -> int:
        return math.prod(self.batch_shape)

    @property
    def features(self) -> int:
        return math.prod(self.contract_shape)

    @property
    def neurons(self) -> int:
        return math.prod(self.out_shape)


def view_rows(x: jax.Array, view: MatrixView) -> jax.Array:
    """A general layer's input -> rows (m, g, N) (see ``MatrixView``)."""
    return jnp.transpose(x, view.input_perm).reshape(-1, view.groups, view.features)


def view_kernel(kernel: jax.Array, view: MatrixView) -> jax.Array:
    """A general layer's kernel -> (g, N, n) (see ``MatrixView``)."""
    return jnp.transpose(kernel, view.kernel_perm).reshape(view.groups, view.features, view.neurons)


def unview_kernel(mats: jax.Array, view: MatrixView) -> jax.Array:
    """Inverse of ``view_kernel``: (g, N, n) -> the kernel's layout. With (g, 1, n) (one value
    per neuron) the result has size 1 on the contracted axes (broadcastable to the kernel)."""
    contract = view.contract_shape if mats.shape[1] != 1 else (1,) * len(view.contract_shape)
    a = mats.reshape(*view.batch_shape, *contract, *view.out_shape)
    return jnp.transpose(a, np.argsort(view.kernel_perm))


def dense_rows(x: jax.Array) -> jax.Array:
    """Dense inputs (..., N) -> rows (m, 1, N)."""
    return x.reshape(-1, 1, x.shape[-1])


def check_conv_input(shape: tuple[int, ...], geometry: ConvGeometry) -> None:
    nd = len(geometry.kernel_size)
    if len(shape) != nd + 2 or shape[-1] != geometry.in_features:
        raise ValueError(
            f"conv input must be (batch, *spatial[{nd}], {geometry.in_features}); "
            f"got shape {tuple(shape)}"
        )


def _out_sizes(padded_sizes, geometry: ConvGeometry) -> list[int]:
    """Output spatial sizes of the conv over an input of ``padded_sizes`` (after padding)."""
    return [
        (size - (kk - 1) * d - 1) // s + 1
        for size, kk, d, s in zip(
            padded_sizes, geometry.kernel_size, geometry.kernel_dilation, geometry.strides
        )
    ]


def _padded(x: jax.Array, geometry: ConvGeometry) -> tuple[jax.Array, list[int]]:
    """The zero-padded input and the output spatial sizes (no input dilation)."""
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in geometry.padding), (0, 0, 0)])
    return xp, _out_sizes(xp.shape[1:-1], geometry)


def _kernel_order(p: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """(m, kh*kw, cin) patches -> rows (m, g, kh*kw*cin/g) in each group's kernel order."""
    g, k, cin = geometry.feature_group_count, p.shape[1], geometry.in_features
    p = p.reshape(-1, k, g, cin // g)
    if g == 1:
        return p.reshape(p.shape[0], 1, k * cin)
    return jnp.swapaxes(p, 1, 2).reshape(p.shape[0], g, -1)


def _offsets(geometry: ConvGeometry):
    """Kernel tap offsets in the padded input, (kh, kw) row-major."""
    for taps in itertools.product(*(range(kk) for kk in geometry.kernel_size)):
        yield [t * d for t, d in zip(taps, geometry.kernel_dilation)]


def conv_row_count(input_shape: tuple[int, ...], geometry: ConvGeometry) -> int:
    """Number of patch rows (batch x output positions) of a conv input of ``input_shape``."""
    sizes = [
        (s - 1) * d + 1 + lo + hi
        for s, d, (lo, hi) in zip(input_shape[1:-1], geometry.input_dilation, geometry.padding)
    ]
    return int(input_shape[0] * np.prod(_out_sizes(sizes, geometry)))


@functools.partial(jax.jit, static_argnames=("geometry",))
def conv_rows(x: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Conv inputs (n, *spatial, cin) -> patch rows (m, g, kh*kw*cin/g), kernel order.

    m = n * number of output positions (row-major over (n, *output spatial)). The patches are
    strided slices of the padded input (a copy, no arithmetic), stacked in the kernel's
    (kh, kw, cin) order. With input dilation it falls back to
    ``jax.lax.conv_general_dilated_patches`` (channel-major features, reordered).
    """
    check_conv_input(x.shape, geometry)
    nd, g, cin = len(geometry.kernel_size), geometry.feature_group_count, geometry.in_features
    k = int(np.prod(geometry.kernel_size))
    if any(d != 1 for d in geometry.input_dilation):
        spatial = "HWD"[:nd]
        lhs = "N" + spatial + "C"
        patches = jax.lax.conv_general_dilated_patches(
            x,
            geometry.kernel_size,
            geometry.strides,
            geometry.padding,
            lhs_dilation=geometry.input_dilation,
            rhs_dilation=geometry.kernel_dilation,
            dimension_numbers=(lhs, "OI" + spatial, lhs),
            precision=HIGHEST,
        )
        p = patches.reshape(-1, g, cin // g, k)
        return jnp.swapaxes(p, -1, -2).reshape(p.shape[0], g, -1)
    xp, out = _padded(x, geometry)
    slices = []
    for start in _offsets(geometry):
        limit = [
            x.shape[0],
            *(st + (n_out - 1) * s + 1 for st, n_out, s in zip(start, out, geometry.strides)),
            cin,
        ]
        slices.append(jax.lax.slice(xp, [0, *start, 0], limit, (1, *geometry.strides, 1)))
    return _kernel_order(jnp.stack(slices, axis=-2).reshape(-1, k, cin), geometry)


@functools.partial(jax.jit, static_argnames=("geometry",))
def conv_rows_at(x: jax.Array, geometry: ConvGeometry, idx: jax.Array) -> jax.Array:
    """``conv_rows(x, geometry)[idx]`` without building the other rows: (len(idx), g, N).

    Each kept row gathers its kh*kw input pixels, so subsampling patches costs in proportion
    to the rows kept (with input dilation it falls back to building every row).
    """
    check_conv_input(x.shape, geometry)
    if any(d != 1 for d in geometry.input_dilation):
        return conv_rows(x, geometry)[idx]
    xp, out = _padded(x, geometry)
    n, *pos = jnp.unravel_index(idx, (x.shape[0], *out))
    base = [p * s for p, s in zip(pos, geometry.strides)]
    taps = [xp[(n, *(b + o for b, o in zip(base, start)))] for start in _offsets(geometry)]
    return _kernel_order(jnp.stack(taps, axis=1), geometry)


__all__ = [
    "ConvGeometry",
    "resolve_padding",
    "grouped_kernel",
    "ungrouped_kernel",
    "dense_rows",
    "MatrixView",
    "view_rows",
    "view_kernel",
    "unview_kernel",
    "conv_rows",
    "conv_rows_at",
    "conv_row_count",
    "check_conv_input",
]
