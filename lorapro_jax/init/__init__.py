"""Data-driven LoRA initialisations: LoRA-GA (arXiv 2407.05000) and its gradient estimation / SVD tools."""

from .gradients import estimate_full_gradients, lora_kernel_paths, paper_gradient
from .lora_ga import (
    Direction,
    ScaleMode,
    apply_lora_ga,
    lora_ga_delta,
    lora_ga_delta_kernel,
    lora_ga_export,
    lora_ga_factors,
    lora_ga_init,
    lora_ga_original_kernels,
)
from .svd import SvdMethod, randomized_svd, truncated_svd

__all__ = [
    "Direction",
    "ScaleMode",
    "SvdMethod",
    "apply_lora_ga",
    "estimate_full_gradients",
    "lora_ga_delta",
    "lora_ga_delta_kernel",
    "lora_ga_export",
    "lora_ga_factors",
    "lora_ga_init",
    "lora_ga_original_kernels",
    "lora_kernel_paths",
    "paper_gradient",
    "randomized_svd",
    "truncated_svd",
]
