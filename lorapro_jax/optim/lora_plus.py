"""LoRA+: a larger learning rate for B than for A.

Reference: Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv 2402.12354.
With ``W = W0 + s B A`` (paper layout; Flax ``a = Aᵀ``, ``b = Bᵀ``), LoRA+ sets ``η_B = λ η_A`` with
``λ ≈ 16`` (the paper recommends 2^4 for most tasks).

As an optax transformation, :func:`scale_by_lora_plus` multiplies the ``b`` part of every
:class:`~lorapro_jax.lora.pair.LoraPair` update by ``λ`` and leaves ``a`` as it is. Placed AFTER the
whole optimizer (``optax.chain(optimizer, scale_by_lora_plus(λ))``, which is :func:`lora_plus`) it is
exactly a per-parameter learning rate: every optax optimizer's final update is linear in its learning
rate, so B's step is that of the optimizer run with ``λ η``, including decoupled weight decay
(``λ η wd`` on B, as with PyTorch parameter groups in PEFT's ``create_loraplus_optimizer`` and the
official LoRA+ code). It composes with LoRA-Pro (``optax.chain(lora_pro_adamw(η), scale_by_lora_plus(λ))``),
``optax.masked``, ``optax.inject_hyperparams`` and ``jit``.

Non-LoRA leaves (``non_lora``):

* ``"keep"`` (default): untouched (scale 1).
* ``"peft"``: PEFT's grouping: every 1-D trainable leaf (biases, norm scales, gates) gets ``λ`` like
  B, other leaves 1. PEFT's separate learning rate for LoRA *embedding* adapters
  (``loraplus_lr_embedding``) has no counterpart here: :func:`lorapro_jax.apply_lora` does not adapt
  ``nnx.Embed``.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from ..lora.pair import is_lora_pair
from .nonfinite import DEFAULT_MAX_CONSECUTIVE_SKIPS, NonfiniteMode, guard_nonfinite

__all__ = ["NonLoraMode", "lora_plus", "lora_plus_adamw", "scale_by_lora_plus"]

NonLoraMode = Literal["keep", "peft"]
_NON_LORA = ("keep", "peft")


def _check_ratio(ratio: Any) -> None:
    if isinstance(ratio, (int, float)) and not ratio > 0:
        raise ValueError(f"LoRA+ ratio λ must be positive, got {ratio!r}.")


def _times(x: Any, factor: Any) -> Any:
    if not hasattr(x, "dtype"):
        return x  # optax.MaskedNode or other non-array placeholders
    dt = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(dt) * jnp.asarray(factor, dt)).astype(x.dtype)


def scale_by_lora_plus(ratio: float = 16.0, *, non_lora: NonLoraMode = "keep") -> optax.GradientTransformation:
    """Multiplies the ``b`` (paper ``B``) update of every LoRA pair by ``ratio`` (LoRA+, arXiv 2402.12354).

    Args:
      ratio: ``λ = η_B / η_A`` (a float, or a traced scalar under ``optax.inject_hyperparams``).
      non_lora: ``"keep"`` (other leaves unchanged) or ``"peft"`` (1-D leaves also scaled by ``λ``, as
        in PEFT's ``create_loraplus_optimizer``).

    Returns:
      A stateless ``optax.GradientTransformation`` (``params`` are not needed).
    """
    _check_ratio(ratio)
    if non_lora not in _NON_LORA:
        raise ValueError(f"non_lora must be one of {_NON_LORA}, got {non_lora!r}.")

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def f(node):
            if is_lora_pair(node):
                return node.replace(b=_times(node.b, ratio))
            if non_lora == "peft" and getattr(node, "ndim", None) == 1:
                return _times(node, ratio)
            return node

        return jax.tree.map(f, updates, is_leaf=is_lora_pair), state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_plus(
    optimizer: optax.GradientTransformation, ratio: float = 16.0, *, non_lora: NonLoraMode = "keep"
) -> optax.GradientTransformation:
    """Turns any optax optimizer into its LoRA+ version: ``optax.chain(optimizer, scale_by_lora_plus(ratio))``.

    The optimizer's learning rate is the learning rate of A; B moves with ``ratio`` times it.
    """
    return optax.chain(optimizer, scale_by_lora_plus(ratio, non_lora=non_lora))


def lora_plus_adamw(
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    non_lora: NonLoraMode = "keep",
    mu_dtype: Any = None,
    mask: Any = None,
    on_nonfinite: NonfiniteMode = "raise",
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
) -> optax.GradientTransformation:
    """AdamW with LoRA+ learning rates: A (and non-LoRA leaves) at ``η``, B at ``ratio · η``.

    Equals PyTorch AdamW with parameter groups ``{A: η, B: λη}`` (decoupled weight decay ``η_group · wd``),
    i.e. ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate, scale_by_lora_plus)``.
    Works with ``optax.inject_hyperparams(lora_plus_adamw)(learning_rate=..., ratio=...)``.

    Args:
      learning_rate: ``η`` (float or schedule), the learning rate of A.
      ratio: ``λ``.
      b1, b2, eps, eps_root, mu_dtype: Adam hyper-parameters.
      weight_decay: decoupled weight decay.
      non_lora: see :func:`scale_by_lora_plus`.
      mask: weight-decay mask (as ``optax.adamw``'s ``mask``; PEFT does not decay 1-D parameters).
      on_nonfinite, max_consecutive_skips: as in :func:`~lorapro_jax.lora_pro_adamw`:
        :func:`~lorapro_jax.guard_nonfinite` applied once around the whole chain.
    """
    tx = lora_plus(
        optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay=weight_decay, mask=mask),
        ratio,
        non_lora=non_lora,
    )
    return guard_nonfinite(tx, on_nonfinite, max_consecutive_skips=max_consecutive_skips, name="lora_plus_adamw")
