"""The LoRA parameterization: config, A/B pairing pytree, NNX and Linen transforms, merge/unmerge."""

from .config import LoraConfig
from .nnx_lora import (
    KernelSpec,
    LoRAGate,
    LoRALayer,
    LoRAMask,
    LoRAParam,
    LoRAStat,
    adaptable_paths,
    apply_lora,
    decay_base_weights,
    lora_layers,
    lora_state,
    merge_and_unwrap,
    merge_lora,
    unmerge_lora,
)
from .pair import LoraPair, is_lora_pair, lora_scale, pair_matrices
from .linen_lora import apply_linen_lora, init_linen_lora, linen_targets, merge_linen_lora
from .optimizer import LoraOptimizer
