"""Static-shape rank allocation: per-rank gates, elementwise masks of A, budget schedules.

Every adapted layer is allocated once at its maximum rank ``r_max``; *which* rank slots are in use is
data, not shape: the :class:`~lorapro_jax.lora.nnx_lora.LoRAGate` ``(r_max,)`` of a layer holds 1 for
an active slot and 0 for a masked one, and the optional :class:`~lorapro_jax.lora.nnx_lora.LoRAMask`
(shape of ``a``) masks single entries of A. Changing an allocation writes new values into these
variables, so shapes and pytree structures never change and a jitted train step never recompiles.
The forward pass of a :class:`~lorapro_jax.lora.nnx_lora.LoRALayer` is
``y = base(x) + s * ((x @ (a * a_mask)) * gate) @ b``.

Layout (Flax): ``a`` is the paper's ``Aᵀ`` with shape ``(*in_shape, r)``; ``b`` is ``Bᵀ`` with shape
``(r, *out_shape)``. Rank slot ``i`` of a layer is column ``a[..., i]`` (row ``i`` of the paper's ``A``),
row ``b[i]`` (column ``i`` of the paper's ``B``) and ``gate[i]``.

Used by PRILoRA (:mod:`lorapro_jax.rank.prilora`) and ALoRA (:mod:`lorapro_jax.rank.alora`). The budget
schedule is the cubic schedule of AdaLoRA (Zhang et al., "Adaptive Budget Allocation for
Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv 2303.10512).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from ..lora.config import LoraConfig
from ..lora.nnx_lora import LoRALayer, lora_layers

__all__ = [
    "rank_gates",
    "set_rank_gates",
    "a_masks",
    "set_a_masks",
    "rank_slots",
    "flat_gates",
    "set_flat_gates",
    "active_ranks",
    "active_budget",
    "set_active_ranks",
    "zero_masked_factors",
    "cubic_schedule",
    "cubic_budget_schedule",
    "is_update_step",
]


def _layers(model: nnx.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call lorapro_jax.apply_lora(model, config, rngs=...) first.")
    return layers


def _check_keys(given: Mapping[str, object], layers: Mapping[str, LoRALayer], what: str, *, complete: bool) -> None:
    unknown = sorted(set(given) - set(layers))
    if unknown:
        raise ValueError(f"{what}: unknown LoRA layer paths {unknown}; LoRA layers are {list(layers)}.")
    if complete:
        missing = [p for p in layers if p not in given]
        if missing:
            raise ValueError(f"{what}: no value for LoRA layers {missing}; every LoRA layer needs one.")


def _slot_mask_like(x: Array, on: Array, axis_last: bool) -> Array:
    """Broadcasts per-slot ``on`` ``(*stack, r)`` against ``a`` ``(*stack, *in, r)`` (slot axis last) or ``b``
    ``(*stack, r, *out)`` (slot axis after the stack axes); ``stack`` is ``()`` for an unstacked layer."""
    pad = (1,) * (x.ndim - on.ndim)
    if axis_last:
        return on.reshape(on.shape[:-1] + pad + on.shape[-1:])
    return on.reshape(on.shape + pad)


# -- reading and writing gates / masks --------------------------------------------------------------------
def rank_gates(model: nnx.Module) -> dict[str, Float[Array, "r"]]:
    """``{path: gate (r_max,)}`` of every LoRA layer, in module order."""
    return {p: layer.gate[...] for p, layer in _layers(model).items()}


def set_rank_gates(model: nnx.Module, gates: Mapping[str, ArrayLike]) -> None:
    """Writes per-rank gates ``{path: (r_max,)}`` (a subset of the layers is fine); dtype is kept."""
    layers = _layers(model)
    _check_keys(gates, layers, "set_rank_gates", complete=False)
    for p, g in gates.items():
        old = layers[p].gate[...]
        g = jnp.asarray(g)
        if g.shape != old.shape:
            raise ValueError(f"set_rank_gates: gate for {p!r} has shape {g.shape}, expected {old.shape}.")
        layers[p].gate[...] = g.astype(old.dtype)


def a_masks(model: nnx.Module) -> dict[str, Float[Array, "*in r"]]:
    """``{path: a_mask (*in_shape, r_max)}``; every LoRA layer must have one (``LoraConfig(a_mask=True)``)."""
    out = {}
    for p, layer in _layers(model).items():
        if layer.a_mask is None:
            raise ValueError(f"LoRA layer {p!r} has no a_mask: build the model with LoraConfig(a_mask=True).")
        out[p] = layer.a_mask[...]
    return out


def set_a_masks(model: nnx.Module, masks: Mapping[str, ArrayLike]) -> None:
    """Writes elementwise masks of ``a`` ``{path: (*in_shape, r_max)}`` (a subset of the layers is fine)."""
    layers = _layers(model)
    _check_keys(masks, layers, "set_a_masks", complete=False)
    for p, m in masks.items():
        layer = layers[p]
        if layer.a_mask is None:
            raise ValueError(f"set_a_masks: LoRA layer {p!r} has no a_mask (build with LoraConfig(a_mask=True)).")
        old = layer.a_mask[...]
        m = jnp.asarray(m)
        if m.shape != old.shape:
            raise ValueError(f"set_a_masks: mask for {p!r} has shape {m.shape}, expected {old.shape}.")
        layer.a_mask[...] = m.astype(old.dtype)


# -- the flat view: one vector of all rank slots -----------------------------------------------------------
def _slot_offsets(layers: Mapping[str, LoRALayer]) -> np.ndarray:
    """``[0, r_0, r_0 + r_1, ...]``: where each layer's slots start in the flat order (length ``L + 1``)."""
    return np.cumsum([0] + [layer.gate[...].size for layer in layers.values()])


