"""Streaming layer statistics: H = X~^T X~, G = X~^T X, F = X^T X over calibration batches.

GPFQ needs only H and G. F serves the reported output error and its Q-independent part; when
the layer's float kernel W is known while accumulating (``StatsAccumulator(..., kernel=W)``,
what ``quantize_params`` does), F is replaced by two per-neuron sums, ||X w_j||^2 and
||(X - X~) w_j||^2, which cost rows x N x n instead of rows x N^2 (one product in three fewer).

A layer is ``g`` independent matrix problems (``g`` = feature_group_count; 1 for Dense), each
with N input features. Rows of X are the layer's inputs: one row per sample for Dense (any
leading batch dimensions are flattened), one row per output position for Conv (the patches
at the layer's real stride, padding and dilation). Patch features are ordered like the
kernel's reshape, (kh, kw, cin_per_group), so ``patches @ kernel.reshape(-1, cout)`` is the
conv output.

Memory is O(g N^2) whatever the number of rows. Accumulation runs in the statistics' dtype
(float32 by default: each batch's products at HIGHEST precision, then a running sum; pass
``dtype=jnp.float64`` with ``jax_enable_x64`` for float64).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.sharding import replicate, resolve_mesh, shard_along

HIGHEST = jax.lax.Precision.HIGHEST


class LayerStats(NamedTuple):
    """Second-moment statistics of one layer's inputs.

    hess: (g, N, N) H = X~^T X~.  cross: (g, N, N) G = X~^T X.  gram: (g, N, N) F = X^T X,
    or None when the statistics were accumulated for one known kernel W (g, N, n); then
    out_ref: (g, n) sum of ||X w_j||^2 and out_drift: (g, n) sum of ||(X - X~) w_j||^2 stand
    in for it (the output error they give holds for that W only).
    count: number of rows accumulated (samples for Dense, patches for Conv).
    """

    hess: jax.Array
    cross: jax.Array
    gram: jax.Array | None
    count: jax.Array
    out_ref: jax.Array | None = None
    out_drift: jax.Array | None = None

    @property
    def groups(self) -> int:
        return self.hess.shape[0]

    @property
    def features(self) -> int:
        return self.hess.shape[-1]


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
        kernel_shape,
        strides=1,
        padding="SAME",
        input_dilation=1,
        kernel_dilation=1,
        feature_group_count=1,
        input_shape=None,
    ) -> ConvGeometry:
        """From a Flax kernel shape (kh, kw, cin/groups, cout) and Flax-style arguments.

        ``padding`` may be "SAME", "VALID", an int, or explicit pairs; "SAME" needs
        ``input_shape`` (NHWC) to resolve.
        """
        nd = len(kernel_shape) - 2
        tup = lambda v: (int(v),) * nd if np.isscalar(v) else tuple(int(a) for a in v)  # noqa: E731
        ksize, strides = tuple(kernel_shape[:nd]), tup(strides)
        lhs_d, rhs_d = tup(input_dilation), tup(kernel_dilation)
        if isinstance(padding, str):
            if padding not in ("SAME", "VALID"):
                raise NotImplementedError(
                    f"padding {padding!r} is not supported (SAME, VALID, "
                    "ints or explicit pairs are)"
                )
            if padding == "VALID":
                pads = ((0, 0),) * nd
            else:
                if input_shape is None:
                    raise ValueError("padding='SAME' needs input_shape to resolve")
                in_sp = [(s - 1) * d + 1 for s, d in zip(input_shape[1:-1], lhs_d)]
                eff_k = [(k - 1) * d + 1 for k, d in zip(ksize, rhs_d)]
                pads = jax.lax.padtype_to_pads(in_sp, eff_k, strides, "SAME")
        elif np.isscalar(padding):
            pads = ((int(padding), int(padding)),) * nd
        else:
            pads = tuple(
                (int(p), int(p)) if np.isscalar(p) else (int(p[0]), int(p[1])) for p in padding
            )
        return cls(
            ksize,
            int(kernel_shape[-2]) * int(feature_group_count),
            strides,
            tuple(tuple(p) for p in pads),
            lhs_d,
            rhs_d,
            int(feature_group_count),
        )

    @property
    def features_per_group(self) -> int:
        return int(np.prod(self.kernel_size)) * self.in_features // self.feature_group_count


def init_stats(
    features: int, groups: int = 1, dtype=jnp.float32, *, neurons: int | None = None
) -> LayerStats:
    """Zero statistics for ``groups`` problems of ``features`` inputs each.

    ``neurons`` (outputs per group): keep per-neuron output norms of one kernel instead of F.
    """
    z = jnp.zeros((groups, features, features), dtype)
    count = jnp.zeros((), jnp.int32)
    if neurons is None:
        return LayerStats(z, z, z, count)
    zn = jnp.zeros((groups, neurons), dtype)
    return LayerStats(z, z, None, count, zn, zn)


def grouped_kernel(kernel: jax.Array, groups: int = 1) -> jax.Array:
    """Flax kernel (..., cin/g, cout) -> (g, N, cout/g): group i owns outputs i*cout/g..."""
    cout = kernel.shape[-1]
    mat = kernel.reshape(-1, cout)
    return jnp.transpose(mat.reshape(mat.shape[0], groups, cout // groups), (1, 0, 2))


def dense_rows(x: jax.Array) -> jax.Array:
    """Dense inputs (..., N) -> rows (m, 1, N)."""
    return x.reshape(-1, 1, x.shape[-1])


def _check_conv_input(shape: tuple[int, ...], geometry: ConvGeometry) -> None:
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
    _check_conv_input(x.shape, geometry)
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
    _check_conv_input(x.shape, geometry)
    if any(d != 1 for d in geometry.input_dilation):
        return conv_rows(x, geometry)[idx]
    xp, out = _padded(x, geometry)
    n, *pos = jnp.unravel_index(idx, (x.shape[0], *out))
    base = [p * s for p, s in zip(pos, geometry.strides)]
    taps = [xp[(n, *(b + o for b, o in zip(base, start)))] for start in _offsets(geometry)]
    return _kernel_order(jnp.stack(taps, axis=1), geometry)


def _sum_sq_outputs(r: jax.Array, w: jax.Array) -> jax.Array:
    """Per neuron sum over rows of (r @ w)^2: r (g, m, N), w (g, N, n) -> (g, n)."""
    y = jnp.einsum("gmi,gin->gmn", r, w, precision=HIGHEST)
    return jnp.sum(y * y, axis=1)


def _check_kernel(stats: LayerStats, w: jax.Array | None) -> None:
    if stats.gram is None and w is None:
        raise ValueError(
            "these statistics keep per-neuron output norms instead of F: pass the "
            "grouped kernel w (g, N, n) they were started with"
        )


@jax.jit
def accumulate(
    stats: LayerStats,
    rows: jax.Array,
    rows_quant: jax.Array | None = None,
    w: jax.Array | None = None,
) -> LayerStats:
    """Add a batch of rows (m, g, N) of the float and quantized inputs to ``stats``.

    ``rows_quant=None`` means X~ = X (the first layer): H = G = F from one N x N product.
    Statistics without F (``init_stats(..., neurons=n)``) need the grouped kernel w (g, N, n).
    """
    _check_kernel(stats, w)
    dt = stats.hess.dtype
    # Group axis first: a batched (g) product of (N, m) @ (m, N), which XLA runs faster.
    r = jnp.swapaxes(rows.astype(dt), 0, 1)
    prod = functools.partial(jnp.einsum, "gmi,gmj->gij", precision=HIGHEST)
    if rows_quant is None:
        rq, hess = r, prod(r, r)
        cross = gram = hess
    else:
        rq = jnp.swapaxes(rows_quant.astype(dt), 0, 1)
        hess, cross = prod(rq, rq), prod(rq, r)
        gram = None if stats.gram is None else prod(r, r)
    new = stats._replace(
        hess=stats.hess + hess, cross=stats.cross + cross, count=stats.count + rows.shape[0]
    )
    if stats.gram is not None:
        return new._replace(gram=stats.gram + gram)
    w = w.astype(dt)
    new = new._replace(out_ref=stats.out_ref + _sum_sq_outputs(r, w))
    if rows_quant is None:  # no drift: X - X~ = 0
        return new
    return new._replace(out_drift=stats.out_drift + _sum_sq_outputs(r - rq, w))


def stats_from_data(
    x: jax.Array, x_quant: jax.Array | None = None, dtype=jnp.float32
) -> LayerStats:
    """Statistics of one Dense problem from whole data matrices x, x_quant (m, N)."""
    return accumulate(
        init_stats(x.shape[-1], 1, dtype),
        dense_rows(x),
        None if x_quant is None else dense_rows(x_quant),
    )


class StatsAccumulator:
    """Accumulates a layer's statistics over calibration batches.

    ``geometry=None`` means a Dense layer (inputs (..., N)); a ``ConvGeometry`` means a Conv
    layer (NHWC inputs, patch rows). For conv layers ``patch_fraction < 1`` keeps a seeded
    random subset of each batch's patch rows (the SIMODS code kept 25% of conv patches); the
    same rows are kept for the float and the quantized inputs. Dense layers always keep every
    row (one per sample: there is nothing redundant to drop). With ``mesh`` (a Mesh or "auto")
    each batch's rows are split over the devices and every product is summed across them (data
    parallel). With the layer's float ``kernel`` (Flax layout (..., cin/g, cout)) F is not
    accumulated: the result carries ||X w_j||^2 and ||(X - X~) w_j||^2 per neuron instead
    (``LayerStats.out_ref``, ``out_drift``), which is cheaper and enough to quantize that kernel.
    """

    def __init__(
        self,
        features: int,
        geometry: ConvGeometry | None = None,
        dtype=jnp.float32,
        patch_fraction: float = 1.0,
        seed: int = 0,
        mesh=None,
        kernel: jax.Array | None = None,
    ):
        if not 0 < patch_fraction <= 1:
            raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
        self.geometry = geometry
        groups = 1 if geometry is None else geometry.feature_group_count
        self._w = None
        if kernel is not None:
            kernel = jnp.asarray(kernel)
            if (
                kernel.ndim < 2
                or int(np.prod(kernel.shape[:-1])) != features
                or kernel.shape[-1] % groups
            ):
                raise ValueError(
                    f"kernel shape {tuple(kernel.shape)} does not match {groups} "
                    f"group(s) of {features} input features"
                )
            self._w = grouped_kernel(kernel, groups).astype(dtype)
        self.stats = init_stats(
            features, groups, dtype, neurons=None if self._w is None else self._w.shape[-1]
        )
        self.patch_fraction = patch_fraction
        self._key = jax.random.PRNGKey(seed)
        self._batches = 0
        self.mesh = resolve_mesh(mesh)
        if self.mesh is not None:
            self.stats = replicate(self.stats, self.mesh)
            self._w = None if self._w is None else replicate(self._w, self.mesh)

    def rows(self, x: jax.Array) -> jax.Array:
        if self.geometry is None:
            if x.shape[-1] != self.stats.features:
                raise ValueError(
                    f"Dense input has {x.shape[-1]} features, layer expects {self.stats.features}"
                )
            return dense_rows(x)
        return conv_rows(x, self.geometry)

    def _kept_rows(self, input_shape: tuple[int, ...]) -> jax.Array | None:
        """This batch's seeded subset of conv patch rows (indices), or None for all rows."""
        if self.patch_fraction >= 1 or self.geometry is None:
            return None
        _check_conv_input(input_shape, self.geometry)
        m = conv_row_count(input_shape, self.geometry)
        keep = max(1, int(round(self.patch_fraction * m)))
        if keep >= m:
            return None
        key = jax.random.fold_in(self._key, self._batches)
        return jax.random.choice(key, m, (keep,), replace=False)

    def update(self, x: jax.Array, x_quant: jax.Array | None = None) -> StatsAccumulator:
        """Add one batch of layer inputs (float model ``x``, quantized model ``x_quant``)."""
        same = x_quant is None or x_quant is x  # first layer: one product instead of three
        xq = x if x_quant is None else x_quant
        if tuple(x.shape) != tuple(xq.shape):
            raise ValueError(f"x {tuple(x.shape)} and x_quant {tuple(xq.shape)} differ in shape")
        idx = self._kept_rows(x.shape)
        if idx is None:
            r = self.rows(x)
            rq = r if same else self.rows(xq)
        else:  # only the kept patches are built, the same ones for x and x_quant
            r = conv_rows_at(x, self.geometry, idx)
            rq = r if same else conv_rows_at(xq, self.geometry, idx)
        count = r.shape[0]
        if self.mesh is not None:  # zero rows pad to the device count and add nothing
            r, rq = shard_along(r, self.mesh, 0), shard_along(rq, self.mesh, 0)
        new = accumulate(self.stats, r, None if same else rq, self._w)
        self.stats = new._replace(count=self.stats.count + count)
        self._batches += 1
        return self

    def result(self) -> LayerStats:
        return self.stats


