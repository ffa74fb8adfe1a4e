"""How well a method's weight update follows the full fine-tuning gradient (LoRA-Pro's own measure).

LoRA-Pro (Wang et al., arXiv 2407.18242) argues that LoRA's *equivalent* update of a weight,
``ΔW = s·(B'A' − BA)``, is a poor step along the full fine-tuning gradient ``g = ∂L/∂W`` and that
LoRA-Pro fixes this. This module measures it directly along a run: at a step, with the parameters
*before* the update,

* ``g_l`` — the full gradient of the training loss of that step's batch with respect to the effective
  kernel ``W_l`` of every measured layer ``l`` (for an adapted layer, the derivative with respect to its
  frozen base kernel with the LoRA factors held fixed, which is the same thing since
  ``W = W0 + s·BA``); :func:`kernel_grads`;
* ``ΔW_l`` — the change of the effective kernel made by the optimizer step (``s·(B'A' − BA)`` with
  masks and gates folded in for adapted layers, ``W' − W`` for fully fine-tuned ones);
  :func:`effective_kernels` before and after;
* :func:`update_alignment` — the cosine between ``ΔW_l`` and the descent direction ``−g_l``, per layer,
  averaged over layers, and over all measured layers as one vector.

A cosine of 1 is a step exactly along ``−g`` (plain gradient descent on ``W``); full fine-tuning with
Adam is below 1 too (its update is the preconditioned Adam direction), so compare methods with each
other, at the same points of the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lorapro_jax._utils import path_string
from lorapro_jax.lora.nnx_lora import LoRALayer, lora_layers

__all__ = ["Alignment", "effective_kernels", "kernel_grads", "kernel_paths", "update_alignment"]


class Alignment(NamedTuple):
    """Result of :func:`update_alignment`.

    Attributes:
      per_layer: ``{path: cos(ΔW_l, −g_l)}`` (``nan`` where ``ΔW_l`` or ``g_l`` is zero).
      mean: mean of the finite per-layer cosines (``nan`` if none).
      overall: ``Σ_l <ΔW_l, −g_l> / (‖ΔW‖·‖g‖)`` with the norms over all layers together.
      update_norm: ``‖ΔW‖`` over all layers (Frobenius).
      grad_norm: ``‖g‖`` over all layers (Frobenius).
    """

    per_layer: dict[str, float]
    mean: float
    overall: float
    update_norm: float
    grad_norm: float


def update_alignment(
    before: Mapping[str, Float[Array, "..."]],
    after: Mapping[str, Float[Array, "..."]],
    grads: Mapping[str, Float[Array, "..."]],
) -> Alignment:
    """Cosines between the kernel updates ``after − before`` and the descent directions ``−grads``.

    Args:
      before: ``{path: kernel}`` effective kernels before the step (any shape; flattened).
      after: the same paths and shapes after the step.
      grads: ``{path: ∂L/∂W}`` at ``before``, same shapes.

    Returns:
      An :class:`Alignment` (Python floats, computed in float64).

    Raises:
      ValueError: the three mappings do not have the same paths and shapes.
    """
    if not (set(before) == set(after) == set(grads)) or not before:
        raise ValueError(
            f"update_alignment: before / after / grads must hold the same non-empty paths; got "
            f"{sorted(before)}, {sorted(after)}, {sorted(grads)}"
        )
    per, dot_sum, du_sq, g_sq = {}, 0.0, 0.0, 0.0
    for path in before:
        shapes = {np.shape(before[path]), np.shape(after[path]), np.shape(grads[path])}
        if len(shapes) != 1:
            raise ValueError(f"update_alignment: {path!r} has shapes {sorted(shapes)} in before / after / grads")
        du = np.asarray(after[path], np.float64).ravel() - np.asarray(before[path], np.float64).ravel()
        g = np.asarray(grads[path], np.float64).ravel()
        dot, nu, ng = float(-du @ g), float(np.linalg.norm(du)), float(np.linalg.norm(g))
        per[path] = dot / (nu * ng) if nu > 0 and ng > 0 else float("nan")
        dot_sum, du_sq, g_sq = dot_sum + dot, du_sq + nu * nu, g_sq + ng * ng
    finite = [c for c in per.values() if np.isfinite(c)]
    denom = float(np.sqrt(du_sq) * np.sqrt(g_sq))
    return Alignment(
        per_layer=per,
        mean=float(np.mean(finite)) if finite else float("nan"),
        overall=dot_sum / denom if denom > 0 else float("nan"),
        update_norm=float(np.sqrt(du_sq)),
        grad_norm=float(np.sqrt(g_sq)),
    )


def kernel_paths(model: nnx.Module, matches: Callable[[str], bool] | None = None) -> list[str]:
    """Dotted module paths whose kernels are measured.

    Args:
      model: an NNX model.
      matches: for a model without LoRA layers, the predicate on dotted module paths of the layers to
        measure (e.g. ``LoraConfig(targets=...).matches``, so that full fine-tuning is measured on the
        layers the LoRA methods adapt). Ignored when the model has LoRA layers: those are measured.

    Returns:
      Paths of :class:`LoRALayer` modules, or of matching modules with a ``kernel``.
    """
    layers = lora_layers(model)
    if layers:
        return list(layers)
    if matches is None:
        raise ValueError("kernel_paths: the model has no LoRA layers; pass matches= to choose the layers to measure")
    out = [
        path_string(p) for p, m in nnx.iter_modules(model) if p and hasattr(m, "kernel") and matches(path_string(p))
    ]
    if not out:
        raise ValueError("kernel_paths: no layer with a kernel matches")
    return out


def _module_at(model: nnx.Module, path: str) -> nnx.Module:
    mods = {path_string(p): m for p, m in nnx.iter_modules(model)}
    if path not in mods:
        raise KeyError(f"no module at {path!r}")
    return mods[path]


def effective_kernels(model: nnx.Module, paths: Sequence[str]) -> dict[str, Float[Array, "..."]]:
    """``{path: W}``: ``W0 + s·(a·mask·gate)@b`` for LoRA layers (``W0`` if merged), the kernel otherwise (fp32)."""
    out = {}
    for path in paths:
        m = _module_at(model, path)
        if isinstance(m, LoRALayer):
            k = m.base.kernel[...].astype(jnp.float32)
            out[path] = k if m.merged else k + m.delta_kernel()
        else:
            out[path] = m.kernel[...].astype(jnp.float32)
    return out


def _kernel_var_paths(model: nnx.Module, paths: Sequence[str]) -> dict[tuple, str]:
    """State paths of the kernels to differentiate -> dotted module path."""
    out = {}
    for path in paths:
        m = _module_at(model, path)
        sub = ("base", "kernel") if isinstance(m, LoRALayer) else ("kernel",)
        key = tuple(int(p) if p.isdigit() else p for p in path.split(".")) + sub
        out[key] = path
    return out


def kernel_grads(
    model: nnx.Module, loss_fn: Callable[..., Array], paths: Sequence[str], *args: Any
) -> dict[str, Float[Array, "..."]]:
    """``{path: ∂loss/∂W}`` for the kernels at ``paths`` (base kernels of LoRA layers), all else held fixed.

    ``loss_fn(model, *args)`` is differentiated with respect to those kernels only; the model's variables
    (random-number counters, statistics) are left as they were, so measuring does not change the run.

    Args:
      model: the model at the point of measurement.
      loss_fn: scalar loss ``loss_fn(model, *args)`` (e.g. the training loss of the step's batch); it is a
        static argument of a jitted function, so pass the same (hashable) function at every call.
      paths: dotted module paths from :func:`kernel_paths`.
      *args: traced arguments of ``loss_fn`` (e.g. the batch).
    """
    wanted = _kernel_var_paths(model, paths)
    keys = frozenset(wanted)
    graphdef, state = nnx.split(model)
    grads = _grads_jit(graphdef, state, loss_fn, _PathFilter(keys), *args)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(grads)}
    missing = sorted(wanted[k] for k in keys if k not in flat)
    if missing:
        raise ValueError(f"kernel_grads: no gradient for the kernels of {missing}")
    return {wanted[k]: jnp.asarray(flat[k][...] if hasattr(flat[k], "get_value") else flat[k]) for k in wanted}


@dataclasses.dataclass(frozen=True)
class _PathFilter:
    """Hashable nnx filter: the variables at the given state paths (a static jit argument)."""

    keys: frozenset

    def __call__(self, path, _value) -> bool:
        return tuple(path) in self.keys


def _grads(graphdef, state, loss_fn, is_kernel, *args):
    model = nnx.merge(graphdef, state)  # a private copy: its rng counters / stats updates are discarded
    return nnx.grad(lambda m: loss_fn(m, *args), argnums=nnx.DiffState(0, is_kernel))(model)


_grads_jit = jax.jit(_grads, static_argnums=(0, 2, 3))
