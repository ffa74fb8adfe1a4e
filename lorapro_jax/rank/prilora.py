"""PRILoRA: linearly rank-increasing LoRA with importance-based pruning of A.

Reference: Benedek & Wolf, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation", Findings of
EACL 2024 (arXiv 2401.11316).

Two parts:

1. **Rank schedule.** The rank of layer ``l`` (of ``L``) rises linearly from ``r_min`` (first layer) to
   ``r_max`` (last layer), e.g. 4 → 12 for a mean of 8, and the ranks are rounded so that their sum is
   exactly ``L · mean_rank`` (the parameter count of uniform LoRA at ``mean_rank`` when every layer
   holds the same targeted modules). Two ways to realise it:

   * per-layer shapes: ``LoraConfig(rank_overrides=...)`` — each layer is built at its own rank;
   * static shapes (default): every layer is built at the largest rank and the rank of layer ``l`` is
     a 0/1 mask in its :class:`~lorapro_jax.lora.nnx_lora.LoRAGate` (first ``r_l`` slots on).

   In both modes the scale of a layer uses **its own rank** ``r_l``: ``alpha / r_l`` (``alpha / sqrt(r_l)``
   with rsLoRA), so the two modes compute the same function.

2. **Pruning of A.** Importance of entry ``(i, j)`` of the paper's ``A`` (``r x n``):
   ``S_ij = |A_ij| · EMA(||x_j||)``, with ``||x_j||`` the L2 norm of input feature ``j`` over the batch
   (tracked by the layer when ``LoraConfig(track_input_norm=True)``). At each pruning step the
   lowest-importance entries of each row of ``A`` are zeroed by writing 0 into the layer's
   :class:`~lorapro_jax.lora.nnx_lora.LoRAMask` (and into ``a``). In the Flax layout ``a`` is ``Aᵀ``
   with shape ``(*in_shape, r)``: row ``i`` of ``A`` is the column ``a[..., i]``, and feature ``j``
   indexes the input axes. Masks only: shapes never change, and pruning can be ``nnx.jit``-ed.

Pruned entries stay zero: the forward pass uses ``a * a_mask``, so their plain LoRA gradient is zero
and the effective ``A`` stays masked whatever an optimizer does to the raw ``a``. LoRA-Pro's adjusted
gradient ``ĝ_A = Q g_A / s² + X A`` is in general *not* zero on masked entries (``Q``, ``X`` mix the
rows of ``A``); the forward pass still ignores them, and
:func:`~lorapro_jax.rank.masks.zero_masked_factors` after each update keeps the raw ``a`` equal to the
effective one (recommended with LoRA-Pro, whose closed form reads the raw ``A``).

Pruning is monotone: an entry pruned once stays pruned (``a_mask`` only ever loses ones).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from ..errors import check_config, check_module
from ..lora.config import LoraConfig
from ..lora.nnx_lora import LoRALayer, adaptable_paths, apply_lora, lora_layers
from .masks import cubic_schedule, is_update_step, set_active_ranks

__all__ = [
    "DEFAULT_LAYER_PATTERN",
    "prilora_rank_schedule",
    "layer_index",
    "prilora_ranks",
    "prilora_config",
    "apply_prilora",
    "prilora_importance",
    "prilora_prune",
    "prilora_pruning_schedule",
]

# The first "layer.N" / "layers.N" / "block.N" / "blocks.N" / "h.N" in a dotted path (HF BERT, Llama, T5, GPT-2):
# the lazy prefix makes T5's "encoder.block.3.layer.0.SelfAttention.q" map to block 3, not to sub-layer 0.
DEFAULT_LAYER_PATTERN = r"(?:.*?\.)?(?:layer|layers|block|blocks|h)\.(\d+)(?:\..*)?"


def prilora_rank_schedule(
    num_layers: int, mean_rank: int, r_min: int | None = None, r_max: int | None = None
) -> list[int]:
    """Per-layer ranks rising linearly from ``r_min`` (first layer) to ``r_max`` (last layer).

    The exact linear values ``r_min + (r_max − r_min) · l / (L − 1)`` have mean ``(r_min + r_max) / 2``,
    which must equal ``mean_rank``. They are rounded by largest remainder (ties go to the deeper layer),
    so the result is non-decreasing, starts at ``r_min``, ends at ``r_max`` and sums to exactly
    ``num_layers · mean_rank``.

    Args:
      num_layers: ``L >= 1``.
      mean_rank: the budget per layer (the rank of the uniform-LoRA baseline).
      r_min: rank of the first layer; default ``max(1, mean_rank // 2)`` (4 for a mean of 8, as in the
        paper), or ``2 · mean_rank − r_max`` when only ``r_max`` is given.
      r_max: rank of the last layer; default ``2 · mean_rank − r_min``.

    Returns:
      ``L`` integer ranks.
    """
    if num_layers < 1:
        raise ValueError(f"prilora_rank_schedule: num_layers must be >= 1, got {num_layers}.")
    if mean_rank < 1:
        raise ValueError(f"prilora_rank_schedule: mean_rank must be >= 1, got {mean_rank}.")
    if r_min is None and r_max is None:
        r_min = max(1, mean_rank // 2)
    if r_min is None:
        r_min = 2 * mean_rank - r_max
    if r_max is None:
        r_max = 2 * mean_rank - r_min
    if r_min + r_max != 2 * mean_rank:
        raise ValueError(
            f"prilora_rank_schedule: a linear schedule from r_min={r_min} to r_max={r_max} has mean "
            f"{(r_min + r_max) / 2}, not mean_rank={mean_rank}; need r_min + r_max = 2 * mean_rank."
        )
    if not 1 <= r_min <= r_max:
        raise ValueError(f"prilora_rank_schedule: need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}.")
    if num_layers == 1:
        return [mean_rank]
    span, den = r_max - r_min, num_layers - 1
    floors, rems = [], []
    for l in range(num_layers):
        q, rem = divmod(span * l, den)  # exact: r_l = r_min + q + rem / den
        floors.append(r_min + q)
        rems.append(rem)
    deficit = num_layers * mean_rank - sum(floors)  # = sum(rems) / den, an integer
    for l in sorted(range(num_layers), key=lambda l: (-rems[l], -l))[:deficit]:
        floors[l] += 1
    return floors


def layer_index(path: str, layer_pattern: str = DEFAULT_LAYER_PATTERN) -> int:
    """The layer number in a dotted module path: group 1 of ``re.fullmatch(layer_pattern, path)``."""
    m = re.fullmatch(layer_pattern, path)
    if m is None or m.lastindex is None:
        raise ValueError(
            f"LoRA layer path {path!r} does not match layer_pattern {layer_pattern!r} (a regex matched against the "
            "whole path, with one capture group holding the layer number, e.g. r'encoder\\.layer\\.(\\d+)\\..*')."
        )
    return int(m.group(1))


def prilora_ranks(
    paths: Sequence[str],
    mean_rank: int,
    *,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    num_layers: int | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
) -> dict[str, int]:
    """``{path: rank}``: every path gets the :func:`prilora_rank_schedule` rank of its layer.

    Args:
      paths: dotted paths of the adapted modules.
      mean_rank: mean rank over layers.
      layer_pattern: regex (full match, one capture group) giving each path's layer number.
      num_layers: ``L``; default ``1 + the largest layer number found``.
      r_min, r_max: see :func:`prilora_rank_schedule`.
    """
    if not paths:
        raise ValueError("prilora_ranks: no paths given.")
    idx = {p: layer_index(p, layer_pattern) for p in paths}
    n = max(idx.values()) + 1 if num_layers is None else num_layers
    too_deep = {p: i for p, i in idx.items() if i >= n}
    if too_deep:
        raise ValueError(f"prilora_ranks: layer numbers {too_deep} are >= num_layers={n}.")
    sched = prilora_rank_schedule(n, mean_rank, r_min, r_max)
    return {p: sched[i] for p, i in idx.items()}


def prilora_config(
    model: nnx.Module,
    config: LoraConfig,
    *,
    static: bool = True,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    num_layers: int | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
) -> tuple[LoraConfig, dict[str, int]]:
    """The :class:`~lorapro_jax.LoraConfig` that builds PRILoRA on ``model``, and the per-path ranks.

    ``config.rank`` is the mean rank. The returned config has ``a_mask=True`` and
    ``track_input_norm=True`` (needed by :func:`prilora_prune`) and, with ``static=False``,
    ``rank_overrides`` giving each layer its own shape; with ``static=True``, ``rank`` = the largest
    per-layer rank (then call :func:`~lorapro_jax.rank.masks.set_active_ranks` after ``apply_lora``, or
    use :func:`apply_prilora`, which does both).
    """
    check_module(model, "model", "prilora_config", "prilora_config(model, config, ...)")
    check_config(config, "prilora_config")
    if config.rank_overrides:
        raise ValueError("prilora_config: config.rank_overrides must be empty; PRILoRA sets the per-layer ranks.")
    paths = [p for p in adaptable_paths(model) if config.matches(p)]
    if not paths:
        raise ValueError(
            f"prilora_config: targets {config.targets!r} match no adaptable layer; adaptable paths: "
            f"{adaptable_paths(model)}"
        )
    ranks = prilora_ranks(
        paths, config.rank, layer_pattern=layer_pattern, num_layers=num_layers, r_min=r_min, r_max=r_max
    )
    common = dict(a_mask=True, track_input_norm=True)
    if static:
        new = dataclasses.replace(config, rank=max(ranks.values()), **common)
    else:
        new = dataclasses.replace(config, rank_overrides={re.escape(p): r for p, r in ranks.items()}, **common)
    return new, ranks


def apply_prilora(
    model: nnx.Module,
    config: LoraConfig,
    *,
    rngs: nnx.Rngs,
    static: bool = True,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    num_layers: int | None = None,
    r_min: int | None = None,
    r_max: int | None = None,
) -> dict[str, int]:
    """Adapts ``model`` in place with PRILoRA ranks (mean ``config.rank``); returns ``{path: rank}``.

    ``static=True``: every layer is allocated at the largest rank ``R`` and layer ``l`` gets
    ``gate = [1]*r_l + [0]*(R − r_l)`` (masked slots' factors and ``a_mask`` zeroed); the scale is
    ``config.scale_for(r_l)`` as with true per-layer shapes, and with ``init="gaussian"`` the active
    columns are rescaled so ``a`` has the distribution a rank-``r_l`` layer would have.
    ``static=False``: true per-layer shapes through ``rank_overrides``.
    """
    new, ranks = prilora_config(
        model, config, static=static, layer_pattern=layer_pattern, num_layers=num_layers, r_min=r_min, r_max=r_max
    )
    apply_lora(model, new, rngs=rngs)
    if static:
        set_active_ranks(model, ranks, config=config)
        if config.init == "gaussian":  # apply_lora drew N(0, 1) / R; a true rank-r layer has N(0, 1) / r
            for p, layer in lora_layers(model).items():
                pair = layer.pair
                layer.lora.set_value(pair.replace(a=pair.a * (new.rank / ranks[p])))
    return ranks


def _require_input_norm(layer: LoRALayer) -> Array:
    if layer.input_norm is None:
        raise ValueError(
            f"PRILoRA importance of {layer.path!r} needs the input-norm statistics: build the model with "
            "LoraConfig(track_input_norm=True) (prilora_config does)."
        )
    return layer.input_norm[...]


def _importance(a: Array, a_mask: Array | None, norm: Array) -> Array:
    a = a.astype(jnp.float32)
    if a_mask is not None:
        a = a * a_mask.astype(jnp.float32)
    return jnp.abs(a) * norm.astype(jnp.float32)[..., None]


def prilora_importance(layer: LoRALayer) -> Float[Array, "*in r"]:
    """``S = |a * a_mask| · EMA(||x||)[..., None]`` with the shape of ``a`` (Flax layout).

    ``S[..., j, i]`` is the paper's ``S_ij = |A_ij| · EMA(||x_j||)`` for rank row ``i`` and input feature
    ``j``. Needs ``LoraConfig(track_input_norm=True)``.
    """
    norm = _require_input_norm(layer)
    return _importance(layer.pair.a, None if layer.a_mask is None else layer.a_mask[...], norm)


def _keep_top_per_row(
    scores: Float[Array, "n r"], mask: Bool[Array, "n r"], keep: Array
) -> Bool[Array, "n r"]:
    """Per column (= row of the paper's A): keeps the ``keep`` highest scores among entries still on.

    ``scores, mask``: ``(*stack, n, r)`` (one independent layer per stack index)."""
    n = scores.shape[-2]
    s = jnp.where(mask, scores, -jnp.inf)  # entries already pruned sort first and stay off
    order = jnp.argsort(s, axis=-2, stable=True)  # ascending; ties by feature index
    position = jnp.argsort(order, axis=-2, stable=True)  # position of each entry in that order
    return (position >= n - keep) & mask


@functools.partial(jax.jit, static_argnames=("stack_ndim",))
def _prune_layer(a: Array, a_mask: Array, norm: Array, keep: Array, stack_ndim: int = 0) -> tuple[Array, Array]:
    """One layer's pruning step on arrays (Flax layout ``a, a_mask: (*stack, *in, r)``, ``norm: (*stack, *in)``),
    slice by slice over the ``stack_ndim`` leading stack axes."""
    r, stack = a.shape[-1], a.shape[:stack_ndim]
    scores = _importance(a, a_mask, norm).reshape(stack + (-1, r))
    on = _keep_top_per_row(scores, a_mask.reshape(stack + (-1, r)) != 0, keep).reshape(a.shape)
    return a * on.astype(a.dtype), on.astype(a_mask.dtype)


def prilora_prune(model: nnx.Module, *, fraction=None, keep=None) -> None:
    """One PRILoRA pruning step on every LoRA layer (in place; ``nnx.jit``-compatible).

    For each layer and each row ``i`` of the paper's ``A`` (column ``a[..., i]``), keeps the entries with
    the highest importance ``S_ij = |A_ij| · EMA(||x_j||)`` among those not yet pruned and zeroes the
    others in ``a_mask`` and ``a``. Pruning is cumulative: the row ends with ``min(keep, unpruned)``
    entries.

    Args:
      model: built with ``LoraConfig(a_mask=True, track_input_norm=True)`` (see :func:`prilora_config`),
        after some training forward passes (``layer.deterministic`` False) so the input norms are
        tracked.
      fraction: target fraction of each row's ``n`` entries that are zero after this step: the row keeps
        ``n − round(fraction · n)`` entries. Python float or traced scalar (no recompilation when it
        changes, see :func:`prilora_pruning_schedule`).
      keep: alternatively, the number of entries each row keeps (capped at ``n``); int or traced scalar.
    """
    if (fraction is None) == (keep is None):
        raise ValueError("prilora_prune: give exactly one of fraction= or keep=.")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("prilora_prune: the model has no LoRA layers.")
    for path, layer in layers.items():
        if layer.a_mask is None:
            raise ValueError(f"prilora_prune: LoRA layer {path!r} has no a_mask; build with LoraConfig(a_mask=True).")
        norm = _require_input_norm(layer)
        if not isinstance(norm, jax.core.Tracer) and not bool(jnp.any(norm > 0)):
            raise ValueError(
                f"prilora_prune: the input-norm EMA of {path!r} is all zero: run training forward passes "
                "(layer.deterministic False) before pruning."
            )
        pair, n = layer.pair, layer.spec.n
        if fraction is not None:
            k = n - jnp.round(jnp.asarray(fraction, jnp.float32) * n).astype(jnp.int32)
        else:
            k = jnp.minimum(jnp.asarray(keep, jnp.int32), n)
        a, mask = _prune_layer(pair.a, layer.a_mask[...], norm, k, stack_ndim=pair.stack_ndim)
        layer.a_mask[...] = mask
        layer.lora.set_value(pair.replace(a=a))


def prilora_pruning_schedule(
    step, *, start: int, end: int, every: int, final_fraction: float, initial_fraction: float = 0.0
):
    """When to prune and how much: ``(do_prune, fraction)`` for :func:`prilora_prune`.

    ``do_prune`` is true every ``every`` steps from ``start`` to ``end`` (inclusive); ``fraction`` (the
    target fraction of zeroed entries per row of A) rises from ``initial_fraction`` at ``start`` to
    ``final_fraction`` at ``end`` along AdaLoRA's cubic curve (:func:`~lorapro_jax.rank.masks.cubic_schedule`);
    pass ``initial_fraction=final_fraction`` for a constant fraction. Python step in → Python values out;
    a JAX scalar step works under jit.
    """
    if not 0.0 <= initial_fraction <= 1.0 or not 0.0 <= final_fraction <= 1.0:
        raise ValueError(
            f"prilora_pruning_schedule: fractions must be in [0, 1], got initial={initial_fraction}, "
            f"final={final_fraction}."
        )
    do = is_update_step(step, start=start, end=end, every=every)
    frac = cubic_schedule(step, init_value=initial_fraction, final_value=final_fraction, start=start, end=end)
    return do, frac
