"""LoRA-aware optax transformations."""

from .linalg import LinalgSequence, damped_pinv, solve_sylvester_psd
from .lora_pro import (
    LoraProDecayState,
    ScaleByLoraProAdamState,
    add_lora_pro_decayed_weights,
    base_decay_factor,
    equivalent_gradient,
    lora_pro_adamw,
    lora_pro_gradients,
    lora_pro_pair_update,
    lora_pro_sgd,
    scale_by_lora_pro,
    scale_by_lora_pro_adam,
)
from .lean import LeanMoments, ScaleByLoraProLeanState, scale_by_lora_pro_lean, truncated_sum
from .lora_plus import lora_plus, lora_plus_adamw, scale_by_lora_plus
from .paired import PairedState, paired
from .nonfinite import (
    NonFiniteError,
    SkipNonfiniteState,
    guard_nonfinite,
    nonfinite_error,
    nonfinite_skips,
    unwrap_nonfinite_errors,
)
