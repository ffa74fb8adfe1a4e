"""LoRA configuration shared by the NNX and Linen transforms."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Sequence

from .._utils import matches_targets
from .pair import lora_scale

__all__ = ["LoraConfig"]

InitName = Literal["kaiming", "gaussian"]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How to adapt a model with LoRA.

    Args:
      rank: LoRA rank ``r`` (must satisfy ``r <= min(m, n)`` for every targeted ``m x n`` weight).
      alpha: LoRA ``alpha``; the scale is ``alpha / r`` or ``alpha / sqrt(r)`` with ``rslora``.
      targets: which layers to adapt, matched against the dotted module path
        (e.g. ``"encoder.layer.0.attention.self.query"``). A string is a regular expression that must
        match the WHOLE path (``re.fullmatch``, as in PEFT); a sequence of strings selects every path
        equal to, or ending in ``"." +``, one of them. A target that matches no adaptable layer is an
        error that lists the adaptable paths.
      rslora: use rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, arXiv 2312.03732).
      dropout: dropout rate applied to the input of the LoRA branch (0 disables it).
      init: ``"kaiming"`` (default, PEFT's): A ~ U(-1/sqrt(n), 1/sqrt(n)), B = 0;
        ``"gaussian"``: A ~ N(0, 1/r), B = 0. Data-driven inits (LoRA-GA) live in
        :mod:`lorapro_jax.init` and overwrite A, B (and W0) after ``apply_lora``.
      param_dtype: dtype of A and B.
      rank_overrides: optional per-layer ranks ``{path_regex: rank}`` (first full match wins); used by
        rank schedules such as PRILoRA. The scale of a layer uses its own rank.
      a_mask: allocate a 0/1 mask with the shape of ``a`` (elementwise pruning of A, PRILoRA).
      track_input_norm: keep an EMA of the per-feature L2 norm of each adapted layer's input
        (``||x_j||`` over the batch), updated in the forward pass when the layer is not deterministic.
      input_norm_decay: EMA decay for ``track_input_norm``.

    Examples:
      >>> import lorapro_jax as lp
      >>> config = lp.LoraConfig(rank=4, alpha=8.0, targets=["query", "value"])
      >>> config.matches("encoder.layer.0.attention.query"), config.matches("encoder.layer.0.attention.key")
      (True, False)
      >>> config.scale_for(4)  # alpha / r
      2.0
      >>> lp.LoraConfig(rank=4, alpha=8.0, rslora=True).scale_for(4)  # alpha / sqrt(r)
      4.0
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | Sequence[str] = r".*"
    rslora: bool = False
    dropout: float = 0.0
    init: InitName = "kaiming"
    param_dtype: str = "float32"
    rank_overrides: tuple[tuple[str, int], ...] | dict | None = None
    a_mask: bool = False
    track_input_norm: bool = False
    input_norm_decay: float = 0.9

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive integer, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoraConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}.")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"LoraConfig.targets is not a valid regex: {self.targets!r} ({e}).") from e
        if isinstance(self.rank_overrides, dict):
            object.__setattr__(self, "rank_overrides", tuple(self.rank_overrides.items()))

    def matches(self, path: str) -> bool:
        """Whether the dotted module ``path`` is targeted."""
        return matches_targets(self.targets, path)

    def rank_for(self, path: str) -> int:
        """The rank used for the layer at ``path`` (``rank_overrides`` first, else ``rank``)."""
        for pattern, r in self.rank_overrides or ():
            if re.fullmatch(pattern, path):
                return int(r)
        return self.rank

    def scale_for(self, rank: int) -> float:
        """The LoRA scale for a layer of the given rank."""
        return lora_scale(self.alpha, rank, self.rslora)
