"""Method setup of ``experiments.finetune``: adapters, trainable filter, hooks, learning-rate schedule, optimizer.

==============  ==============================================================================
``lora``        ``apply_lora`` + ``optax.adamw``
``lora-pro``    ``apply_lora`` + ``lora_pro_adamw(form=--lora-pro-form, x_mode=--x-mode)`` (``adamw`` is ``form="full"``)
``lora-ga``     ``apply_lora_ga`` (gradient-SVD init from ``--lora-ga-batches`` batches; rsLoRA on by
                default) + ``optax.adamw``
``lora-plus``   ``apply_lora`` + ``lora_plus_adamw(ratio=--lora-plus-ratio)``
``prilora``     ``apply_prilora`` (ranks ``--prilora-r-min`` -> ``--prilora-r-max``, mean ``--rank``) +
                ``optax.adamw`` + ``prilora_prune`` on ``prilora_pruning_schedule``
``alora``       ``apply_alora`` (``--alora-max-rank`` slots, ``--rank`` active) + ``optax.adamw`` +
                ``alora_step`` (ablation importance on a validation batch, reallocation)
``full``        no adapters; ``optax.adamw`` on every ``nnx.Param``
==============  ==============================================================================

The peak learning rate is a traced value in the optimizer state (:func:`with_traced_peak_lr`), not a constant
of the compiled step: runs of one method at different learning rates (a sweep) share one compiled train step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.data import BucketedBatcher

from .cli import DEFAULT_FULL_LR, DEFAULT_LR
from .modeling import HEADS, lora_targets
from .steps import batch_loss, device_batch
from .tasks import TaskData, TaskSpec

__all__ = [
    "MethodState",
    "PeakLr",
    "PeakLrState",
    "count_trainable",
    "lora_config",
    "lr_schedule",
    "lr_shape",
    "make_tx",
    "optimizer_steps",
    "peak_lr",
    "setup_method",
    "warmup_steps",
    "with_traced_peak_lr",
]


# ----------------------------------------------------------------------------------------------
# Learning rate and optimizer
# ----------------------------------------------------------------------------------------------


def warmup_steps(warmup_ratio: float, total: int) -> int:
    """``ceil(warmup_ratio x total)`` warm-up steps (0 when the ratio is 0)."""
    return int(math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0


def optimizer_steps(total: int, grad_accum: int = 1) -> int:
    """Optimizer updates in ``total`` batches when gradients are accumulated over ``grad_accum`` batches."""
    return -(-int(total) // max(1, int(grad_accum)))


def lr_shape(schedule: str, warmup_ratio: float, total: int) -> optax.Schedule:
    """The learning rate divided by its peak, as a function of the 0-based step count.

    Linear warm-up over ``w = warmup_steps(warmup_ratio, total)`` steps from ``1/(w+1)`` at the first
    step to 1 at step ``w`` (so no step trains at lr 0), then cosine / linear decay to 0 at step
    ``total``, or constant.
    """
    warm = warmup_steps(warmup_ratio, total)
    start = 1.0 / (warm + 1)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(start, 1.0, warm, max(total, warm + 1), 0.0)
    ramp = optax.linear_schedule(start, 1.0, max(warm, 1))
    if schedule == "linear":
        return optax.join_schedules([ramp, optax.linear_schedule(1.0, 0.0, max(total - warm, 1))], [warm])
    return optax.join_schedules([ramp, optax.constant_schedule(1.0)], [warm])


def lr_schedule(args: argparse.Namespace, peak: float, total: int) -> optax.Schedule:
    """``peak x lr_shape(--schedule, --warmup-ratio, total)``."""
    shape = lr_shape(args.schedule, args.warmup_ratio, total)
    return lambda count: peak * shape(count)


#: Peak lr per method of the embedded default task, each chosen on the validation split by the shipped sweep
#: (:data:`TUNED_LRS_SOURCE`: 4-point grids, seed 0, then 3 seeds). Used for that task when neither ``--lr``
#: nor ``--full-lr`` is given; every other method and task falls back to ``DEFAULT_LR`` / ``DEFAULT_FULL_LR``.
TUNED_LRS: dict[str, dict[str, float]] = {"bbc": {"lora": 1e-2, "lora-pro": 3e-3, "full": 3e-4}}
TUNED_LRS_SOURCE = "docs/data/bbc_default_sweep_results.md"


def tuned_lr(args: argparse.Namespace, method: str, task: str | None) -> float | None:
    """The lr of :data:`TUNED_LRS` for ``(task, method)`` when the run uses the swept settings, else ``None``.

    The sweep tuned ``lora`` (not rsLoRA), ``lora-pro`` in its AdamW form and ``full`` with no lr given on the
    command line; a variant (``lora-pro-lean``, ``rslora``) or an explicit ``--lr`` / ``--full-lr`` gets none.
    """
    if task is None or getattr(args, "lr", None) is not None or getattr(args, "full_lr", None) is not None:
        return None
    if (method == "lora" and getattr(args, "rslora", False)) or (
        method == "lora-pro" and getattr(args, "lora_pro_form", "adamw") != "adamw"
    ):
        return None
    return TUNED_LRS.get(task, {}).get(method)


def peak_lr(args: argparse.Namespace, method: str, task: str | None = None) -> float:
    """``--lr`` (LoRA methods) / ``--full-lr`` (full fine-tuning), else the tuned lr of :func:`tuned_lr`
    for ``task``, else the defaults."""
    tuned = tuned_lr(args, method, task)
    if tuned is not None:
        return tuned
    if method == "full":
        if getattr(args, "full_lr", None) is not None:
            return float(args.full_lr)
        return float(args.lr) if getattr(args, "lr", None) is not None else DEFAULT_FULL_LR
    return float(args.lr) if getattr(args, "lr", None) is not None else DEFAULT_LR


class PeakLr:
    """Mutable holder of the peak learning rate that :func:`with_traced_peak_lr` puts in the state at ``init``."""

    def __init__(self, value: float = float("nan")):
        self.value = float(value)


class PeakLrState(NamedTuple):
    """State of :func:`with_traced_peak_lr`."""

    peak: jax.Array  # () float32 peak learning rate of this run
    count: jax.Array  # () int32 steps taken
    inner: optax.OptState  # state of build(lr)


def with_traced_peak_lr(
    build: Callable[[Any], optax.GradientTransformation], shape: optax.Schedule, peak: PeakLr
) -> optax.GradientTransformation:
    """An optimizer ``build(lr)`` whose learning rate ``peak x shape(step)`` is computed from its state.

    Like ``optax.inject_hyperparams``, but the peak is read from ``peak.value`` when the state is created,
    so ONE transformation object serves runs at different learning rates: the jitted train step (which
    holds the transformation statically) is compiled once and reused. ``build`` must accept a scalar
    learning rate (any optax optimizer factory does).
    """

    def init(params):
        inner = build(1.0).init(params)  # the state's structure does not depend on the value
        return PeakLrState(jnp.asarray(peak.value, jnp.float32), jnp.zeros([], jnp.int32), inner)

    def update(updates, state, params=None):
        lr = state.peak * shape(state.count)
        updates, inner = build(lr).update(updates, state.inner, params)
        return updates, PeakLrState(state.peak, optax.safe_increment(state.count), inner)

    return optax.GradientTransformation(init, update)


def _method_optimizer(args: argparse.Namespace, method: str) -> Callable[[Any], optax.GradientTransformation]:
    """``lr -> optax optimizer`` of ``method``, unguarded: :func:`make_tx` guards the whole chain once."""
    wd = args.weight_decay
    if method == "lora-pro" and args.lora_pro_form == "sgd":
        if wd:
            raise SystemExit("--lora-pro-form sgd has no weight decay; pass --weight-decay 0")
        return functools.partial(lp.lora_pro_sgd, x_mode=args.x_mode, on_nonfinite="ignore")
    if method == "lora-pro":
        form = "full" if args.lora_pro_form == "adamw" else args.lora_pro_form  # the library's name of the AdamW form
        return functools.partial(lp.lora_pro_adamw, weight_decay=wd, form=form, x_mode=args.x_mode,
                                 on_nonfinite="ignore")
    if method == "lora-plus":
        from lorapro_jax.optim.lora_plus import lora_plus_adamw

        return functools.partial(lora_plus_adamw, ratio=args.lora_plus_ratio, weight_decay=wd, on_nonfinite="ignore")
    return functools.partial(optax.adamw, weight_decay=wd)


def make_tx(
    args: argparse.Namespace, method: str, schedule: optax.Schedule | None = None, *,
    total: int | None = None, peak: PeakLr | None = None,
) -> optax.GradientTransformation:
    """The optax optimizer of ``method`` (clipping of the raw gradients first when ``--clip-norm``).

    Either with a ``schedule`` (the learning rate as a function of the optimizer update), or with ``total``
    batches and a :class:`PeakLr`: then the peak is a traced value of the state (:func:`with_traced_peak_lr`)
    and the schedule's shape comes from ``--schedule`` / ``--warmup-ratio`` over the
    :func:`optimizer_steps` of ``total``.

    With ``--grad-accum K > 1`` the whole chain is wrapped in ``optax.MultiSteps``: the gradients of ``K``
    consecutive batches are averaged, then clipped and applied as one update (parameters and the inner state
    change every ``K``-th call only), so the effective batch is ``K x --batch-size``.
    """
    build = _method_optimizer(args, method)
    k = max(1, int(getattr(args, "grad_accum", 1) or 1))
    if schedule is not None:
        tx = build(schedule)
    else:
        if total is None or peak is None:
            raise ValueError("make_tx: give a schedule, or total steps and a PeakLr")
        tx = with_traced_peak_lr(build, lr_shape(args.schedule, args.warmup_ratio, optimizer_steps(total, k)), peak)
    if args.clip_norm and args.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.clip_norm), tx)
    # The one non-finite guard, around everything: clipping, the traced peak lr's step count and the optimizer
    # (so a skipped step leaves the schedule where it was); the aliases above are built with on_nonfinite="ignore".
    tx = lp.guard_nonfinite(tx, args.on_nonfinite, max_consecutive_skips=args.max_consecutive_skips, name=method)
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


def lora_config(args: argparse.Namespace, method: str, model_type: str) -> lp.LoraConfig:
    """The :class:`~lorapro_jax.LoraConfig` of ``method`` (rsLoRA on by default for LoRA-GA)."""
    rslora = args.rslora if args.rslora is not None else (method == "lora-ga")
    return lp.LoraConfig(
        rank=args.rank, alpha=args.alpha, targets=lora_targets(args, model_type), rslora=rslora, dropout=args.lora_dropout
    )


@dataclasses.dataclass
class MethodState:
    """What :func:`setup_method` built besides the model changes."""

    wrt: Any
    hooks: list[Callable[[int], list[dict]]]  # after-step hooks: step (1-based) -> events
    lora_ga_record: dict | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _require(module: str, names: Sequence[str], method: str) -> Any:
    try:
        mod = importlib.import_module(module)
        for n in names:
            getattr(mod, n)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--method {method} needs {module}.{'/'.join(names)}, which is not available: {e}") from e
    return mod


def _fraction_step(frac: float, total: int) -> int:
    return int(round(frac * total))


@dataclasses.dataclass
class _Setup:
    """Everything a method's setup function reads."""

    model: nnx.Module
    args: argparse.Namespace
    method: str
    spec: TaskSpec
    task: TaskData
    cfg: lp.LoraConfig
    rngs: nnx.Rngs
    seed: int
    total_steps: int
    state: MethodState