def rank_slots(model: nnx.Module) -> list[tuple[str, Any]]:
    """``[(path, i), ...]``: the rank slots of all LoRA layers in module order (the order of :func:`flat_gates`).

    A stacked layer (gate ``(*stack, r)``) contributes ``(path, (*index, i))`` for each slice, row-major.
    """
    out = []
    for p, layer in _layers(model).items():
        shape = tuple(layer.gate[...].shape)
        if len(shape) == 1:
            out.extend((p, i) for i in range(shape[0]))
        else:
            out.extend((p, idx) for idx in np.ndindex(*shape))
    return out


def _units(model_or_layers: Any) -> list[tuple[str, tuple]]:
    """``[(path, stack index), ...]``: the independent adapters (one per slice of a stacked layer), in flat order."""
    layers = model_or_layers if isinstance(model_or_layers, Mapping) else _layers(model_or_layers)
    return [(p, idx) for p, layer in layers.items() for idx in np.ndindex(*layer.gate[...].shape[:-1])]


def flat_gates(model: nnx.Module) -> Float[Array, "K"]:
    """All gates concatenated in :func:`rank_slots` order: shape ``(K,)``, ``K = sum of r_max`` (over slices)."""
    return jnp.concatenate([layer.gate[...].reshape(-1) for layer in _layers(model).values()])


def set_flat_gates(model: nnx.Module, gates: Float[Array, "K"]) -> None:
    """Inverse of :func:`flat_gates` (jit-friendly: static split points, traced values)."""
    layers = _layers(model)
    offsets = _slot_offsets(layers)
    if tuple(gates.shape) != (offsets[-1],):
        raise ValueError(f"set_flat_gates: expected shape ({offsets[-1]},) (all rank slots), got {tuple(gates.shape)}.")
    for layer, lo, hi in zip(layers.values(), offsets[:-1], offsets[1:]):
        layer.gate[...] = gates[lo:hi].reshape(layer.gate[...].shape).astype(layer.gate[...].dtype)


# -- budgets ------------------------------------------------------------------------------------------------
def active_ranks(model: nnx.Module) -> dict[str, int]:
    """``{path: number of rank slots with a non-zero gate}`` (summed over the slices of a stacked layer;
    host integers; call eagerly)."""
    return {p: int(jnp.sum(layer.gate[...] != 0)) for p, layer in _layers(model).items()}


def active_budget(model: nnx.Module) -> int:
    """Total number of active rank slots over all LoRA layers (host integer; call eagerly)."""
    return int(jnp.sum(flat_gates(model) != 0))


@functools.partial(jax.jit, static_argnames=("mask_slots",))
def _mask_factors(a, b, a_mask, keep, *, mask_slots: bool):
    """``a * a_mask`` and the slots where ``keep`` is False zeroed in ``a`` and ``b`` (and, with
    ``mask_slots``, in ``a_mask``). One compiled call per layer shape instead of one per eager op."""
    keep_a = _slot_mask_like(a, keep, axis_last=True)
    a = a * keep_a.astype(a.dtype)
    if a_mask is not None:
        if mask_slots:
            a_mask = a_mask * keep_a.astype(a_mask.dtype)
        a = a * a_mask.astype(a.dtype)
    b = b * _slot_mask_like(b, keep, axis_last=False).astype(b.dtype)
    return a, b, a_mask


def zero_masked_factors(model: nnx.Module) -> None:
    """Makes the raw factors equal to the effective ones: ``a *= a_mask``; ``a[..., i] = 0`` and ``b[i] = 0``
    wherever ``gate[i] == 0``. Jit-friendly (call it inside a jitted train step after the optimizer update).

    The forward pass always uses ``a * a_mask`` and ``gate``, so masked entries and gated-off slots never
    reach the output whatever their raw values are. Plain LoRA gradients are zero there, but optimizers
    can still move them: LoRA-Pro's adjusted gradient ``ĝ_A = Q g_A / s² + X A`` mixes the rank rows of
    ``A`` (``Q`` and ``X`` are dense ``r x r``), and Adam momentum / weight decay keep moving entries
    whose gradient became zero. LoRA-Pro's closed form reads the *raw* ``A`` and ``B``
    (``(AAᵀ + δI)⁻¹``, ``(BᵀB + δI)⁻¹``), so keeping raw = effective after each update keeps it
    consistent with the model that is actually trained.
    """
    for layer in _layers(model).values():
        p = layer.pair
        mask = None if layer.a_mask is None else layer.a_mask[...]
        a, b, _ = _mask_factors(p.a, p.b, mask, layer.gate[...] != 0, mask_slots=False)
        layer.lora.set_value(p.replace(a=a, b=b))


