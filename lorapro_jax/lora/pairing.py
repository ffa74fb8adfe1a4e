"""The A/B pairing: one pytree node per adapted base weight.

Everything in lorapro_jax that needs to know "which A goes with which B" (the LoRA-Pro optimizers,
LoRA+, the rank allocators, the sharding rules and the exporters) reads it from a :class:`LoraPair`.
Nothing is paired by name or by order.

Layout (Flax, documented once here and used everywhere):

* The base kernel ``W0`` of a Flax layer has shape ``(*in_shape, *out_shape)``; for ``nnx.Linear``
  that is ``(n, m)`` = ``(in, out)``, i.e. the transpose of the paper's ``m x n`` (out x in) weight.
* ``a`` has shape ``(*in_shape, r)``: it is the paper's ``A`` (``r x n``) transposed.
* ``b`` has shape ``(r, *out_shape)``: it is the paper's ``B`` (``m x r``) transposed.
* The adapted kernel is ``W0 + scale * a @ b`` (flattened over in/out axes), i.e. the paper's
  ``W = W0 + s * B @ A``.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["LoraPair", "is_lora_pair", "pair_matrices", "lora_scale"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraPair:
    """The two low-rank factors of one adapted weight, plus their static scale.

    Attributes:
      a: ``(*in_shape, r)`` — the paper's ``A`` transposed (Flax layout).
      b: ``(r, *out_shape)`` — the paper's ``B`` transposed (Flax layout).
      scale: the static LoRA scale ``s`` (``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``).

    Gradients, optimizer updates and optimizer moments of a pair are also ``LoraPair`` nodes with the
    same ``scale``, so optax transformations that map over leaves treat ``a`` and ``b`` as ordinary
    leaves while LoRA-aware transformations match whole pairs with :func:`is_lora_pair`.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        """The rank ``r`` (the shared axis of ``a`` and ``b``)."""
        return int(self.a.shape[-1])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[:-1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[1:])

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Shape of the equivalent kernel ``(*in_shape, *out_shape)``."""
        return self.in_shape + self.out_shape

    def delta(self) -> Float[Array, "*kernel"]:
        """The equivalent kernel update ``scale * a @ b`` with shape ``(*in_shape, *out_shape)``."""
        a2, b2 = pair_matrices(self)
        return (self.scale * (a2 @ b2)).reshape(self.kernel_shape)


def is_lora_pair(x: Any) -> bool:
    """``is_leaf`` predicate: True for :class:`LoraPair` nodes."""
    return isinstance(x, LoraPair)


def pair_matrices(pair: LoraPair) -> tuple[Float[Array, "n r"], Float[Array, "r m"]]:
    """Flattens a pair to 2-D Flax-layout matrices ``a: (n, r)`` and ``b: (r, m)``."""
    r = pair.a.shape[-1]
    if pair.b.shape[0] != r:
        raise ValueError(
            f"LoraPair rank mismatch: a has shape {tuple(pair.a.shape)} (rank {r} on its last axis) "
            f"but b has shape {tuple(pair.b.shape)} (expected rank {r} on its first axis)."
        )
    return jnp.reshape(pair.a, (-1, r)), jnp.reshape(pair.b, (r, -1))


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, arXiv 2312.03732)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}.")
    return float(alpha) / (float(rank) ** 0.5 if rslora else float(rank))
