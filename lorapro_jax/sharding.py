"""``lorapro_jax.sharding``: partition rules, meshes and sharded optimizers, as documented in the README.

The code lives in :mod:`lorapro_jax.parallel.sharding` (rules and specs) and
:mod:`lorapro_jax.parallel.placement` (meshes and placement); this module gathers their public names under
the import path users are shown (``from lorapro_jax import sharding as sh``).
"""

from .parallel.placement import (
    batch_spec,
    has_explicit_axes,
    make_mesh,
    named_shardings,
    shard_model,
    shard_optimizer,
    shard_tree,
)
from .parallel.sharding import (
    DATA_AXIS,
    MODEL_AXIS,
    P,
    Rules,
    lora_pair_specs,
    lora_partition_specs,
    moment_spec,
    optimizer_state_specs,
    path_str,
    spec_for_path,
    stacked_kernel_spec,
    tensor_parallel_rules,
)

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "P",
    "Rules",
    "batch_spec",
    "has_explicit_axes",
    "lora_pair_specs",
    "lora_partition_specs",
    "make_mesh",
    "moment_spec",
    "named_shardings",
    "optimizer_state_specs",
    "path_str",
    "shard_model",
    "shard_optimizer",
    "shard_tree",
    "spec_for_path",
    "stacked_kernel_spec",
    "tensor_parallel_rules",
]
