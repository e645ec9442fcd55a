"""One device mesh over all devices of all hosts, and global batches built from host-local data."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize() -> None:
    """Join a multi-host run (`jax.distributed.initialize`) when one is configured.

    On Cloud TPU pod slices JAX discovers the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM/Open MPI).
    A single-host run needs none of this.
    """
    multi_host = ("JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_NTASKS" in os.environ
                  or "OMPI_COMM_WORLD_SIZE" in os.environ or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)
    if not multi_host:
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def data_mesh() -> Mesh:
    """A 1-D mesh named 'data' over every device of every host (pure data parallelism)."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn each host's slice of the batch into global arrays sharded over the 'data' axis.

    Every host passes its own `B / process_count` rows; the result has the global leading dimension.
    """
    sharding = batch_sharded(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}


def is_main_process() -> bool:
    return jax.process_index() == 0


def host_value(x: Any) -> np.ndarray:
    """Fetch a replicated or fully addressable array to host memory (works on every host)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
