"""Data parallelism: one mesh axis over every device of every host, and putting arrays on it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


def data_parallel_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis mesh over `devices` (default: all of them) with Auto axis types."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(
        (len(devices),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_host_batch(local_batch: np.ndarray, mesh) -> jax.Array:
    """This host's slice of a global batch -> a global array sharded along the batch axis."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH_AXIS)), local_batch)


def shard_global_batch(global_batch: np.ndarray, mesh) -> jax.Array:
    """A global batch that every host holds whole -> sharded, each host giving its slice."""
    per_host = len(global_batch) // jax.process_count()
    start = jax.process_index() * per_host
    return shard_host_batch(global_batch[start : start + per_host], mesh)