def set_active_ranks(
    model: nnx.Module, ranks: int | Mapping[str, int], *, config: LoraConfig | None = None
) -> None:
    """Static-shape allocation: activates the first ``ranks[path]`` slots of each layer, masks the rest.

    For each layer with ``r_max`` slots and target rank ``r``: ``gate = [1]*r + [0]*(r_max - r)``; the
    masked slots' ``a[..., i]``, ``b[i]`` (and ``a_mask[..., i]`` if present) are zeroed; the ``a_mask``
    entries of active slots are left as they are. Call it before creating the optimizer.

    Args:
      model: a model adapted with :func:`~lorapro_jax.apply_lora` at the maximum rank(s).
      ranks: one rank for every layer, or ``{path: rank}`` covering every LoRA layer; ``0 <= r <= r_max``.
      config: if given, the scale of each layer is set to ``config.scale_for(r)`` (``alpha / r`` or
        ``alpha / sqrt(r)``, the scale a true rank-``r`` layer would have; a layer with ``r = 0``
        keeps its scale). Without it the scales stay as built (``alpha / r_max``). The scale is a
        static field of :class:`~lorapro_jax.LoraPair`: set it once, before jitting.
    """
    layers = _layers(model)
    if not isinstance(ranks, Mapping):
        ranks = {p: int(ranks) for p in layers}
    _check_keys(ranks, layers, "set_active_ranks", complete=True)
    for p, layer in layers.items():
        r, r_max = int(ranks[p]), layer.gate[...].shape[-1]
        if not 0 <= r <= r_max:
            raise ValueError(
                f"set_active_ranks: rank {r} for {p!r} is outside [0, {r_max}] (the layer was allocated at rank "
                f"{r_max}; allocate with a larger LoraConfig.rank)."
            )
        on = jnp.broadcast_to(jnp.arange(r_max) < r, layer.gate[...].shape)  # every slice of a stacked layer
        layer.gate[...] = on.astype(layer.gate[...].dtype)
        p = layer.pair
        mask = None if layer.a_mask is None else layer.a_mask[...]
        a, b, mask = _mask_factors(p.a, p.b, mask, on, mask_slots=True)
        if mask is not None:
            layer.a_mask[...] = mask
        scale = config.scale_for(r) if config is not None and r > 0 else p.scale
        layer.lora.set_value(p.replace(a=a, b=b, scale=scale))


# -- schedules ----------------------------------------------------------------------------------------------
def _xp(step):
    return jnp if isinstance(step, jax.Array) else np


def cubic_schedule(step, *, init_value: float, final_value: float, start: int, end: int):
    """Cubic interpolation from ``init_value`` (until ``start``) to ``final_value`` (from ``end`` on).

    ``v(t) = final + (init − final) · (1 − (t − start) / (end − start))³`` for ``start < t < end``
    (AdaLoRA's budget curve: fast change early, slow near the end). Works on Python numbers
    (returns a float) and on JAX scalars under jit (returns a float32 array).
    """
    if end <= start:
        raise ValueError(f"cubic_schedule: need end > start, got start={start}, end={end}.")
    xp = _xp(step)
    t = xp.clip((xp.asarray(step, dtype=xp.float32) - start) / float(end - start), 0.0, 1.0)
    v = final_value + (init_value - final_value) * (1.0 - t) ** 3
    return v if xp is jnp else float(v)


def cubic_budget_schedule(
    step: int, *, init_budget: int, target_budget: int, t_init: int, t_final: int, total_steps: int
) -> int:
    """AdaLoRA's cubic budget schedule (integer budget, host side).

    ``b(t) = init_budget`` for ``t <= t_init``; ``target_budget`` for ``t >= T − t_final``; in between
    ``floor(target + (init − target) · (1 − (t − t_init) / (T − t_final − t_init))³)``, computed in exact
    integer arithmetic (``T = total_steps``). For a float schedule usable under jit see :func:`cubic_schedule`.
    """
    end = total_steps - t_final
    if not 0 <= t_init < end <= total_steps:
        raise ValueError(
            f"cubic_budget_schedule: need 0 <= t_init < total_steps - t_final <= total_steps, got t_init={t_init}, "
            f"t_final={t_final}, total_steps={total_steps}."
        )
    step = int(step)
    if step <= t_init:
        return int(init_budget)
    if step >= end:
        return int(target_budget)
    return int(target_budget) + ((int(init_budget) - int(target_budget)) * (end - step) ** 3) // (end - t_init) ** 3


def is_update_step(step, *, start: int, end: int, every: int):
    """True when ``start <= step <= end`` and ``(step − start) % every == 0`` (Python or JAX scalar)."""
    if every <= 0:
        raise ValueError(f"is_update_step: every must be positive, got {every}.")
    inside = (step >= start) & (step <= end)
    return inside & ((step - start) % every == 0)