def _colwise_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per column: sum_i a[g, i, n] * b[g, i, n] -> (g, n)."""
    return jnp.einsum("gin,gin->gn", a, b, precision=HIGHEST)


def _matmul(m: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("gij,gjn->gin", m, b, precision=HIGHEST)


class ErrorTerms(NamedTuple):
    """The parts of ||X W - X~ Q||^2 that do not depend on Q (see ``output_error_sq``).

    const: (g, n) W^T (F - G - G^T + H) W = ||(X - X~) w_j||^2.  cross_w: (g, N, n) (G - H) W.
    ref: (g, n) ||X w_j||^2 = W^T F W.
    """

    const: jax.Array
    cross_w: jax.Array
    ref: jax.Array


@jax.jit
def error_terms(stats: LayerStats, w: jax.Array) -> ErrorTerms:
    """Precompute the Q-independent error terms for grouped weights w (g, N, n).

    Statistics without F use their accumulated per-neuron norms, which belong to the kernel the
    accumulator was given: ``w`` must be that kernel.
    """
    h, g_, f = stats.hess, stats.cross, stats.gram
    w = w.astype(h.dtype)
    gw, hw = _matmul(g_, w), _matmul(h, w)
    if f is None:
        if stats.out_ref.shape != w.shape[::2]:
            raise ValueError(
                f"statistics hold output norms of {stats.out_ref.shape} neurons "
                f"(groups, per group); the weights have {w.shape[::2]}"
            )
        return ErrorTerms(stats.out_drift, gw - hw, stats.out_ref)
    fw = _matmul(f, w)
    gtw = _matmul(jnp.swapaxes(g_, -1, -2), w)
    return ErrorTerms(_colwise_dot(w, fw - gw - gtw + hw), gw - hw, _colwise_dot(w, fw))


@jax.jit
def error_given_terms(
    stats: LayerStats, terms: ErrorTerms, w: jax.Array, q: jax.Array
) -> jax.Array:
    """Per-neuron ||X w_j - X~ q_j||^2 (g, n): one N x N x n product per call."""
    d = w.astype(stats.hess.dtype) - q.astype(stats.hess.dtype)
    err = terms.const + 2 * _colwise_dot(d, terms.cross_w) + _colwise_dot(d, _matmul(stats.hess, d))
    return jnp.maximum(err, 0.0)


def output_error_sq(stats: LayerStats, w: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-neuron ||X w_j - X~ q_j||^2 and ||X w_j||^2 from the statistics.

    w, q: (g, N, n) grouped weights and dequantized weights. Returns two (g, n) arrays.
    With D = W - Q: ||XW - X~Q||^2 = W^T(F - G - G^T + H)W + 2 D^T(G - H)W + D^T H D,
    which keeps the dominant D^T H D term free of cancellation.
    """
    terms = error_terms(stats, w)
    return error_given_terms(stats, terms, w, q), terms.ref


__all__ = [
    "LayerStats",
    "ConvGeometry",
    "StatsAccumulator",
    "init_stats",
    "dense_rows",
    "conv_rows",
    "conv_rows_at",
    "conv_row_count",
    "accumulate",
    "stats_from_data",
    "output_error_sq",
    "ErrorTerms",
    "error_terms",
    "error_given_terms",
    "grouped_kernel",
]
