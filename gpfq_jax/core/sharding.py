"""Placing the work on several devices: neurons across devices, batch rows data-parallel.

GPFQ's neurons (output columns) are independent and share H and G, so a layer's weights are
split by columns over a 1-D mesh and the statistics are replicated; the statistics' batch
rows are split over the same mesh and summed by XLA (one all-reduce per product). Arrays are
zero-padded to a multiple of the device count: zero columns quantize to nothing that is kept
(they are sliced off) and zero rows add nothing to H, G or F.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AUTO_AXIS = "devices"


def resolve_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """None -> None; "auto" -> a 1-D mesh over all local devices; a Mesh is used as given."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    if mesh == "auto":
        return Mesh(np.asarray(jax.local_devices()), (AUTO_AXIS,))
    raise ValueError(f"mesh must be a jax.sharding.Mesh, 'auto' or None; got {mesh!r}")


def _axis(mesh: Mesh) -> str | tuple[str, ...]:
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def pad_to_multiple(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``a`` along ``axis`` to a multiple of ``multiple``."""
    size = a.shape[axis]
    extra = -size % multiple
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def shard_along(a: jax.Array, mesh: Mesh, axis: int) -> jax.Array:
    """Pad ``a`` along ``axis`` to a multiple of the mesh size and split it over the mesh."""
    axis = axis % a.ndim
    a = pad_to_multiple(a, axis, mesh.size)
    spec = [None] * a.ndim
    spec[axis] = _axis(mesh)
    return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))


def replicate(a, mesh: Mesh):
    """Put a pytree of arrays on every device of the mesh."""
    return jax.device_put(a, NamedSharding(mesh, PartitionSpec()))


def place_batch(batch, mesh: Mesh | None):
    """Split a batch over the mesh's devices along its leading (batch) axis.

    Single process: only when the batch size is a multiple of the device count (otherwise
    the batch stays where it is; the statistics still split its rows). Several processes:
    ``batch`` is this process's share and becomes one global array.
    """
    if mesh is None:
        return batch
    spec = PartitionSpec(tuple(mesh.axis_names), *([None] * (np.ndim(batch) - 1)))
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(batch))
    if batch.shape[0] % mesh.size:
        return batch
    return jax.device_put(batch, sharding)


__all__ = [
    "AUTO_AXIS",
    "pad_to_multiple",
    "place_batch",
    "replicate",
    "resolve_mesh",
    "shard_along",
]
