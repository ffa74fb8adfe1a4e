"""Full-weight gradient estimation for data-driven LoRA initialisation (LoRA-GA).

LoRA-GA (Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000)
initialises each adapter from the gradient of the loss with respect to the frozen base weight,
averaged over a few batches. :func:`estimate_full_gradients` computes exactly that, jitted:

    Ĝ = (1/N) Σ_b ∇_{W0} L(model, batch_b)

for every LoRA-adapted base kernel. The result is in the base kernel's **Flax layout**
``(*in_shape, *out_shape)`` (for ``nnx.Linear``: ``(n, m)`` = ``(in, out)``), i.e. the TRANSPOSE of the
paper's ``m x n`` gradient ``G``; :func:`lorapro_jax.init.paper_gradient` converts one to ``G``.
Because ``W0`` enters the model linearly, ``∇_{W0} L`` equals the gradient with respect to the
adapted weight ``W0 + s B A`` whatever the current adapter holds.

Memory. ``layer_by_layer=False`` differentiates all target kernels in one backward pass per batch
and keeps one fp32 accumulator per kernel on the device. ``layer_by_layer=k`` (``True`` = 1)
differentiates ``k`` kernels at a time (an ``nnx.DiffState`` restricted to their paths), sums their
gradients over all batches on the device, moves the group's mean to host memory (NumPy) and goes
on with the next group: device memory holds the gradients of only one group, at the price of one
forward/backward pass over all batches per group (and one compilation per group).

Data parallel. Three ways, all giving the mean over the global batch:

* ``mesh=None`` with batches that are already global, sharded ``jax.Array`` s (e.g. built with
  ``jax.make_array_from_process_local_data`` in a multi-process job): ``jit`` computes the loss of
  the global batch, so its gradient is the global mean; nothing else is needed.
* ``mesh=..., data_parallel="jit"``: NumPy / single-device batches are placed with their leading
  axis sharded over ``batch_axis`` and the model state replicated, then the same ``jit``.
* ``mesh=..., data_parallel="shard_map"``: each device differentiates the loss of its shard inside
  ``jax.shard_map`` and the gradients are averaged with ``jax.lax.pmean`` over ``batch_axis``
  (equal to the global mean when ``loss_fn`` is a per-example mean, the usual case).

State written by the forward pass (dropout RNG counters, batch statistics, LoRA input-norm EMAs) is
carried from batch to batch and written back to the model at the end, as a training step without
the parameter update would, except under ``shard_map`` where it is discarded (per-device values
could differ): put the model in ``eval()`` mode for a deterministic estimate.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from ..lora.nnx_lora import LoRALayer

__all__ = ["estimate_full_gradients", "lora_kernel_paths", "paper_gradient"]

LossFn = Callable[[nnx.Module, Any], Array]


def lora_kernel_paths(model: nnx.Module) -> dict[str, tuple]:
    """``{dotted LoRA layer path: state path of its base kernel}`` in module order.

    The dotted paths are those of :func:`lorapro_jax.lora_layers`; the state paths are tuples such as
    ``("encoder", "layer", 0, "attention", "self", "query", "base", "kernel")`` (integers for list
    indices), used to build ``nnx`` filters.
    """
    out = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALayer):
            out[".".join(str(p) for p in path)] = tuple(path) + ("base", "kernel")
    return out


def _select_targets(available: dict[str, tuple], targets: str | Sequence[str] | None) -> list[str]:
    if not available:
        raise ValueError(
            "estimate_full_gradients: the model has no LoRA layers; call lorapro_jax.apply_lora first "
            "(LoRA-GA estimates the gradient of every LoRA-adapted base kernel)."
        )
    if targets is None:
        return list(available)
    if isinstance(targets, str):
        try:
            chosen = [p for p in available if re.fullmatch(targets, p)]
        except re.error as e:
            raise ValueError(f"estimate_full_gradients: targets is not a valid regex: {targets!r} ({e}).") from e
        if not chosen:
            raise ValueError(
                f"estimate_full_gradients: targets regex {targets!r} matches no LoRA layer. LoRA layers: "
                f"{list(available)}"
            )
        return chosen
    chosen = list(dict.fromkeys(targets))
    missing = [p for p in chosen if p not in available]
    if missing:
        raise ValueError(
            f"estimate_full_gradients: targets {missing} are not LoRA layers of the model. LoRA layers: "
            f"{list(available)}"
        )
    return chosen


def _groups(paths: list[str], layer_by_layer: bool | int) -> list[list[str]]:
    if layer_by_layer is False:
        return [paths]
    size = 1 if layer_by_layer is True else layer_by_layer
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"layer_by_layer must be False, True or a positive int (group size), got {layer_by_layer!r}.")
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def _batch_source(batches: Iterable[Any] | Callable[[], Iterable[Any]], passes: int) -> Callable[[], Iterable[Any]]:
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches
    if passes > 1 and iter(batches) is batches:
        raise ValueError(
            "estimate_full_gradients: layer_by_layer needs one pass over the batches per group, but `batches` "
            "is a one-shot iterator. Pass a list/tuple of batches or a zero-argument callable returning a "
            "fresh iterable."
        )
    return lambda: batches


def _place_batch(batch: Any, mesh: Mesh | None, axis: str | tuple[str, ...]) -> Any:
    if mesh is None:
        return batch
    sharding = NamedSharding(mesh, P(axis))
    size = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis)]))

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array (multi-process): use it as it is
        if not hasattr(x, "shape") or len(x.shape) == 0:
            raise ValueError(
                f"estimate_full_gradients: with a mesh every batch leaf must be an array with a leading batch axis; "
                f"got {type(x).__name__} with shape {getattr(x, 'shape', None)}."
            )
        if x.shape[0] % size:
            raise ValueError(
                f"estimate_full_gradients: batch leaf with shape {tuple(x.shape)} has a leading axis of {x.shape[0]}, "
                f"not divisible by the {size} devices of mesh axis {axis!r}."
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def estimate_full_gradients(
    model: nnx.Module,
    loss_fn: LossFn,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    targets: str | Sequence[str] | None = None,
    layer_by_layer: bool | int = False,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] = "data",
    data_parallel: Literal["jit", "shard_map"] = "jit",
) -> dict[str, Float[Array, "*kernel"] | np.ndarray]:
    """Mean over ``batches`` of ``dL/dW0`` for every LoRA-adapted base kernel (LoRA-GA, arXiv 2407.05000).

    Args:
      model: an NNX model already adapted with :func:`lorapro_jax.apply_lora`.
      loss_fn: ``loss_fn(model, batch) -> scalar`` (a mean over the examples of the batch).
      batches: the ``N`` batches (pytrees of arrays): a list/tuple, any iterable (only with one group),
        or a zero-argument callable returning a fresh iterable (re-called once per group).
      targets: which LoRA layers (dotted paths as in :func:`lorapro_jax.lora_layers`): ``None`` = all,
        a regex (full match), or a list of paths.
      layer_by_layer: ``False``: all kernels at once, results stay on the device (``jax.Array``).
        ``True`` or an int ``k``: ``k`` kernels (1 for ``True``) per group, one pass over the batches per
        group; results are NumPy arrays in host memory.
      mesh: optional device mesh for data parallelism (see the module docstring).
      batch_axis: mesh axis (or axes) the leading batch axis is sharded over.
      data_parallel: ``"jit"`` (global mean under jit with sharded inputs) or ``"shard_map"`` (per-device
        gradients averaged with ``jax.lax.pmean``); only used with ``mesh``.

    Returns:
      ``{path: mean gradient}`` in the base kernel's Flax layout ``(*in_shape, *out_shape)`` (the
      transpose of the paper's ``m x n`` ``G``), in the kernel dtype promoted to at least float32.

    Raises:
      ValueError: no LoRA layers, unknown targets, no batches, bad ``layer_by_layer``, batch leaves not
        divisible over the mesh axis, or a one-shot iterator with several groups.
    """
    if data_parallel not in ("jit", "shard_map"):
        raise ValueError(f"data_parallel must be 'jit' or 'shard_map', got {data_parallel!r}.")
    if data_parallel == "shard_map" and mesh is None:
        raise ValueError("estimate_full_gradients(data_parallel='shard_map') needs a `mesh`.")
    kernel_paths = lora_kernel_paths(model)
    chosen = _select_targets(kernel_paths, targets)
    groups = _groups(chosen, layer_by_layer)
    source = _batch_source(batches, len(groups))
    on_host = layer_by_layer is not False
    out: dict[str, Any] = {}
    for group in groups:
        out.update(_estimate_group(model, loss_fn, source(), [kernel_paths[p] for p in group], group, mesh,
                                   batch_axis, data_parallel, on_host))
    return {p: out[p] for p in chosen}


def _path_filter(state_paths: tuple[tuple, ...]):
    wanted = frozenset(state_paths)
    return lambda path, x: tuple(path) in wanted


@functools.lru_cache(maxsize=64)
def _compiled_step(graphdef, loss_fn, state_paths, names, mesh, batch_axis, use_shard_map):
    """The jitted step of one group, cached by structure so that repeated estimates (and models with the
    same structure) do not recompile.

    ``(acc, diff, frozen, mutable, batch) -> (acc + grads, mutable')`` where ``diff`` holds the group's
    kernels, ``frozen`` every other ``nnx.Param`` (never written by a forward pass, so never returned: no
    second copy of the weights) and ``mutable`` the remaining state (RNG counters, statistics). ``acc`` is
    donated. Under ``shard_map`` the step returns ``acc`` only.
    """
    kfilter = _path_filter(state_paths)

    def local_grads(diff, frozen, mutable, batch):
        m = nnx.merge(graphdef, diff, frozen, mutable)
        grads = nnx.grad(lambda mm: loss_fn(mm, batch), argnums=nnx.DiffState(0, kfilter))(m)
        flat = dict(nnx.to_flat_state(grads))
        missing = [n for n, sp in zip(names, state_paths) if sp not in flat]
        if missing:  # trace time
            raise ValueError(f"estimate_full_gradients: no gradient was produced for base kernels {missing}.")
        g = tuple(_acc_cast(flat[sp].get_value()) for sp in state_paths)
        _, _, _, new_mutable = nnx.split(m, kfilter, nnx.Param, ...)
        return g, new_mutable

    if use_shard_map:
        def sharded(diff, frozen, mutable, batch):
            # Mark the replicated kernels as device-varying so that each device differentiates its own
            # shard's loss (otherwise shard_map's transpose would already psum the gradients), then
            # average the per-device gradients explicitly.
            diff = jax.tree.map(lambda x: jax.lax.pcast(x, batch_axis, to="varying"), diff)
            g, _ = local_grads(diff, frozen, mutable, batch)
            return jax.lax.pmean(g, batch_axis)

        smap = jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(), P(), P(batch_axis)), out_specs=P())

        def step(acc, diff, frozen, mutable, batch):
            g = smap(diff, frozen, mutable, batch)
            return tuple(a + b for a, b in zip(acc, g))
    else:
        def step(acc, diff, frozen, mutable, batch):
            g, new_mutable = local_grads(diff, frozen, mutable, batch)
            return tuple(a + b for a, b in zip(acc, g)), new_mutable

    return jax.jit(step, donate_argnums=0)


def _estimate_group(model, loss_fn, batches, state_paths, names, mesh, batch_axis, data_parallel, on_host):
    state_paths = tuple(state_paths)
    graphdef, diff, frozen, mutable = nnx.split(model, _path_filter(state_paths), nnx.Param, ...)
    use_shard_map = mesh is not None and data_parallel == "shard_map"
    axis = batch_axis if isinstance(batch_axis, str) else tuple(batch_axis)
    step = _compiled_step(graphdef, loss_fn, state_paths, tuple(names), mesh, axis, use_shard_map)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        diff, frozen, mutable = jax.device_put((diff, frozen, mutable), replicated)
    flat_diff = dict(nnx.to_flat_state(diff))
    acc = tuple(jnp.zeros_like(_acc_cast(flat_diff[sp].get_value())) for sp in state_paths)
    if mesh is not None:
        acc = jax.device_put(acc, NamedSharding(mesh, P()))
    count = 0
    for batch in batches:
        batch = _place_batch(batch, mesh, batch_axis)
        if use_shard_map:
            acc = step(acc, diff, frozen, mutable, batch)
        else:
            acc, mutable = step(acc, diff, frozen, mutable, batch)
        count += 1
    if count == 0:
        raise ValueError("estimate_full_gradients: `batches` is empty; LoRA-GA needs at least one batch.")
    if not use_shard_map:
        nnx.update(model, mutable)
    means = [a / count for a in acc]
    if on_host:
        means = [np.asarray(jax.device_get(a)) for a in means]
    return dict(zip(names, means))


def _acc_cast(x: Array) -> Array:
    """Accumulators and results are in the kernel dtype promoted to at least float32."""
    return jnp.asarray(x).astype(jnp.promote_types(jnp.result_type(x), jnp.float32))


def paper_gradient(layer: LoRALayer, grad: Any) -> Float[Array, "*stack m n"]:
    """Converts a base-kernel gradient (Flax layout, the kernel's shape) to the paper's ``G``: ``(m, n)`` = (out, in).

    A stacked layer (leading layer / batch axes, see :mod:`lorapro_jax.lora.kernel_spec`) gets one ``G``
    per slice: ``(*stack, m, n)``.

    Uses the layer's :class:`~lorapro_jax.lora.nnx_lora.KernelSpec` so ``nnx.LinearGeneral`` and
    ``nnx.Einsum`` kernels (several in/out axes, possibly interleaved) are flattened consistently with
    ``a`` / ``b``.
    """
    kshape = tuple(layer.base.kernel.get_value().shape)
    if tuple(np.shape(grad)) != kshape:
        raise ValueError(
            f"gradient for LoRA layer {layer.path!r} has shape {tuple(np.shape(grad))}, expected the base kernel "
            f"shape {kshape} (Flax layout)."
        )
    return jnp.swapaxes(layer.spec.from_kernel(_acc_cast(grad)), -1, -2)  # (*stack, m, n) for stacked layers
