"""Reading and writing files: safetensors, PEFT adapters, merged weights, orbax checkpoints and their checks.

:mod:`.safetensors` (the format, any dtype), :mod:`.peft` / :mod:`.peft_config` / :mod:`.peft_modules` /
:mod:`.peft_paired` (Hugging Face PEFT adapters), :mod:`.merged` (``W0 + s a b`` weights),
:mod:`.checkpoint` / :mod:`.train_checkpoint` (orbax) with :mod:`.checkpoint_checks` and :mod:`.integrity`
(what is read back is checked before it is used). The checkpoint names need orbax and load on first use;
users import them from ``lorapro_jax.checkpoint`` and the export names from ``lorapro_jax.export``.
"""

import importlib as _importlib

from .merged import export_merged, export_merged_hf
from .peft import load_peft_adapter, peft_config, peft_state_dict, save_peft_adapter
from .peft_paired import peft_state_dict_paired, save_peft_adapter_paired
from .safetensors import read_file, read_header, save_file

_CHECKPOINT = {
    "ADAPTER_FILTER": "checkpoint",
    "read_adapter_metadata": "checkpoint",
    "restore_adapters": "checkpoint",
    "save_adapters": "checkpoint",
    "RestoredTrainState": "train_checkpoint",
    "TrainCheckpointer": "train_checkpoint",
}


def __getattr__(name):
    if name in _CHECKPOINT:
        return getattr(_importlib.import_module(f"{__name__}.{_CHECKPOINT[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
