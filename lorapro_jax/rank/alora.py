"""ALoRA: ablation-based rank importance (AB-LoRA) and budget reallocation with static shapes.

Reference: Liu, Lyn, Zhu, Tian, Graham, "ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large
Language Models", NAACL 2024 (arXiv 2403.16187).

``ΔW = B · diag(α) · A`` with one gate ``α_i`` per rank slot; here ``α`` is the layer's
:class:`~lorapro_jax.lora.nnx_lora.LoRAGate` ``(r_max,)``, initialised to 1 and **not trained** (it is
not a :class:`~lorapro_jax.LoRAParam`, so ``nnx.Optimizer(model, tx, wrt=LoRAParam)`` leaves it alone):
ALoRA uses the gates for ablation and as 0/1 masks, and AB-LoRA replaces gradient-based architecture
weights by ablation scores.

* **AB-LoRA importance** of slot ``i`` of module ``k``: ``IS = score(model) − score(model with α_i = 0)``
  for a validation ``score_fn(model, batch) -> scalar`` (higher is better, e.g. accuracy or −loss).
  Positive: the slot helps; negative: it is harmful. All ablations run in ONE jitted call
  (:func:`score_with_gates`) that takes the gate vectors as an array input ``(k, K)`` and maps over its
  rows, so no recompilation happens per ablation or per ALoRA step (as long as ``score_fn`` is the same
  function object and the number of active slots is the same).
* **Reallocation at a fixed budget** (:func:`alora_reallocate`): each module is allocated at
  ``r_max`` slots with only ``r_init`` active (:func:`apply_alora`); a step prunes the ``n_prune``
  lowest-importance active slots (harmful ones first, since they sort lowest), and re-enables as many
  masked slots in the modules none of whose slots were pruned in this step, most important modules first
  (ALoRA, Fig. 1c). Re-enabled slots get a fresh random ``A`` column and ``B = 0``, so the model output is
  unchanged at re-enable; pruned slots get gate 0 and zero factors. The total number of active slots
  stays equal to the budget.

The scale stays ``alpha / r_init`` (the baseline LoRA's) for the whole run: it is a static field of
:class:`~lorapro_jax.LoraPair` and changing it would change the function and recompile.

Gated-off slots never reach the output, but optimizers can move their raw factors (LoRA-Pro's ``X A``
term mixes rank rows; Adam momentum keeps moving); call
:func:`~lorapro_jax.rank.masks.zero_masked_factors` after each update to keep them at zero. Pass ``optimizer=`` to :func:`alora_reallocate` / :func:`alora_step`
to zero the Adam moments of pruned and re-enabled slots (:func:`reset_slot_moments`): a re-enabled slot
otherwise starts with the moments of the slot it replaces (LoRA-Pro's full-form moments are full-size
moments of the equivalent gradient, not per slot, and are left as they are).

Stacked layers (scan-over-layers models, gate ``(*stack, r)``): every slice is its own module for ALoRA
(importance, pruning and re-enabling per slice); slots are ``(path, (*index, i))``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ..errors import check_config, check_module
from ..lora.config import LoraConfig
from ..lora.nnx_lora import apply_lora
from ..lora.pair import LoraPair, is_lora_pair
from .masks import (
    _layers,
    _slot_mask_like,
    _slot_offsets,
    _units,
    flat_gates,
    is_update_step,
    rank_slots,
    set_active_ranks,
    set_flat_gates,
)

__all__ = [
    "apply_alora",
    "score_with_gates",
    "AblationImportance",
    "ablation_importance",
    "Reallocation",
    "alora_reallocate",
    "AloraStepInfo",
    "alora_step",
    "alora_schedule",
    "reset_slot_moments",
]

ScoreFn = Callable[[nnx.Module, Any], Array]


def apply_alora(model: nnx.Module, config: LoraConfig, *, max_rank: int, rngs: nnx.Rngs) -> nnx.Module:
    """Adapts ``model`` for ALoRA: every target allocated at ``max_rank`` slots, the first ``config.rank`` active.

    The budget is LoRA's (``config.rank`` per module) and the scale is ``config.scale_for(config.rank)``,
    so the model starts as exactly the rank-``config.rank`` LoRA model (masked slots have zero factors).
    """
    check_module(model, "model", "apply_alora", "apply_alora(model, config, max_rank=..., rngs=...)")
    check_config(config, "apply_alora")
    if max_rank < config.rank:
        raise ValueError(f"apply_alora: max_rank={max_rank} must be >= config.rank={config.rank}.")
    if config.rank_overrides:
        raise ValueError("apply_alora: config.rank_overrides is not supported (one initial rank for every module).")
    apply_lora(model, dataclasses.replace(config, rank=max_rank), rngs=rngs)
    set_active_ranks(model, config.rank, config=config)
    return model


# -- AB-LoRA importance ------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "score_fn", "batch_size", "eval_mode"))
def _scores_jit(state, batch, gate_rows, *, graphdef, score_fn, batch_size, eval_mode):
    def one(row):
        # a private copy: the gate writes and any side effect of score_fn are dropped
        model = nnx.merge(graphdef, state, copy=True)
        if eval_mode:
            model.eval()
        set_flat_gates(model, row)
        s = jnp.asarray(score_fn(model, batch))
        if s.shape != ():
            raise ValueError(f"score_fn must return a scalar, got shape {s.shape}.")
        return s.astype(jnp.float32)

    return jax.lax.map(one, gate_rows, batch_size=batch_size)


def score_with_gates(
    model: nnx.Module,
    score_fn: ScoreFn,
    batch: Any,
    gate_rows: Float[Array, "k K"],
    *,
    batch_size: int | None = None,
    eval_mode: bool = True,
) -> Float[Array, "k"]:
    """``score_fn`` evaluated with each row of ``gate_rows`` as the model's flat gate vector (jitted, one call).

    Args:
      model: the LoRA model (not modified).
      score_fn: ``score_fn(model, batch) -> scalar``, higher is better. Define it once and reuse the same
        function object: it is a static argument of the jitted computation.
      batch: validation batch (pytree of arrays).
      gate_rows: ``(k, K)`` gate vectors in :func:`~lorapro_jax.rank.masks.rank_slots` order.
      batch_size: evaluate this many rows at once (vmap) instead of one at a time (``jax.lax.map``).
      eval_mode: call ``model.eval()`` on the scoring copy (``deterministic=True``: no dropout, no
        input-norm tracking).

    Returns:
      ``(k,)`` float32 scores.
    """
    graphdef, state = nnx.split(model)
    K = len(rank_slots(model))
    gate_rows = jnp.asarray(gate_rows)
    if gate_rows.ndim != 2 or gate_rows.shape[1] != K:
        raise ValueError(
            f"score_with_gates: gate_rows must have shape (k, {K}) (K = all rank slots), got {gate_rows.shape}."
        )
    return _scores_jit(
        state, batch, gate_rows, graphdef=graphdef, score_fn=score_fn, batch_size=batch_size, eval_mode=eval_mode
    )


class AblationImportance(NamedTuple):
    """Result of :func:`ablation_importance`.

    Attributes:
      base_score: ``()`` score of the model as it is.
      flat: ``(K,)`` importance per rank slot (:func:`~lorapro_jax.rank.masks.rank_slots` order); 0 for
        inactive slots.
      active: ``(K,)`` bool, the slots that were active (and ablated).
      per_layer: ``{path: (r_max,)}`` the same importances split by layer.
    """

    base_score: Float[Array, ""]
    flat: Float[Array, "K"]
    active: Any
    per_layer: dict[str, Float[Array, "r"]]


def ablation_importance(
    model: nnx.Module, score_fn: ScoreFn, batch: Any, *, batch_size: int | None = None, eval_mode: bool = True
) -> AblationImportance:
    """AB-LoRA: ``IS_slot = score(all gates) − score(gate of slot = 0)`` for every active slot.

    Runs ``1 + (number of active slots)`` scorings in one jitted call (:func:`score_with_gates`); the gate
    vectors are data, so calling it again with another allocation of the same budget does not recompile.
    """
    gates = np.asarray(flat_gates(model))
    active = gates != 0
    idx = np.flatnonzero(active)
    rows = np.tile(gates, (1 + idx.size, 1))
    rows[1 + np.arange(idx.size), idx] = 0.0
    scores = score_with_gates(model, score_fn, batch, rows, batch_size=batch_size, eval_mode=eval_mode)
    flat = jnp.zeros(gates.shape, jnp.float32).at[idx].set(scores[0] - scores[1:])
    layers = _layers(model)
    offsets = _slot_offsets(layers)
    per_layer = {
        p: flat[lo:hi].reshape(layer.gate[...].shape) for (p, layer), lo, hi in zip(layers.items(), offsets[:-1], offsets[1:])
    }
    return AblationImportance(scores[0], flat, active, per_layer)


# -- reallocation ------------------------------------------------------------------------------------------
class Reallocation(NamedTuple):
    """What :func:`alora_reallocate` did: lists of ``(path, slot)``."""

    pruned: list[tuple[str, int]]
    grown: list[tuple[str, int]]


@functools.partial(jax.jit, static_argnames=("init", "rank", "n"))
def _reallocate_layer(key, a, b, a_mask, on, new, *, init: str, rank: int, n: int):
    """One layer's writes: slots ``on`` active, of which ``new`` re-enabled with fresh ``a`` and ``b = 0``;
    inactive slots zeroed. Flax layout ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``; ``on, new:
    (*stack, r)`` bool; ``n = prod(in)``."""
    on_b = _slot_mask_like(b, on & ~new, axis_last=False)
    on, new = _slot_mask_like(a, on, axis_last=True), _slot_mask_like(a, new, axis_last=True)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(n)
        a0 = jax.random.uniform(key, a.shape, a.dtype, -bound, bound)
    else:
        a0 = jax.random.normal(key, a.shape, a.dtype) / rank
    a = jnp.where(new, a0, jnp.where(on, a, 0)).astype(a.dtype)
    b = jnp.where(on_b, b, 0).astype(b.dtype)
    if a_mask is not None:
        a_mask = jnp.where(new, 1, jnp.where(on, a_mask, 0)).astype(a_mask.dtype)
    return a, b, a_mask


def alora_reallocate(
    model: nnx.Module,
    importance: Float[Array, "K"] | AblationImportance,
    *,
    n_prune: int,
    key: Array,
    budget: int | None = None,
    min_rank: int = 0,
    init: str = "kaiming",
    init_rank: int | None = None,
    optimizer: Any = None,
) -> Reallocation:
    """Prunes low-importance rank slots and re-enables masked slots elsewhere, at a fixed total budget.

    1. Prune: the ``n_prune`` active slots with the lowest importance (harmful, i.e. negative, ones come
       first), never taking a module below ``min_rank`` active slots; their gate, ``a[..., i]`` and
       ``b[i]`` become 0.
    2. Grow: as many masked slots are re-enabled as needed to reach the budget. Receivers are the modules
       none of whose slots were pruned in this step (ALoRA, Fig. 1c), ordered by the mean importance of
       their remaining active slots (highest first), one slot per module per round; only if they have no
       room left do the other modules receive slots. A re-enabled slot gets gate 1, a fresh random
       ``a[..., i]`` (``init``), ``b[i] = 0`` (so the output does not change) and ``a_mask[..., i] = 1``.

    Runs eagerly: the decisions are host-side, the writes keep every shape and dtype, so jitted train
    steps do not recompile.

    Args:
      model: a model from :func:`apply_alora`.
      importance: ``(K,)`` per-slot importance (higher = more important) or an :class:`AblationImportance`.
      n_prune: number of slots to prune (at least ``active − budget`` are pruned when a smaller
        ``budget`` is given).
      key: PRNG key for the fresh ``A`` columns.
      budget: total active slots after the step (e.g. from
        :func:`~lorapro_jax.rank.masks.cubic_budget_schedule`); default: the current total (conserved).
      min_rank: minimum number of active slots a module keeps.
      init: ``"kaiming"`` (``U(−1/sqrt(n), 1/sqrt(n))``, the default of ``LoraConfig``) or ``"gaussian"``.
      init_rank: the rank dividing the gaussian init (default: the module's ``r_max``, as apply_lora drew it).
      optimizer: the ``nnx.Optimizer`` (or optax state) training the model: the moments of every pruned and
        re-enabled slot are zeroed (:func:`reset_slot_moments`), so a re-enabled slot starts fresh.

    Returns:
      A :class:`Reallocation` with the pruned and the re-enabled ``(path, slot)`` pairs.
    """
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"alora_reallocate: init must be 'kaiming' or 'gaussian', got {init!r}.")
    layers = _layers(model)
    slots = rank_slots(model)
    gates = np.asarray(flat_gates(model))
    if isinstance(importance, AblationImportance):
        importance = importance.flat
    imp = np.asarray(importance, np.float64)
    if imp.shape != gates.shape:
        raise ValueError(
            f"alora_reallocate: importance must have shape {gates.shape} (one value per rank slot), got {imp.shape}."
        )
    active = gates != 0
    n_active = int(active.sum())
    target = n_active if budget is None else int(budget)
    if not 0 <= target <= gates.size:
        raise ValueError(f"alora_reallocate: budget {target} outside [0, {gates.size}] (the number of rank slots).")
    if n_prune < 0:
        raise ValueError(f"alora_reallocate: n_prune must be >= 0, got {n_prune}.")
    n_prune = max(n_prune, n_active - target)

    paths = _units(layers)  # ALoRA's "modules": one per layer, one per slice of a stacked layer
    module_of = np.repeat(np.arange(len(paths)), [layers[p].gate[...].shape[-1] for p, _ in paths])
    count = np.bincount(module_of[active], minlength=len(paths))
    if np.any(np.isnan(imp[active])):
        bad = sorted({str(slots[k][0]) for k in np.flatnonzero(active & np.isnan(imp))})
        raise ValueError(f"alora_reallocate: importance is NaN for active slots of {bad}.")

    # 1. prune, lowest importance first (ties: slot order)
    pruned = []
    for k in sorted(np.flatnonzero(active), key=lambda k: (imp[k], k)):
        if len(pruned) == n_prune:
            break
        if count[module_of[k]] > min_rank:
            pruned.append(k)
            count[module_of[k]] -= 1
    if len(pruned) < n_prune:
        raise ValueError(
            f"alora_reallocate: cannot prune {n_prune} slots while keeping min_rank={min_rank} active slots per module "
            f"({n_active} active slots in {len(paths)} modules)."
        )
    new_active = active.copy()
    new_active[pruned] = False

    # 2. grow
    n_grow = target - int(new_active.sum())
    pruned_modules = {module_of[k] for k in pruned}
    score = np.full(len(paths), -np.inf)
    for m in range(len(paths)):
        sel = new_active & (module_of == m)
        if sel.any():
            score[m] = imp[sel].mean()
    just_pruned = set(pruned)
    free = {  # masked slots per module: never-used / earlier-pruned slots first, this step's pruned ones last
        m: sorted(np.flatnonzero(~new_active & (module_of == m)), key=lambda k: (k in just_pruned, k))
        for m in range(len(paths))
    }
    by_score = sorted(range(len(paths)), key=lambda m: (-score[m], m))
    grown = []
    for group in ([m for m in by_score if m not in pruned_modules], [m for m in by_score if m in pruned_modules]):
        while len(grown) < n_grow and any(free[m] for m in group):
            for m in group:
                if free[m] and len(grown) < n_grow:
                    grown.append(free[m].pop(0))
    if len(grown) < n_grow:  # cannot happen when budget <= number of slots; kept as a guard
        raise ValueError(f"alora_reallocate: only {len(grown)} free slots for {n_grow} to re-enable.")
    new_active[grown] = True

    # 3. write gates, zero pruned factors, re-initialise grown ones
    fresh = np.zeros(gates.shape, bool)
    fresh[grown] = True
    offsets = _slot_offsets(layers)
    for li, layer in enumerate(layers.values()):
        lo, hi = offsets[li], offsets[li + 1]
        shape = layer.gate[...].shape
        on, new = new_active[lo:hi].reshape(shape), fresh[lo:hi].reshape(shape)
        if not (new.any() or (on != active[lo:hi].reshape(shape)).any()):
            continue
        pair = layer.pair
        mask = None if layer.a_mask is None else layer.a_mask[...]
        a, b, mask = _reallocate_layer(
            jax.random.fold_in(key, li), pair.a, pair.b, mask, jnp.asarray(on), jnp.asarray(new),
            init=init, rank=init_rank or int(shape[-1]), n=math.prod(pair.in_shape),
        )
        layer.lora.set_value(pair.replace(a=a, b=b))
        layer.gate[...] = jnp.asarray(on).astype(layer.gate[...].dtype)
        if mask is not None:
            layer.a_mask[...] = mask
    result = Reallocation([slots[k] for k in pruned], [slots[k] for k in grown])
    if optimizer is not None:
        reset_slot_moments(optimizer, model, result.pruned + result.grown)
    return result


def reset_slot_moments(optimizer_or_state: Any, model: nnx.Module, slots: Sequence[tuple[str, Any]]) -> Any:
    """Zeroes the optimizer moments of the given rank slots (column ``a[..., i]`` and row ``b[i]``).

    A slot re-enabled by :func:`alora_reallocate` replaces a pruned one (or a long-masked one); without a
    reset it starts with the Adam moments the old slot left (``mu``, ``nu``), i.e. with momentum pointing
    where the old factors were going. Every :class:`LoraPair` node of the optimizer state that mirrors a
    LoRA parameter (Adam-style ``mu`` / ``nu``, LoRA-Pro efficient-form low-rank moments: same path suffix
    ``<layer>.lora`` and the parameter's shapes) gets the slots zeroed; anything else (step counts,
    LoRA-Pro full-form ``m x n`` moments, which are not per slot) is left as it is.

    Args:
      optimizer_or_state: an ``nnx.Optimizer`` (its ``opt_state`` is updated in place) or an optax state
        pytree over ``nnx.state(model, LoRAParam)`` (a new state is returned).
      model: the LoRA model the state belongs to.
      slots: ``[(path, slot), ...]`` as in :func:`~lorapro_jax.rank.masks.rank_slots` (e.g.
        ``Reallocation.grown``).

    Returns:
      The new optimizer state.
    """
    layers = _layers(model)
    keep: dict[str, np.ndarray] = {}
    for path, slot in slots:
        if path not in layers:
            raise ValueError(f"reset_slot_moments: {path!r} is not a LoRA layer. LoRA layers: {list(layers)}")
        k = keep.setdefault(path, np.ones(layers[path].gate[...].shape, bool))
        k[slot] = False
    if not keep:
        return getattr(optimizer_or_state, "opt_state", optimizer_or_state)

    def owner(keypath) -> str | None:
        p = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
        hits = [lp for lp in keep if p == f"{lp}.lora" or p.endswith(f".{lp}.lora")]
        return max(hits, key=len) if hits else None

    def reset(pair: LoraPair, path: str) -> LoraPair:
        param = layers[path].pair
        if tuple(pair.a.shape) != tuple(param.a.shape) or tuple(pair.b.shape) != tuple(param.b.shape):
            return pair
        on = jnp.asarray(keep[path])
        a = pair.a * _slot_mask_like(pair.a, on, axis_last=True).astype(pair.a.dtype)
        b = pair.b * _slot_mask_like(pair.b, on, axis_last=False).astype(pair.b.dtype)
        return pair.replace(a=a, b=b)

    def visit(keypath, node):
        path = owner(keypath)
        value = node.get_value() if isinstance(node, nnx.Variable) else node
        if path is None or not is_lora_pair(value):
            return node
        if isinstance(node, nnx.Variable):
            node.set_value(reset(value, path))
            return node
        return reset(value, path)

    is_leaf = lambda x: isinstance(x, nnx.Variable) or is_lora_pair(x)
    state = getattr(optimizer_or_state, "opt_state", optimizer_or_state)
    return jax.tree_util.tree_map_with_path(visit, state, is_leaf=is_leaf)


class AloraStepInfo(NamedTuple):
    """What one :func:`alora_step` measured and did."""

    importance: AblationImportance
    realloc: Reallocation
    budget: int


def alora_step(
    model: nnx.Module,
    score_fn: ScoreFn,
    val_batch: Any,
    *,
    n_prune: int,
    key: Array,
    budget: int | None = None,
    min_rank: int = 0,
    init: str = "kaiming",
    batch_size: int | None = None,
    eval_mode: bool = True,
    optimizer: Any = None,
) -> AloraStepInfo:
    """One ALoRA allocation step: AB-LoRA importances on ``val_batch``, then :func:`alora_reallocate`.

    Returns an :class:`AloraStepInfo` (importances, pruned / re-enabled slots, the budget after the step).
    """
    imp = ablation_importance(model, score_fn, val_batch, batch_size=batch_size, eval_mode=eval_mode)
    realloc = alora_reallocate(
        model, imp, n_prune=n_prune, key=key, budget=budget, min_rank=min_rank, init=init, optimizer=optimizer
    )
    return AloraStepInfo(imp, realloc, int(jnp.sum(flat_gates(model) != 0)))


def alora_schedule(step: int, *, start: int, end: int, every: int, n_prune: int) -> int:
    """Number of slots to prune at ``step``: ``n_prune`` every ``every`` steps in ``[start, end]``, else 0."""
    return int(n_prune) if bool(is_update_step(step, start=start, end=end, every=every)) else 0
