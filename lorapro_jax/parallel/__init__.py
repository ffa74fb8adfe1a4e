"""Data/model-parallel and multi-process training for LoRA and LoRA-Pro.

:mod:`.sharding` (partition rules for LoRA factors and optimizer states), :mod:`.placement` (meshes, placing
arrays, sharded optimizers), :mod:`.step` (the sharded train step), :mod:`.distributed` (several processes).
Users reach the first two as ``lorapro_jax.sharding``.
"""

from .distributed import global_batch, initialize, process_batch_slice
from .step import TrainState, make_train_step, shard_for_training

__all__ = [
    "TrainState",
    "shard_for_training",
    "make_train_step",
    "initialize",
    "process_batch_slice",
    "global_batch",
]
