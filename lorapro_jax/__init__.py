"""lorapro_jax: LoRA-family fine-tuning for JAX / Flax / Optax, centred on LoRA-Pro (arXiv 2407.18242)."""

__version__ = "0.1.0"

from .lora import (
    KernelSpec,
    LoraConfig,
    LoRAGate,
    LoRALayer,
    LoRAMask,
    LoraOptimizer,
    LoraPair,
    LoRAParam,
    LoRAStat,
    adaptable_paths,
    apply_linen_lora,
    apply_lora,
    decay_base_weights,
    init_linen_lora,
    is_lora_pair,
    linen_targets,
    lora_layers,
    lora_scale,
    lora_state,
    merge_and_unwrap,
    merge_linen_lora,
    merge_lora,
    pair_matrices,
    unmerge_lora,
)
from .optim import (
    LeanMoments,
    LinalgSequence,
    LoraProDecayState,
    ScaleByLoraProAdamState,
    ScaleByLoraProLeanState,
    add_lora_pro_decayed_weights,
    base_decay_factor,
    damped_pinv,
    equivalent_gradient,
    lora_pro_adamw,
    lora_pro_gradients,
    lora_pro_pair_update,
    lora_pro_sgd,
    scale_by_lora_pro,
    scale_by_lora_pro_adam,
    scale_by_lora_pro_lean,
    solve_sylvester_psd,
)
from .optim import lora_plus, lora_plus_adamw, scale_by_lora_plus
from .optim import (  # what a step does with NaN/inf: guard_nonfinite(tx, "raise" | "skip" | "ignore")
    NonFiniteError,
    SkipNonfiniteState,
    guard_nonfinite,
    nonfinite_error,
    nonfinite_skips,
    unwrap_nonfinite_errors,
)
from .init import apply_lora_ga, estimate_full_gradients, lora_ga_export, lora_ga_init
from .rank import (
    ablation_importance,
    active_ranks,
    alora_step,
    apply_alora,
    apply_prilora,
    prilora_prune,
    prilora_rank_schedule,
)
from .errors import CorruptFileError  # raised for a corrupt or truncated file; the message names the file
# Foreign trees (qwix, flax nnx.LoRA, any tree with A and B as separate leaves): pairings find A and B.
from .pairings import Pairing, PairPlan, name_pairing, nnx_lora_pairing, qwix_pairing
from .optim import PairedState, paired
from .pairings import foreign_pairs
from .init.paired import lora_ga_init_paired
from .io.peft_paired import peft_state_dict_paired, save_peft_adapter_paired
from .parallel.placement import shard_optimizer
from .parallel.sharding import lora_partition_specs, optimizer_state_specs, tensor_parallel_rules

import importlib as _importlib

# Subpackages with heavier optional dependencies (transformers, datasets, orbax) load on first use:
# ``lorapro_jax.models``, ``.data``, ``.checkpoint``, ``.export``, ``.sharding``, ``.io``, ``.parallel``.
_LAZY = ("models", "data", "checkpoint", "export", "sharding", "io", "parallel")


def __getattr__(name):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
