"""Multi-process (multi-host) helpers: initialisation and global batches from per-process shards.

On TPU pods and multi-GPU clusters ``jax.distributed.initialize()`` usually finds its arguments
itself; on CPU (tests, loopback) it needs the coordinator address, the process count and id, and a
CPU collectives implementation (``gloo``) so that cross-process all-reduces work.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..sharding import DATA_AXIS

__all__ = ["initialize", "process_batch_slice", "global_batch"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str | None = "gloo",
    local_cpu_devices: int | None = None,
    initialization_timeout: int = 300,
) -> None:
    """``jax.distributed.initialize`` plus the CPU settings multi-process CPU runs need.

    Call it before any other JAX call in every process.

    Args:
      coordinator_address: ``"host:port"`` of process 0 (auto-detected on TPU pods / SLURM).
      num_processes: total process count.
      process_id: this process's index in ``[0, num_processes)``.
      cpu_collectives: value for ``jax_cpu_collectives_implementation`` (``"gloo"`` or ``"mpi"``);
        ``None`` leaves it alone. Without it CPU processes cannot all-reduce across each other.
        Harmless on GPU/TPU.
      local_cpu_devices: how many CPU devices each process exposes (``jax_num_cpu_devices``).
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if local_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(local_cpu_devices))
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None, axis: str = DATA_AXIS) -> slice:
    """Rows of the global batch this process feeds (its contiguous share along the leading axis).

    With a mesh whose ``axis`` spans the processes in order (as :func:`lorapro_jax.sharding.make_mesh`
    builds it from ``jax.devices()``), process ``i`` of ``P`` holds rows ``[i B/P, (i+1) B/P)``.

    Raises:
      ValueError: the batch does not split evenly across processes.
    """
    p, i = jax.process_count(), jax.process_index()
    if global_batch_size % p:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count {p}.")
    k = global_batch_size // p
    return slice(i * k, (i + 1) * k)


def global_batch(local: Any, mesh: Mesh, spec: PartitionSpec = PartitionSpec(DATA_AXIS)) -> Any:
    """Assembles global arrays from this process's rows (``jax.make_array_from_process_local_data``).

    Args:
      local: pytree of this process's NumPy/JAX arrays (rows :func:`process_batch_slice`).
      mesh: the global mesh.
      spec: spec applied to every leaf (leading axis over ``"data"`` by default).

    Returns:
      Pytree of global ``jax.Array`` whose leading dimension is the sum over processes.
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
