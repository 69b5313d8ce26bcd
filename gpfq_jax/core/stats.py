"""Streaming layer statistics: H = X~^T X~, G = X~^T X, F = X^T X over calibration batches.

GPFQ needs only H and G. F serves the reported output error and its Q-independent part; when
the layer's float kernel W is known while accumulating (``StatsAccumulator(..., kernel=W)``,
what ``quantize_params`` does), F is replaced by two per-neuron sums, ||X w_j||^2 and
||(X - X~) w_j||^2, which cost rows x N x n instead of rows x N^2 (one product in three fewer).

A layer is ``g`` independent matrix problems of N input features each; its rows (samples
for Dense, conv patches for Conv) come from ``gpfq_jax.core.patches``.

Memory is O(g N^2) whatever the number of rows. Accumulation runs in the statistics' dtype
(float32 by default: each batch's products at HIGHEST precision, then a running sum; pass
``dtype=jnp.float64`` with ``jax_enable_x64`` for float64).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpfq_jax.core.numerics import (
    HIGHEST,
    as_float32_safe,
    check_fraction,
    check_real,
    max_abs,
    pow2_normalizer,
    scaled,
)
from gpfq_jax.core.patches import (
    ConvGeometry,
    MatrixView,
    check_conv_input,
    conv_row_count,
    conv_rows,
    conv_rows_at,
    dense_rows,
    grouped_kernel,
    view_rows,
)
from gpfq_jax.core.sharding import replicate, resolve_mesh, shard_along


class LayerStats(NamedTuple):
    """Second-moment statistics of one layer's inputs.

    hess: (g, N, N) H = X~^T X~.  cross: (g, N, N) G = X~^T X.  xtx: (g, N, N) F = X^T X,
    or None when the statistics were accumulated for one known kernel W (g, N, n); then
    out_ref: (g, n) sum of ||X w_j||^2 and out_drift: (g, n) sum of ||(X - X~) w_j||^2 stand
    in for it (the output error they give holds for that W only).
    count: number of rows accumulated (samples for Dense, patches for Conv).
    """

    hess: jax.Array
    cross: jax.Array
    xtx: jax.Array | None
    count: jax.Array
    out_ref: jax.Array | None = None
    out_drift: jax.Array | None = None

    @property
    def groups(self) -> int:
        return self.hess.shape[0]

    @property
    def features(self) -> int:
        return self.hess.shape[-1]


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


def _sum_sq_outputs(r: jax.Array, w: jax.Array) -> jax.Array:
    """Per neuron sum over rows of (r @ w)^2: r (g, m, N), w (g, N, n) -> (g, n)."""
    y = jnp.einsum("gmi,gin->gmn", r, w, precision=HIGHEST)
    return jnp.sum(y * y, axis=1)


def _check_kernel(stats: LayerStats, w: jax.Array | None) -> None:
    if stats.xtx is None and w is None:
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
        cross = xtx = hess
    else:
        rq = jnp.swapaxes(rows_quant.astype(dt), 0, 1)
        hess, cross = prod(rq, rq), prod(rq, r)
        xtx = None if stats.xtx is None else prod(r, r)
    new = stats._replace(
        hess=stats.hess + hess, cross=stats.cross + cross, count=stats.count + rows.shape[0]
    )
    if stats.xtx is not None:
        return new._replace(xtx=stats.xtx + xtx)
    w = w.astype(dt)
    new = new._replace(out_ref=stats.out_ref + _sum_sq_outputs(r, w))
    if rows_quant is None:  # no drift: X - X~ = 0
        return new
    return new._replace(out_drift=stats.out_drift + _sum_sq_outputs(r - rq, w))


def stats_from_data(
    x: jax.Array, x_quant: jax.Array | None = None, dtype=jnp.float32
) -> LayerStats:
    """Statistics of one Dense problem from whole data matrices x, x_quant (m, N).

    Inputs far outside float32's comfortable range are first multiplied by one exact power of
    two (``pow2_normalizer``); the statistics are then those of the scaled rows.
    """
    x = as_float32_safe("x", x)
    x_quant = None if x_quant is None else as_float32_safe("x_quant", x_quant)
    check_real("x", x)
    if x_quant is not None:
        check_real("x_quant", x_quant)
        if x_quant.shape != x.shape:
            raise ValueError(f"x_quant shape {tuple(x_quant.shape)} differs from x shape "
                             f"{tuple(x.shape)}")  # fmt: skip
    scale = pow2_normalizer(max_abs(x, x_quant))
    return accumulate(
        init_stats(x.shape[-1], 1, dtype),
        dense_rows(scaled(x, scale)),
        None if x_quant is None else dense_rows(scaled(x_quant, scale)),
    )


class StatsAccumulator:
    """Accumulates a layer's statistics over calibration batches.

    ``geometry=None`` means a Dense layer (inputs (..., N)); a ``ConvGeometry`` means a Conv
    layer (NHWC inputs, patch rows); ``view`` (a ``MatrixView``, with geometry None) a general
    layer (DenseGeneral / Einsum: rows from the view; ``kernel`` in its (N, g*n) matrix layout,
    ``core.general.matrix_layout``). For conv layers ``patch_fraction < 1`` keeps a seeded
    random subset of each batch's patch rows (the SIMODS code kept 25% of conv patches); the
    same rows are kept for the float and the quantized inputs. Dense layers always keep every
    row (one per sample: there is nothing redundant to drop). With ``mesh`` (a Mesh or "auto")
    each batch's rows are split over the devices and every product is summed across them (data
    parallel). With the layer's float ``kernel`` (Flax layout (..., cin/g, cout)) F is not
    accumulated: the result carries ||X w_j||^2 and ||(X - X~) w_j||^2 per neuron instead
    (``LayerStats.out_ref``, ``out_drift``), which is cheaper and enough to quantize that
    kernel.

    Scale safety: inputs whose first batch lies far outside float32's comfortable range are
    multiplied by one exact power of two, ``row_scale``, fixed at the first batch (the
    statistics are those of ``row_scale * rows``); the kernel likewise by
    ``pow2_normalizer(max |kernel|)``, the same factor ``quantize_from_stats`` applies. Ratios
    (codes, relative errors) do not change.
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
        view: MatrixView | None = None,
    ):
        check_fraction("patch_fraction", patch_fraction)
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise ValueError(f"statistics dtype must be float32 or float64, got {jnp.dtype(dtype)}")
        self.geometry, self.view = geometry, view
        groups = 1 if geometry is None else geometry.feature_group_count
        if view is not None:
            if geometry is not None or view.features != features:
                raise ValueError(f"a view of {view.features} features needs geometry=None and "
                                 f"features={view.features}, got {features}")  # fmt: skip
            groups = view.groups
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
            kernel = scaled(kernel, pow2_normalizer(max_abs(kernel)))
            self._w = grouped_kernel(kernel, groups).astype(dtype)
        self.stats = init_stats(
            features, groups, dtype, neurons=None if self._w is None else self._w.shape[-1]
        )
        self.patch_fraction = patch_fraction
        self._key = jax.random.PRNGKey(seed)
        self._batches = 0
        self.row_scale: float | None = None  # fixed by the first batch
        self.mesh = resolve_mesh(mesh)
        if self.mesh is not None:
            self.stats = replicate(self.stats, self.mesh)
            self._w = None if self._w is None else replicate(self._w, self.mesh)

    def rows(self, x: jax.Array) -> jax.Array:
        if self.view is not None:
            return view_rows(x, self.view)
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
        check_conv_input(input_shape, self.geometry)
        m = conv_row_count(input_shape, self.geometry)
        keep = max(1, int(round(self.patch_fraction * m)))
        if keep >= m:
            return None
        key = jax.random.fold_in(self._key, self._batches)
        return jax.random.choice(key, m, (keep,), replace=False)

    def update(self, x: jax.Array, x_quant: jax.Array | None = None) -> StatsAccumulator:
        """Add one batch of layer inputs (float model ``x``, quantized model ``x_quant``)."""
        same = x_quant is None or x_quant is x  # first layer: one product instead of three
        x = as_float32_safe("x", x)
        xq = x if same else as_float32_safe("x_quant", x_quant)
        check_real("x", x)
        check_real("x_quant", xq)
        if tuple(x.shape) != tuple(xq.shape):
            raise ValueError(f"x {tuple(x.shape)} and x_quant {tuple(xq.shape)} differ in shape")
        if self.row_scale is None:
            self.row_scale = pow2_normalizer(max_abs(x, None if same else xq))
        if self.row_scale != 1.0:  # exact: a power of two
            x, xq = scaled(x, self.row_scale), scaled(xq, self.row_scale)
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


__all__ = ["LayerStats", "StatsAccumulator", "init_stats", "accumulate", "stats_from_data"]
