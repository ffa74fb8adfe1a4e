"""lorapro_jax: LoRA-family fine-tuning for JAX / Flax / Optax, centred on LoRA-Pro (arXiv 2407.18242)."""

__version__ = "0.1.0"

from .lora import (
    KernelSpec,
    LoraConfig,
    LoRAGate,
    LoRALayer,
    LoRAMask,
    LoraPair,
    LoRAParam,
    LoRAStat,
    adaptable_paths,
    apply_lora,
    decay_base_weights,
    is_lora_pair,
    lora_layers,
    lora_scale,
    lora_state,
    merge_and_unwrap,
    merge_lora,
    pair_matrices,
    unmerge_lora,
)
from .optim import (
    LeanMoments,
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
