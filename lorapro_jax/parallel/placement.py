"""Device meshes and placing arrays on them: meshes, ``NamedSharding`` trees, sharded models and optimizers.

The specs placed here come from :mod:`lorapro_jax.parallel.sharding` (partition rules for LoRA factors and
LoRA-Pro optimizer states); :func:`shard_optimizer` keeps an optimizer's updates and states on those specs
inside ``jit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .. import _utils
from .sharding import DATA_AXIS, MODEL_AXIS, P, Rules, lora_partition_specs, optimizer_state_specs, path_str

__all__ = ["batch_spec", "has_explicit_axes", "make_mesh", "named_shardings", "shard_model", "shard_optimizer", "shard_tree"]


# -- meshes -------------------------------------------------------------------------------------------
def make_mesh(
    data: int | None = None,
    model: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: Literal["explicit", "auto"] = "explicit",
) -> Mesh:
    """A 2-D ``("data", "model")`` device mesh.

    Args:
      data: size of the data-parallel axis (batch sharding); default: ``len(devices) // model``.
      model: size of the model-parallel axis (tensor parallelism over kernel dimensions).
      devices: devices to use; default ``jax.devices()`` (all devices of all processes).
      axis_types: ``"explicit"`` (``jax.make_mesh``'s default: shardings are part of array
        types) or ``"auto"`` (GSPMD propagation inside ``jit``).

    Returns:
      A ``jax.sharding.Mesh`` with axes ``("data", "model")``.

    Raises:
      ValueError: ``data * model`` differs from the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model <= 0 or n % model:
        raise ValueError(f"make_mesh: model={model} must be a positive divisor of the device count {n}.")
    if data is None:
        data = n // model
    if data * model != n:
        raise ValueError(f"make_mesh: data * model = {data} * {model} = {data * model}, but there are {n} devices.")
    if axis_types not in ("explicit", "auto"):
        raise ValueError(f"make_mesh: axis_types must be 'explicit' or 'auto', got {axis_types!r}.")
    kind = AxisType.Explicit if axis_types == "explicit" else AxisType.Auto
    return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=(kind, kind), devices=devices)


def has_explicit_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> bool:
    """Whether any axis of ``mesh`` is ``AxisType.Explicit``."""
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def batch_spec(ndim: int, axis: str | tuple[str, ...] | None = DATA_AXIS) -> PartitionSpec:
    """``P(axis, None, ...)``: a batch array of rank ``ndim`` sharded along its leading (batch) axis."""
    return P(axis, *([None] * (ndim - 1)))


# -- placing arrays -----------------------------------------------------------------------------------
def named_shardings(specs: Any, mesh: Mesh, tree: Any | None = None) -> Any:
    """``NamedSharding(mesh, spec)`` for every spec; checks divisibility against ``tree`` if given.

    Raises:
      ValueError: a spec names an axis the mesh lacks, or (with ``tree``) a sharded dimension is
        not divisible by the product of its mesh axis sizes (the message names the path).
    """
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

    def check(kp, spec, x):
        where = path_str(kp)
        for i, e in enumerate(tuple(spec)):
            names = (e,) if isinstance(e, str) else tuple(e or ())
            for name in names:
                if name not in sizes:
                    raise ValueError(f"{where}: PartitionSpec {spec} names mesh axis {name!r}; mesh axes are {tuple(sizes)}.")
            if x is not None and names:
                k = math.prod(sizes[nm] for nm in names)
                dim = _utils.unwrap(x).shape[i]
                if dim % k:
                    raise ValueError(
                        f"{where}: dimension {i} of size {dim} is sharded over {names} ({k} devices), which does not divide it."
                    )
        return NamedSharding(mesh, spec)

    is_leaf = lambda x: isinstance(x, PartitionSpec)
    if tree is None:
        return jax.tree_util.tree_map_with_path(lambda kp, s: check(kp, s, None), specs, is_leaf=is_leaf)
    return jax.tree_util.tree_map_with_path(check, specs, tree, is_leaf=is_leaf)


