"""A jitted LoRA / LoRA-Pro train step sharded over a ``("data", "model")`` mesh.

The model is split once into a graph definition and three pure pytrees (the trainable LoRA pairs,
everything else, the optimizer state); each gets a ``PartitionSpec`` tree from
:mod:`lorapro_jax.sharding`, and the step is one ``jax.jit`` with ``in_shardings`` /
``out_shardings`` built from them, so parameters and optimizer states (LoRA-Pro's full-size moments
included) come out of every step with the sharding they went in with. The batch is sharded along
its leading axis over ``"data"``: gradients of ``a`` and ``b`` are means over the global batch
(XLA all-reduces the ``(n, r)`` / ``(r, m)`` gradients over ``"data"``).

Works in one process and in several (``jax.distributed.initialize``): every process calls the
step with global arrays, e.g. built by :func:`lorapro_jax.parallel.distributed.global_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import check_module, check_tx
from ..lora.nnx_lora import LoRAParam
from .placement import has_explicit_axes, named_shardings, shard_tree
from .sharding import DATA_AXIS, Rules, lora_partition_specs, optimizer_state_specs

__all__ = ["TrainState", "shard_for_training", "make_train_step"]


class TrainState(NamedTuple):
    """Pure-pytree training state (also used for its ``PartitionSpec`` tree).

    Attributes:
      lora: the trainable part, ``nnx.as_pure(nnx.state(model, wrt))`` (``LoraPair`` leaves).
      frozen: every other variable of the model (base weights, gates, RNG counters, statistics).
      opt_state: the optimizer state of ``tx.init(lora)``.
    """

    lora: Any
    frozen: Any
    opt_state: Any


def shard_for_training(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules | None = None,
    *,
    wrt: Any = LoRAParam,
    specs: Any | None = None,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Splits ``model``, places it on ``mesh`` and initialises the optimizer state there.

    Args:
      model: an NNX module with LoRA applied (``apply_lora``).
      tx: the optimizer, e.g. ``lora_pro_adamw(lr, form="full")``.
      mesh: the device mesh (:func:`lorapro_jax.sharding.make_mesh`).
      rules: sharding rules for base weights (see :func:`lorapro_jax.sharding.lora_partition_specs`).
      wrt: the trainable variables (default: the LoRA pairs).
      specs: a precomputed spec tree of ``nnx.state(model)`` (overrides ``rules``).

    Returns:
      ``(graphdef, state, state_specs)``: the static graph, a :class:`TrainState` of sharded arrays
      and the :class:`TrainState` of their ``PartitionSpec`` trees. The optimizer state is created by
      one ``jit`` with ``out_shardings``, so no device ever holds a full LoRA-Pro moment.
    """
    sig = "shard_for_training(model, tx, mesh, rules)"
    check_module(model, "model", "shard_for_training", sig)
    check_tx(tx, "shard_for_training")
    if specs is None:
        specs = lora_partition_specs(model, rules)
    lspec, fspec = nnx.split_state(specs, wrt, ...)
    graphdef, lora, frozen = nnx.split(model, wrt, ...)
    lora, frozen, lspec, fspec = (nnx.as_pure(t) for t in (lora, frozen, lspec, fspec))
    lora = shard_tree(lora, mesh, lspec)
    frozen = shard_tree(frozen, mesh, fspec)
    ospec = optimizer_state_specs(tx, lora, lspec)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=named_shardings(ospec, mesh))(lora)
    return graphdef, TrainState(lora, frozen, opt_state), TrainState(lspec, fspec, ospec)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_specs: TrainState,
    batch_specs: Any = PartitionSpec(DATA_AXIS),
    *,
    wrt: Any = LoRAParam,
    donate: bool = True,
    auto_axes: bool | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, jax.Array]]:
    """Builds ``step(state, batch) -> (new_state, loss)``, one ``jax.jit`` over ``mesh``.

    Args:
      graphdef: from :func:`shard_for_training`.
      loss_fn: ``loss_fn(model, batch) -> scalar`` (the mean over the global batch).
      tx: the optimizer given to :func:`shard_for_training`.
      mesh: the device mesh.
      state_specs: the spec :class:`TrainState` from :func:`shard_for_training`.
      batch_specs: spec (or prefix tree of specs) of the batch; default ``P("data")``: every batch
        array is sharded along its leading axis.
      wrt: the trainable variables (as in :func:`shard_for_training`).
      donate: donate the old state's buffers to the new one.
      auto_axes: run the model and optimizer under ``jax.sharding.auto_axes`` (GSPMD propagation
        inside, explicit sharding types outside). Default: when the mesh has ``Explicit`` axes,
        since model code written without per-op ``out_sharding`` (embedding gathers, contractions
        over sharded features) cannot be traced with explicit types.

    Returns:
      The step (it enters ``jax.set_mesh(mesh)`` and calls the jitted function); the returned state
      has exactly the shardings of ``state_specs``. ``step.jitted`` is the ``jax.jit`` object, e.g.
      for ``step.jitted.lower(state, batch).compile().as_text()`` (inside ``jax.set_mesh(mesh)``).
    """
    check_tx(tx, "make_train_step")
    if not callable(loss_fn):
        raise TypeError(f"make_train_step: `loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
    shard = lambda specs: named_shardings(specs, mesh)
    state_sh = TrainState(*(shard(s) for s in state_specs))
    batch_sh = shard(batch_specs)
    loss_sh = NamedSharding(mesh, PartitionSpec())
    if auto_axes is None:
        auto_axes = has_explicit_axes(mesh)

    def body(state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
        def loss_of(lora):
            model = nnx.merge(graphdef, lora, state.frozen)
            loss = loss_fn(model, batch)
            _, _, new_frozen = nnx.split(model, wrt, ...)
            return loss, nnx.as_pure(new_frozen)

        (loss, frozen), grads = jax.value_and_grad(loss_of, has_aux=True)(state.lora)
        updates, opt_state = tx.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        return TrainState(lora, frozen, opt_state), loss

    if auto_axes:
        body = jax.sharding.auto_axes(body, out_sharding=(state_sh, loss_sh))

    jitted = jax.jit(
        body,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, loss_sh),
        donate_argnums=(0,) if donate else (),
    )

    def step(state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    step.jitted = jitted
    return step
