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

from .sharding import DATA_AXIS

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


def process_batch_slice(
    global_batch_size: int, mesh: Mesh, spec: PartitionSpec = PartitionSpec(DATA_AXIS)
) -> slice:
    """Rows of the global batch this process must feed to :func:`global_batch`.

    Read from the sharding itself (the rows held by this process's devices), so it is right for any
    device order of ``mesh``.

    Raises:
      ValueError: the rows of this process are not one contiguous block (use a mesh whose
        ``"data"`` axis runs over processes in order, as :func:`lorapro_jax.sharding.make_mesh`
        builds it from ``jax.devices()``).
    """
    sharding = NamedSharding(mesh, spec)
    index = sharding.addressable_devices_indices_map((global_batch_size,))
    spans = sorted({(sl[0].start or 0, global_batch_size if sl[0].stop is None else sl[0].stop) for sl in index.values()})
    lo, hi = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > hi:
            raise ValueError(
                f"process {jax.process_index()} holds non-contiguous batch rows {spans} of {global_batch_size}; "
                "order the mesh's data axis by process."
            )
        hi = max(hi, b)
    return slice(lo, hi)


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
