"""LoRA-GA init for trees that hold A and B as separate leaves (qwix, ``nnx.LoRA``, any tree).

The same :class:`~lorapro_jax.pairings.Pairing` that :func:`~lorapro_jax.paired` uses finds the pairs. Where
the layout allows it :func:`lora_ga_init_paired` does what :func:`~lorapro_jax.lora_ga_init` does for our own
``apply_lora`` models; elsewhere it raises a ``ValueError`` that says which layer and why ("not supported for
this pairing"). PEFT export of such trees: :mod:`lorapro_jax.io.peft_paired`.

LoRA-GA: Wang et al., "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from .. import _utils
from ..lora.pair import LoraPair
from ..pairings.plan import Pairing, PairPlan, _flatten
from .lora_ga import _as_key, _check_options, lora_ga_factors

__all__ = ["lora_ga_init_paired"]


def _kernel_index(plan: PairPlan, pairing: Pairing, name: str, who: str) -> int:
    path = pairing.kernel_path(name)
    if path is None:
        raise ValueError(
            f"{who}: not supported for this pairing ({pairing.name}): it does not know where the base kernel of layer "
            f"{name!r} is (name_pairing: pass kernel_path=, a function of the layer name)."
        )
    if path in plan.paths:
        return plan.paths.index(path)
    below = [p for p in plan.paths if p.startswith(path + "/")]
    why = (
        f"it is stored as {below} (a quantized weight? LoRA-GA rewrites W0 and needs it in floating point)"
        if below
        else "no such leaf in the tree (pass the full model state, e.g. nnx.as_pure(nnx.state(model)))"
    )
    raise ValueError(f"{who}: not supported for layer {name!r}: its base kernel {path!r}: {why}.")


def lora_ga_init_paired(
    params: Any,
    grads: Mapping[str, Any],
    pairing: Pairing,
    *,
    direction: str = "ArB2r",
    scale_mode: str = "stable",
    stable_gamma: float = 16.0,
    svd: str = "randomized",
    n_iter: int = 4,
    key: Any = None,
) -> tuple[Any, dict[str, LoraPair]]:
    """LoRA-GA initialisation of the pairs of a foreign tree (what :func:`~lorapro_jax.lora_ga_init` does in place).

    For each ``layer -> dL/dW0`` of ``grads`` (in the base kernel's shape, e.g. from ``nnx.grad`` with respect
    to the base kernels): ``(A0, B0)`` from :func:`~lorapro_jax.init.lora_ga.lora_ga_factors` with the pair's
    rank and scale, written as ``a = A0ᵀ``, ``b = B0ᵀ``, and the base kernel set to ``W0 − s a b`` (computed in
    at least float32), so the model's output is unchanged up to rounding. Layer ``i`` of ``grads`` uses
    ``fold_in(key, i)``, as ``lora_ga_init`` does.

    Supported where the base kernel is a floating-point leaf of ``params`` at ``pairing.kernel_path(layer)`` with
    the shape ``(*in, *out)`` of the pair (qwix Linear / Einsum with its contracting axes first, ``nnx.LoRALinear``,
    ``name_pairing(..., kernel_path=...)``); a quantized base (QLoRA) or another axis order is an error naming the
    layer.

    Args:
      params: the full tree (factors and base kernels), e.g. ``nnx.as_pure(nnx.state(model))``.
      grads: ``{layer name: dL/dW0}`` (layer names as in ``pairing.plan(params).pairs``).
      pairing: the tree's pairing.
      direction, scale_mode, stable_gamma, svd, n_iter, key: as in :func:`~lorapro_jax.lora_ga_init`.

    Returns:
      ``(new_params, record)``: the tree with new factors and kernels (apply it with ``nnx.update(model,
      new_params)``) and ``{layer: LoraPair(a0, b0, s)}``, the initial adapters.
    """
    _check_options(direction, scale_mode, svd, stable_gamma)
    plan = pairing.plan(params)
    paths, leaves, treedef = _flatten(params)
    leaves = [_utils.unwrap(x) for x in leaves]
    specs = plan.pair_by_name()
    key = _as_key(key)
    record: dict[str, LoraPair] = {}
    for i, (name, grad) in enumerate(grads.items()):
        spec = specs.get(name)
        if spec is None:
            raise ValueError(f"lora_ga_init_paired: {name!r} is not a LoRA layer of the tree. Layers: {list(specs)}")
        if spec.in_ndim is not None:
            raise ValueError(
                f"lora_ga_init_paired: not supported for layer {name!r}: its factors {spec.a_shape}, {spec.b_shape} "
                f"carry {spec.stack_ndim} stack axes (a stack of adapters); initialise its slices separately."
            )
        k = _kernel_index(plan, pairing, name, "lora_ga_init_paired")
        w0 = leaves[k]
        kshape = spec.a_shape[:-1] + spec.b_shape[1:]
        if tuple(w0.shape) != kshape or not jnp.issubdtype(w0.dtype, jnp.floating):
            raise ValueError(
                f"lora_ga_init_paired: not supported for layer {name!r}: its base kernel {paths[k]} is "
                f"{tuple(w0.shape)} {w0.dtype}, expected a floating-point (*in, *out) = {kshape} kernel matching "
                f"a {spec.a_shape} and b {spec.b_shape}."
            )
        n, r = math.prod(spec.a_shape[:-1]), spec.a_shape[-1]
        g = jnp.asarray(grad)
        if g.shape != w0.shape:
            raise ValueError(f"lora_ga_init_paired: the gradient of {name!r} is {tuple(g.shape)}, expected {tuple(w0.shape)}.")
        if not bool(jnp.all(jnp.isfinite(g))) or not bool(jnp.any(g != 0)):
            raise ValueError(f"lora_ga_init_paired: the gradient of {name!r} is non-finite or identically zero.")
        try:
            a0, b0 = lora_ga_factors(
                g.reshape(n, -1).T, r, spec.scale, direction=direction, scale_mode=scale_mode,
                stable_gamma=stable_gamma, svd=svd, n_iter=n_iter, key=jax.random.fold_in(key, i),
            )
        except ValueError as e:
            raise ValueError(f"lora_ga_init_paired: layer {name!r}: {e}") from e
        a_old, b_old = leaves[spec.a_index], leaves[spec.b_index]
        a = a0.T.reshape(spec.a_shape).astype(a_old.dtype)
        b = b0.T.reshape(spec.b_shape).astype(b_old.dtype)
        wide = jnp.promote_types(w0.dtype, jnp.float32)
        delta = spec.scale * (a.reshape(n, r).astype(wide) @ b.reshape(r, -1).astype(wide))
        leaves[k] = (w0.astype(wide) - delta.reshape(w0.shape)).astype(w0.dtype)
        leaves[spec.a_index], leaves[spec.b_index] = a, b
        record[name] = LoraPair(a, b, spec.scale)
    return jax.tree_util.tree_unflatten(treedef, leaves), record
