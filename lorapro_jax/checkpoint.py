"""``lorapro_jax.checkpoint``: orbax checkpoints of adapters and of whole training states, as in the README.

The code lives in :mod:`lorapro_jax.io.checkpoint` (adapters) and :mod:`lorapro_jax.io.train_checkpoint`
(:class:`TrainCheckpointer`); this module gathers their public names under the import path users are
shown (``from lorapro_jax.checkpoint import TrainCheckpointer, save_adapters, restore_adapters``).
"""

from .io.checkpoint import ADAPTER_FILTER, FORMAT_VERSION, read_adapter_metadata, restore_adapters, save_adapters
from .io.train_checkpoint import RestoredTrainState, TrainCheckpointer

__all__ = [
    "ADAPTER_FILTER",
    "FORMAT_VERSION",
    "RestoredTrainState",
    "TrainCheckpointer",
    "read_adapter_metadata",
    "restore_adapters",
    "save_adapters",
]