def _setup_lora_ga(s: _Setup) -> None:
    mod = _require("lorapro_jax.init", ["apply_lora_ga"], s.method)
    bs = s.args.lora_ga_batch_size or s.args.batch_size
    batches = []
    for b in BucketedBatcher(s.task.train, bs, shuffle=True, seed=s.seed).epoch(0):
        batches.append(device_batch(b))
        if len(batches) == s.args.lora_ga_batches:
            break
    s.model.eval()
    spec = s.spec
    _, record = mod.apply_lora_ga(
        s.model, s.cfg, lambda m, b: batch_loss(m, b, spec), batches, rngs=s.rngs,
        direction=s.args.lora_ga_direction, scale_mode=s.args.lora_ga_scale, stable_gamma=s.args.lora_ga_gamma,
    )
    s.model.train()
    s.state.lora_ga_record = record
    s.state.info["lora_ga_batches"] = len(batches)


def _setup_prilora(s: _Setup) -> None:
    a, model = s.args, s.model
    mod = _require("lorapro_jax.rank", ["apply_prilora", "prilora_prune", "prilora_pruning_schedule"], s.method)
    r_min = a.prilora_r_min if a.prilora_r_min is not None else max(1, a.rank // 2)
    r_max = a.prilora_r_max if a.prilora_r_max is not None else 2 * a.rank - r_min
    ranks = mod.apply_prilora(model, s.cfg, rngs=s.rngs, r_min=r_min, r_max=r_max)
    start = max(1, _fraction_step(a.prilora_start, s.total_steps))
    end = max(start, _fraction_step(a.prilora_end, s.total_steps))
    every = a.prilora_every or max(1, (end - start) // 7)
    s.state.info.update(prilora_ranks=sorted(set(ranks.values())), prune_start=start, prune_end=end, prune_every=every)

    def prune(step: int) -> list[dict]:
        do, frac = mod.prilora_pruning_schedule(step, start=start, end=end, every=every,
                                                final_fraction=a.prilora_final_fraction)
        if not bool(do):
            return []
        mod.prilora_prune(model, fraction=float(frac))
        return [{"event": "prilora_prune", "fraction": float(frac)}]

    s.state.hooks.append(prune)


def _neg_loss(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """ALoRA validation score: minus the weighted loss (higher is better)."""
    return -batch_loss(model, batch, spec)


def _setup_alora(s: _Setup) -> None:
    a, model = s.args, s.model
    mod = _require("lorapro_jax.rank", ["apply_alora", "alora_step", "alora_schedule"], s.method)
    max_rank = a.alora_max_rank or 2 * a.rank
    mod.apply_alora(model, s.cfg, max_rank=max_rank, rngs=s.rngs)
    budget = len(lp.lora_layers(model)) * a.rank
    n_prune = a.alora_n_prune or max(1, budget // 16)
    start = max(1, _fraction_step(a.alora_start, s.total_steps))
    end = max(start, _fraction_step(a.alora_end, s.total_steps))
    every = a.alora_every or max(1, (end - start) // 3)
    val = next(iter(BucketedBatcher(s.task.evals[s.task.eval_split], a.batch_size, shuffle=False).epoch(0)))
    val_batch = device_batch(val)
    score_fn = functools.partial(_neg_loss, spec=s.spec)
    key = jax.random.key(s.seed + 3)
    s.state.info.update(alora_max_rank=max_rank, alora_budget=budget, alora_n_prune=n_prune,
                        alora_start=start, alora_end=end, alora_every=every)

    def realloc(step: int) -> list[dict]:
        n = mod.alora_schedule(step, start=start, end=end, every=every, n_prune=n_prune)
        if n == 0:
            return []
        info = mod.alora_step(model, score_fn, val_batch, n_prune=n, key=jax.random.fold_in(key, step))
        ranks = {p: int(np.sum(np.asarray(l.gate[...]) != 0)) for p, l in lp.lora_layers(model).items()}
        return [{"event": "alora_step", "pruned": len(info.realloc.pruned), "grown": len(info.realloc.grown),
                 "budget": info.budget, "base_score": float(info.importance.base_score),
                 "ranks": sorted(ranks.values())}]

    s.state.hooks.append(realloc)


def setup_method(
    model: nnx.Module,
    args: argparse.Namespace,
    method: str,
    spec: TaskSpec,
    task: TaskData,
    model_type: str,
    seed: int,
    total_steps: int,
) -> MethodState:
    """Adapt ``model`` in place for ``method`` and return its trainable filter and hooks."""
    head = HEADS[spec.arch]
    head_filter = nnx.All(nnx.Param, nnx.PathContains(head)) if head and not args.no_train_head else None
    if method == "full":
        frozen = nnx.All(nnx.Param, nnx.PathContains(head)) if head and args.no_train_head else None
        return MethodState(wrt=nnx.All(nnx.Param, nnx.Not(frozen)) if frozen is not None else nnx.Param, hooks=[])
    wrt = nnx.Any(lp.LoRAParam, head_filter) if head_filter is not None else lp.LoRAParam
    s = _Setup(model, args, method, spec, task, lora_config(args, method, model_type),
               nnx.Rngs(params=seed + 1, dropout=seed + 2), seed, total_steps, MethodState(wrt=wrt, hooks=[]))
    if method in ("lora", "lora-pro", "lora-plus"):
        lp.apply_lora(model, s.cfg, rngs=s.rngs)
    elif method == "lora-ga":
        _setup_lora_ga(s)
    elif method == "prilora":
        _setup_prilora(s)
    elif method == "alora":
        _setup_alora(s)
    else:  # pragma: no cover - guarded by parse_args
        raise SystemExit(f"unknown method {method!r}")
    return s.state


def count_trainable(model: nnx.Module, wrt: Any) -> int:
    """Number of trainable values; for LoRA layers only the active ones (gates, A-masks)."""
    total = 0
    layers = lp.lora_layers(model)
    for path, var in nnx.to_flat_state(nnx.state(model, wrt)):
        value = var.get_value() if hasattr(var, "get_value") else var
        if lp.is_lora_pair(value):
            continue
        total += int(np.prod(np.shape(value)))
    for layer in layers.values():
        pair = layer.pair
        gate = np.asarray(layer.gate[...]) != 0  # (r,)
        n_out = int(np.prod(pair.b.shape[1:]))
        if layer.a_mask is not None:
            mask = np.asarray(layer.a_mask[...]) != 0  # (*in, r)
            a_active = int(np.sum(mask.reshape(-1, gate.size)[:, gate]))
        else:
            a_active = int(np.prod(pair.a.shape[:-1])) * int(gate.sum())
        total += a_active + n_out * int(gate.sum())
    return total
