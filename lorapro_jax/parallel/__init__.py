"""Data/model-parallel and multi-process training for LoRA and LoRA-Pro (see :mod:`lorapro_jax.sharding`)."""

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
