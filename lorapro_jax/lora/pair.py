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

Stacked pairs (scan-over-layers models, batched einsum kernels): a pair may carry leading *stack* axes,

* ``a``: ``(*stack, *in_shape, r)`` and ``b``: ``(*stack, r, *out_shape)``,

one independent pair per index of ``stack`` (e.g. the layer axis of blocks made with ``nnx.vmap`` and run
under ``nnx.scan``). The static field ``in_ndim`` (the number of input axes) tells stack axes from input
axes: ``stack_ndim = a.ndim - 1 - in_ndim``. It is stored as a count of *input* axes, not of stack axes,
so that the slice of a stacked pair that ``nnx.scan`` hands to one layer (same static fields, one axis
fewer) reads correctly as an unstacked pair. ``in_ndim=None`` (the default) means "no stack axes"
(``in_ndim = a.ndim - 1``). Every consumer treats the stack axes as a batch of independent pairs.

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
    """The two low-rank factors of one adapted weight (or of a stack of them), plus their static scale.

    Attributes:
      a: ``(*stack, *in_shape, r)`` — the paper's ``A`` transposed (Flax layout).
      b: ``(*stack, r, *out_shape)`` — the paper's ``B`` transposed (Flax layout).
      scale: the static LoRA scale ``s`` (``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``).
      in_ndim: static number of input axes of ``a`` (``len(in_shape)``); ``None`` means ``a.ndim - 1``
        (no stack axes). Set it only for stacked pairs.

    Gradients, optimizer updates and optimizer moments of a pair are also ``LoraPair`` nodes with the
    same static fields, so optax transformations that map over leaves treat ``a`` and ``b`` as ordinary
    leaves while LoRA-aware transformations match whole pairs with :func:`is_lora_pair`. Build derived
    pairs with :meth:`replace` so that the static fields carry over.

    Examples:
      >>> import jax.numpy as jnp
      >>> import lorapro_jax as lp
      >>> pair = lp.LoraPair(a=jnp.ones((3, 2)), b=jnp.ones((2, 4)), scale=0.5)  # n = 3, r = 2, m = 4
      >>> pair.rank, pair.kernel_shape
      (2, (3, 4))
      >>> pair.delta()  # s · a @ b, in the base kernel's (in, out) shape
      Array([[1., 1., 1., 1.],
             [1., 1., 1., 1.],
             [1., 1., 1., 1.]], dtype=float32)
      >>> pair.replace(b=jnp.zeros((2, 4))).scale  # static fields carry over
      0.5
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    in_ndim: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def replace(self, **changes: Any) -> "LoraPair":
        """A pair with some fields replaced (``a``, ``b``, ...); the other static fields carry over."""
        return dataclasses.replace(self, **changes)

    @property
    def stack_ndim(self) -> int:
        """Number of leading stack axes (0 for an ordinary pair)."""
        if self.in_ndim is None:
            return 0
        k = len(self.a.shape) - 1 - self.in_ndim
        if k < 0:
            raise ValueError(
                f"LoraPair: a has shape {tuple(self.a.shape)}, too few axes for in_ndim={self.in_ndim} plus the rank."
            )
        return k

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading stack axes ``stack`` shared by ``a`` and ``b`` (``()`` for an ordinary pair)."""
        return tuple(self.a.shape[: self.stack_ndim])

    @property
    def rank(self) -> int:
        """The rank ``r`` (the shared axis of ``a`` and ``b``)."""
        return int(self.a.shape[-1])

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[self.stack_ndim : -1])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[self.stack_ndim + 1 :])

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Shape of the equivalent kernel ``(*stack, *in_shape, *out_shape)``."""
        return self.stack_shape + self.in_shape + self.out_shape

    def delta(self) -> Float[Array, "*kernel"]:
        """The equivalent kernel update ``scale * a @ b`` with shape ``(*stack, *in_shape, *out_shape)``."""
        a2, b2 = pair_matrices(self)
        return (self.scale * (a2 @ b2)).reshape(self.kernel_shape)


def is_lora_pair(x: Any) -> bool:
    """``is_leaf`` predicate: True for :class:`LoraPair` nodes."""
    return isinstance(x, LoraPair)


def pair_matrices(pair: LoraPair) -> tuple[Float[Array, "*stack n r"], Float[Array, "*stack r m"]]:
    """Flattens a pair to Flax-layout matrices ``a: (*stack, n, r)`` and ``b: (*stack, r, m)``.

    For an ordinary pair (no stack axes) these are the 2-D ``(n, r)`` and ``(r, m)``.
    """
    k = pair.stack_ndim
    r = pair.a.shape[-1]
    stack = tuple(pair.a.shape[:k])
    if tuple(pair.b.shape[:k]) != stack or len(pair.b.shape) <= k or pair.b.shape[k] != r:
        raise ValueError(
            f"LoraPair rank mismatch: a has shape {tuple(pair.a.shape)} (stack axes {stack}, rank {r} on its last "
            f"axis) but b has shape {tuple(pair.b.shape)} (expected {stack + (r,)} + out axes)."
        )
    return jnp.reshape(pair.a, stack + (-1, r)), jnp.reshape(pair.b, stack + (r, -1))


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scale ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, arXiv 2312.03732)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}.")
    return float(alpha) / (float(rank) ** 0.5 if rslora else float(rank))