def shard_tree(tree: Any, mesh: Mesh, specs: Any) -> Any:
    """``jax.device_put`` of ``tree`` with ``NamedSharding(mesh, spec)`` per leaf (checked, see
    :func:`named_shardings`). Works for multi-process meshes when every process passes the same
    global values."""
    shardings = named_shardings(specs, mesh, tree)
    return jax.device_put(tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, specs: Any | None = None, rules: Rules | None = None) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` (in place) and returns it.

    Args:
      model: an NNX module, usually after :func:`~lorapro_jax.lora.nnx_lora.apply_lora`.
      mesh: the device mesh.
      specs: specs of ``nnx.state(model)``; default ``lora_partition_specs(model, rules)``.
      rules: see :func:`lora_partition_specs`.
    """
    state = nnx.state(model)
    if specs is None:
        specs = lora_partition_specs(model, rules)
    pure_specs = nnx.as_pure(specs) if isinstance(specs, nnx.State) else specs
    pure = nnx.as_pure(state)
    nnx.update(model, shard_tree(pure, mesh, pure_specs))
    return model


# -- optimizers that keep their sharding --------------------------------------------------------------
def _current_mesh(mesh: Mesh | None, concrete: bool = False) -> Mesh | jax.sharding.AbstractMesh:
    if mesh is not None:
        return mesh
    m = jax.sharding.get_mesh() if concrete else jax.sharding.get_abstract_mesh()
    if m is None or not getattr(m, "axis_names", ()):
        raise ValueError("no mesh given and none set: pass mesh=... or call inside `with jax.set_mesh(mesh):`.")
    return m


def _is_tracer(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _constrain(tree: Any, shardings: Any) -> Any:
    if _is_tracer(tree):
        return jax.lax.with_sharding_constraint(tree, shardings)
    return jax.device_put(tree, shardings)


def shard_optimizer(
    tx: Any,
    params_specs: Any,
    mesh: Mesh | None = None,
) -> Any:
    """Wraps an optax transformation so that its state and updates keep their mesh sharding.

    * ``init`` creates the state directly with the specs of :func:`optimizer_state_specs`
      (eagerly: one ``jit`` with ``out_shardings``, so LoRA-Pro's ``m x n`` moments are never
      materialised on one device; under a trace: ``with_sharding_constraint``).
    * ``update`` constrains the new state to the same specs and the updates to ``params_specs``.
      On a mesh with ``Explicit`` axes the inner update runs under ``jax.sharding.auto_axes`` (its
      ``r x r`` contractions over sharded ``n`` / ``m`` would otherwise need per-op
      ``out_sharding`` annotations), while its inputs and outputs keep their explicit types.

    Works with ``nnx.Optimizer(model, shard_optimizer(tx, specs, mesh), wrt=LoRAParam)`` (pass the
    specs of the ``wrt`` part, e.g. ``lora_partition_specs(model, rules, wrt=LoRAParam)``) and with
    plain optax loops.

    Args:
      tx: any ``optax.GradientTransformation`` (e.g. ``lora_pro_adamw(lr, form="full")``).
      params_specs: specs of the params ``tx`` sees (Variables are unwrapped).
      mesh: the device mesh; default: the mesh set with ``jax.set_mesh``.

    Returns:
      An ``optax.GradientTransformation`` with the state of ``tx``.
    """
    import optax

    from ..errors import check_tx

    check_tx(tx, "shard_optimizer")
    pspecs = nnx.as_pure(params_specs)

    def state_shardings(params, concrete=False):
        m = _current_mesh(mesh, concrete)
        return m, named_shardings(optimizer_state_specs(tx, params, pspecs), m)

    def init_fn(params):
        params = nnx.as_pure(params)
        if _is_tracer(params):
            _, shardings = state_shardings(params)
            return jax.lax.with_sharding_constraint(tx.init(params), shardings)
        m, shardings = state_shardings(params, concrete=True)
        with jax.set_mesh(m):
            return jax.jit(tx.init, out_shardings=shardings)(params)

    def update_fn(updates, state, params=None):
        params = nnx.as_pure(params)
        m, sshard = state_shardings(params, concrete=not _is_tracer((updates, state, params)))
        ushard = named_shardings(pspecs, m)
        inner = tx.update
        if has_explicit_axes(m):
            inner = jax.sharding.auto_axes(tx.update, out_sharding=(ushard, sshard))
        new_updates, new_state = inner(updates, state, params)
        return _constrain(new_updates, ushard), _constrain(new_state, sshard)

    return optax.GradientTransformation(init_fn, update_fn)
