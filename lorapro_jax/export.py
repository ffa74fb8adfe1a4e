"""``lorapro_jax.export``: merged weights and PEFT adapters, as documented in the README.

The code lives in :mod:`lorapro_jax.io.merged` (``W0 + s a b`` weights, Flax or Hugging Face form) and
:mod:`lorapro_jax.io.peft` (PEFT adapter directories); this module gathers their public names under the
import path users are shown (``from lorapro_jax.export import save_peft_adapter``).
"""

from .io import peft as _peft
from .io.merged import export_merged, export_merged_hf
from .io.peft import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    load_peft_adapter,
    modules_to_save_state_dict,
    peft_config,
    peft_module_rank_alpha,
    peft_state_dict,
    save_peft_adapter,
)

__all__ = ["export_merged", "export_merged_hf", *_peft.__all__]
