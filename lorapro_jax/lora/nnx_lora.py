"""LoRA as a Flax NNX module transform.

``apply_lora(model, config, rngs=...)`` wraps every targeted ``nnx.Linear`` / ``nnx.LinearGeneral`` /
``nnx.Einsum`` in a :class:`LoRALayer` that computes ``base(x) + s * ((x @ a) * gate) @ b``
without ever materialising ``W0 + s * a @ b`` in the forward pass. The factors live in a single
:class:`LoRAParam` whose value is a :class:`~lorapro_jax.lora.pair.LoraPair`, so
``nnx.state(model, LoRAParam)`` is the explicit A/B pairing that the optimizers consume, and
``nnx.Optimizer(model, tx, wrt=LoRAParam)`` (or ``wrt=nnx.LoRAParam``, its flax base class) trains only the
adapters.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .config import LoraConfig
from .kernel_spec import KernelSpec, kernel_spec_for
from .pair import LoraPair, pair_matrices
from .._utils import matches_targets, path_string
from ..errors import check_config, check_module

__all__ = [
    "LoRAParam",
    "LoRAGate",
    "LoRAMask",
    "LoRAStat",
    "KernelSpec",
    "LoRALayer",
    "apply_lora",
    "adaptable_paths",
    "lora_layers",
    "lora_state",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unwrap",
    "decay_base_weights",
]


class LoRAParam(nnx.LoRAParam):
    """Trainable LoRA factors. Its value is a :class:`LoraPair` ``(a, b, scale)``.

    A subclass of ``flax.nnx.LoRAParam`` (the type of ``nnx.LoRA`` and qwix factors), so one filter,
    ``wrt=nnx.LoRAParam``, selects the adapters of native, ``nnx.LoRA`` and qwix trees alike;
    ``wrt=lorapro_jax.LoRAParam`` selects only the native ones.
    """


class LoRAGate(nnx.Variable):
    """Per-rank gate ``(r,)`` multiplying the rank-``r`` bottleneck (ones; 0/1 rank mask or ALoRA gates)."""


class LoRAMask(nnx.Variable):
    """Elementwise 0/1 mask with the shape of ``a`` (PRILoRA pruning of A)."""


class LoRAStat(nnx.Variable):
    """Running statistics of a LoRA layer (e.g. EMA of per-feature input norms ``(*in_shape,)``)."""


_ADAPTABLE = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# Leaf modules with weights that LoRA does not adapt; matching one of them is an error, not a skip.
_UNSUPPORTED = (nnx.Embed, nnx.Conv, nnx.ConvTranspose)


class LoRALayer(nnx.Module):
    """A base layer plus a LoRA branch: ``y = base(x) + s * ((drop(x) @ (a * a_mask)) * gate) @ b``.

    Stacked layers (a base kernel with leading ``nnx.vmap`` layer axes, or a ``LinearGeneral`` / ``Einsum``
    with batch axes, see :mod:`lorapro_jax.lora.kernel_spec`) carry one independent adapter per slice:
    every array below gains the leading ``stack = (*layers, *batch)`` axes. Inside ``nnx.scan`` the layer
    axes are sliced away and the same module reads as an unstacked one.

    Attributes:
      base: the wrapped ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` (its kernel stays frozen
        when training with ``wrt=LoRAParam``).
      lora: :class:`LoRAParam` holding ``LoraPair(a: (*stack, *in_shape, r), b: (*stack, r, *out_shape),
        scale)`` (``in_ndim`` set when ``stack`` is non-empty).
      gate: :class:`LoRAGate` ``(*stack, r)``, ones by default.
      a_mask: optional :class:`LoRAMask` with the shape of ``a``.
      input_norm: optional :class:`LoRAStat` ``(*stack, *in_shape)``: EMA of per-feature input L2 norms.
      spec: the static :class:`KernelSpec` of the base kernel.
      merged: whether ``s * a @ b`` has been added into the base kernel (then the branch is skipped).
    """

    def __init__(
        self,
        base: nnx.Module,
        spec: KernelSpec,
        *,
        rank: int,
        scale: float,
        init: str = "kaiming",
        dropout: float = 0.0,
        param_dtype: Any = jnp.float32,
        a_mask: bool = False,
        track_input_norm: bool = False,
        input_norm_decay: float = 0.9,
        rngs: nnx.Rngs,
        path: str = "",
    ):
        n, m = spec.n, spec.m
        if rank > min(n, m):
            raise ValueError(
                f"LoRA rank {rank} for {path or 'layer'!r} exceeds min(m, n) = min({m}, {n}) = {min(m, n)} "
                f"of its {m} x {n} (out x in) weight."
            )
        self.base = base
        self.spec = spec
        self.path = path
        stack = tuple(spec.layer_shape) + tuple(spec.batch_shape)
        key = rngs.params()
        if init == "kaiming":
            bound = 1.0 / math.sqrt(n)
            a = jax.random.uniform(key, stack + spec.in_shape + (rank,), param_dtype, -bound, bound)
        elif init == "gaussian":
            a = jax.random.normal(key, stack + spec.in_shape + (rank,), param_dtype) / rank
        else:
            raise ValueError(f"unknown LoRA init {init!r} for {path!r}")
        b = jnp.zeros(stack + (rank,) + spec.out_shape, param_dtype)
        self.lora = LoRAParam(LoraPair(a, b, float(scale), in_ndim=len(spec.in_shape) if stack else None))
        self.gate = LoRAGate(jnp.ones(stack + (rank,), param_dtype))
        self.a_mask = LoRAMask(jnp.ones_like(a)) if a_mask else None
        self.input_norm = LoRAStat(jnp.zeros(stack + spec.in_shape, jnp.float32)) if track_input_norm else None
        self.input_norm_decay = float(input_norm_decay)
        if dropout > 0:
            # One dropout stream per layer slice, so nnx.scan can slice it like the weights.
            self.dropout = nnx.Dropout(dropout, rngs=rngs)
            if spec.layer_shape:
                self.dropout.rngs = rngs["dropout"].split(tuple(spec.layer_shape))
        else:
            self.dropout = None
        self.merged = False
        self.deterministic = False

    # -- parameters -----------------------------------------------------------------------------------
    @property
    def pair(self) -> LoraPair:
        return self.lora.get_value()

    @property
    def layer_ndim(self) -> int:
        """Number of ``nnx.vmap`` layer axes present now (0 on the slice ``nnx.scan`` hands a layer)."""
        return self.pair.stack_ndim - len(self.spec.batch_shape)

    def _gate_like_a(self, gate: Array, pair: LoraPair) -> Array:
        """``gate (*stack, r)`` broadcastable against ``a (*stack, *in, r)``."""
        return gate.reshape(gate.shape[:-1] + (1,) * len(pair.in_shape) + gate.shape[-1:])

    def effective_pair(self) -> LoraPair:
        """The pair with the mask and gate folded in: ``a * a_mask * gate``, ``b`` (same scale)."""
        p = self.pair
        a = p.a if self.a_mask is None else p.a * self.a_mask[...]
        return p.replace(a=a * self._gate_like_a(self.gate[...], p))

    def delta_kernel(self) -> Array:
        """``s * (a * a_mask * gate) @ b`` in the base kernel's shape and axis order (fp32 math), per slice."""
        p = self.effective_pair()
        a2, b2 = pair_matrices(p)
        mat = p.scale * (a2.astype(jnp.float32) @ b2.astype(jnp.float32))
        return self.spec.to_kernel(mat)

    # -- forward --------------------------------------------------------------------------------------
    def _lora_branch(self, x: Array) -> Array:
        p = self.pair
        a = p.a if self.a_mask is None else p.a * self.a_mask[...]
        dtype = x.dtype
        a, b, gate = a.astype(dtype), p.b.astype(dtype), self.gate[...].astype(dtype)
        return p.scale * self.spec.lora_branch(x, a, gate, b)

    def _track_input_norm(self, x: Array) -> None:
        d = self.input_norm_decay
        self.input_norm[...] = d * self.input_norm[...] + (1.0 - d) * self.spec.input_norms(x)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        if self.layer_ndim:
            raise ValueError(
                f"LoRA layer {self.path!r} is stacked over layer axes {self.pair.stack_shape[: self.layer_ndim]} "
                f"(kernel {tuple(self.base.kernel.shape)}); call it on one slice, inside nnx.scan or nnx.vmap."
            )
        y = self.base(x, *args, **kwargs)
        if self.merged:
            return y
        if self.input_norm is not None and not self.deterministic:
            self._track_input_norm(x)
        xd = self.dropout(x, deterministic=self.deterministic) if self.dropout is not None else x
        return y + self._lora_branch(xd).astype(y.dtype)


# -- module-tree helpers ------------------------------------------------------------------------------
def _iter(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
    for path, node in nnx.iter_modules(model):
        yield tuple(path), node


def adaptable_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of every layer ``apply_lora`` can adapt (Linear / LinearGeneral / Einsum)."""
    inside_lora = {path_string(p) for p, m in _iter(model) if isinstance(m, LoRALayer)}
    out = []
    for path, m in _iter(model):
        if isinstance(m, _ADAPTABLE) and path_string(path[:-1]) not in inside_lora:
            out.append(path_string(path))
    return out


def _set_child(parent: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and hasattr(parent, key):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _get_child(parent: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(parent, key):
        return getattr(parent, key)
    return parent[key]


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Adapts ``model`` in place with LoRA and returns it.

    Every ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` whose dotted path matches
    ``config.targets`` is replaced by a :class:`LoRALayer` wrapping it.

    Args:
      model: any Flax NNX module.
      config: the :class:`LoraConfig`.
      rngs: random streams; ``params`` initialises A, ``dropout`` drives LoRA dropout.

    Returns:
      The same model object, adapted.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import lorapro_jax as lp
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.fc(x)
      >>> model = lp.apply_lora(MLP(nnx.Rngs(0)), lp.LoraConfig(rank=2, targets=["fc"]), rngs=nnx.Rngs(1))
      >>> list(lp.lora_layers(model)), model.fc.pair.a.shape, model.fc.pair.b.shape
      (['fc'], (4, 2), (2, 3))
      >>> x = jnp.ones((1, 4))
      >>> bool(jnp.array_equal(model(x), model.fc.base(x)))  # B starts at zero: the output is unchanged
      True

    Raises:
      TypeError: ``model`` is not an ``nnx.Module`` or ``config`` not a :class:`LoraConfig`.
      ValueError: a target matches no adaptable layer (the message lists the adaptable paths), a
        target is already adapted, a targeted layer is of an unsupported kind (e.g. ``nnx.Embed``), or a rank exceeds
        ``min(m, n)`` of its weight (the message names the path).
    """
    check_module(model, "model", "apply_lora", "apply_lora(model, config, rngs=...)")
    check_config(config, "apply_lora")
    chosen: list[tuple[tuple, nnx.Module]] = []
    unsupported: list[str] = []
    inside_lora = {path_string(p) for p, m in _iter(model) if isinstance(m, LoRALayer)}
    for path, m in _iter(model):
        ps = path_string(path)
        if not path or not config.matches(ps):
            continue
        if isinstance(m, LoRALayer) or (isinstance(m, _ADAPTABLE) and path_string(path[:-1]) in inside_lora):
            at = ps if isinstance(m, LoRALayer) else path_string(path[:-1])
            raise ValueError(
                f"LoRA target {at!r} is already adapted (it is a LoRALayer; {ps!r} matched the targets "
                f"{config.targets!r}). apply_lora adapts a layer once: to change its rank or config, rebuild "
                "the model, or merge_and_unwrap it first."
            )
        if isinstance(m, _ADAPTABLE):
            chosen.append((path, m))
        elif isinstance(m, _UNSUPPORTED):
            unsupported.append(f"{ps} ({type(m).__name__})")
    if unsupported:
        raise ValueError(
            f"LoRA targets {config.targets!r} match layers LoRA cannot adapt: {unsupported}. "
            "Only nnx.Linear, nnx.LinearGeneral and nnx.Einsum kernels are supported."
        )
    if not chosen:
        raise ValueError(
            f"LoRA targets {config.targets!r} match no adaptable layer. Adaptable paths: "
            f"{adaptable_paths(model)}"
        )
    if not isinstance(config.targets, str):
        for t in config.targets:
            if not any(matches_targets([t], path_string(p)) for p, _ in chosen):
                raise ValueError(
                    f"LoRA target {t!r} matches no adaptable layer. Adaptable paths: {adaptable_paths(model)}"
                )
    dtype = jnp.dtype(config.param_dtype)
    for path, m in chosen:
        ps = path_string(path)
        spec = kernel_spec_for(ps, m)
        r = config.rank_for(ps)
        layer = LoRALayer(
            m,
            spec,
            rank=r,
            scale=config.scale_for(r),
            init=config.init,
            dropout=config.dropout,
            param_dtype=dtype,
            a_mask=config.a_mask,
            track_input_norm=config.track_input_norm,
            input_norm_decay=config.input_norm_decay,
            rngs=rngs,
            path=ps,
        )
        parent = model
        for key in path[:-1]:
            parent = _get_child(parent, key)
        _set_child(parent, path[-1], layer)
    return model


def lora_layers(model: nnx.Module) -> dict[str, LoRALayer]:
    """``{dotted path: LoRALayer}`` for every adapted layer, in module order."""
    return {path_string(p): m for p, m in _iter(model) if isinstance(m, LoRALayer)}


def lora_state(model: nnx.Module) -> nnx.State:
    """The A/B pairing of ``model``: ``nnx.state(model, LoRAParam)``, whose leaves are :class:`LoraPair`."""
    return nnx.state(model, LoRAParam)


def _add_delta(layer: LoRALayer, sign: float) -> None:
    """``W0 += sign · s·a@b`` in fp32, stored back in the kernel's dtype."""
    k = layer.base.kernel
    k[...] = (k[...].astype(jnp.float32) + sign * layer.delta_kernel()).astype(k[...].dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Adds ``s * a @ b`` into every base kernel and switches the LoRA branches off (in place).

    The forward output is unchanged up to float rounding; call eagerly (not inside ``jit``).
    """
    for path, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"LoRA layer {path!r} is already merged.")
        _add_delta(layer, +1.0)
        layer.merged = True
    return model


def unmerge_lora(model: nnx.Module) -> nnx.Module:
    """Inverse of :func:`merge_lora`: subtracts ``s * a @ b`` again and re-enables the LoRA branches."""
    for path, layer in lora_layers(model).items():
        if not layer.merged:
            raise ValueError(f"LoRA layer {path!r} is not merged.")
        _add_delta(layer, -1.0)
        layer.merged = False
    return model


def merge_and_unwrap(model: nnx.Module) -> nnx.Module:
    """Merges every adapter and replaces each :class:`LoRALayer` by its base layer (in place).

    The result has exactly the structure of the model before :func:`apply_lora`.
    """
    for layer in lora_layers(model).values():
        if not layer.merged:
            _add_delta(layer, +1.0)
    for path, m in [(p, m) for p, m in _iter(model) if isinstance(m, LoRALayer)]:
        parent = model
        for key in path[:-1]:
            parent = _get_child(parent, key)
        _set_child(parent, path[-1], m.base)
    return model


def decay_base_weights(model: nnx.Module, factor: float | Array) -> nnx.Module:
    """Multiplies every adapted base kernel ``W0`` by ``factor`` (in place; jit-friendly via nnx.jit).

    LoRA-Pro's AdamW decays the frozen ``W0`` by ``(1 - lr * weight_decay)`` as well as A and B by its
    square root, so the equivalent weight ``W0 + s B A`` decays exactly as in full AdamW. The optimizer
    only sees A and B; this is the explicit step that decays ``W0`` (see
    :func:`lorapro_jax.base_decay_factor`).
    """
    for path, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(
                f"decay_base_weights: LoRA layer {path!r} is merged, so its kernel holds W0 + s·BA; unmerge it first."
            )
        k = layer.base.kernel
        k[...] = (k[...] * jnp.asarray(factor, jnp.float32)).astype(k[...].dtype)
    return model
