"""How a base layer's kernel maps its input to its output: :class:`KernelSpec` and its reader.

A kernel may carry *stack* axes in front of its matrix axes (see :mod:`lorapro_jax.lora.pair`):

* **layer axes**: leading axes added by ``nnx.vmap`` when blocks are created stacked for ``nnx.scan``
  (kernel ``(*layers, *per_layer_kernel)``). They are read off the kernel as the axes in front of the
  shape the module itself declares (``nnx.Linear``'s ``in_features``/``out_features``,
  ``nnx.LinearGeneral``'s ``batch_axis``/``in_features``/``out_features``, ``nnx.Einsum``'s
  ``kernel_shape``), so they must be leading (``nnx.vmap``'s default ``out_axes=0``);
* **batch axes** of the module itself: ``nnx.LinearGeneral(batch_axis=...)`` kernels
  ``(*batch, *in, *out)``, and ``nnx.Einsum`` kernel letters that appear in both the input and the output
  (e.g. ``E`` in ``"ECD,EDF->ECF"``): a batch of independent matrices.

The pair of a layer stacks both: ``a: (*layers, *batch, *in, r)``, ``b: (*layers, *batch, r, *out)``.
Inside ``nnx.scan`` the layer axes are gone and only the batch axes remain. The number of layer axes
present is therefore read at run time from the pair (``pair.stack_ndim - len(spec.batch_shape)``),
never stored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = ["KernelSpec", "LinearSpec", "GeneralSpec", "EinsumSpec", "kernel_spec_for"]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static description of how a base layer's kernel maps its input to its output.

    One subclass per kind of layer (:class:`LinearSpec`, :class:`GeneralSpec`, :class:`EinsumSpec`) holds
    the kind's own behaviour: the LoRA branch's contractions (:meth:`lora_branch`), the per-feature input
    norms (:meth:`input_norms`) and the kernel's axis order (:meth:`to_kernel` / :meth:`from_kernel`), so a
    layer never branches on the kind.

    Attributes:
      in_shape: kernel axes contracted with the input (``n = prod(in_shape)``).
      out_shape: kernel axes that appear in the output (``m = prod(out_shape)``).
      batch_shape: the module's own batch axes (``nnx.LinearGeneral`` ``batch_axis`` sizes, or the
        sizes of ``nnx.Einsum`` kernel letters shared by input and output); ``()`` for none.
      layer_shape: the layer (``nnx.vmap``) axes the kernel had when the layer was adapted; informative
        only (inside ``nnx.scan`` the same spec describes the per-layer slice).
      kind: ``"linear"``, ``"general"`` or ``"einsum"`` (a class attribute, e.g. for metadata).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batch_shape: tuple[int, ...] = ()
    layer_shape: tuple[int, ...] = ()
    kind: ClassVar[str] = ""

    @property
    def n(self) -> int:
        return math.prod(self.in_shape)

    @property
    def m(self) -> int:
        return math.prod(self.out_shape)

    @property
    def matrix_ndim(self) -> int:
        """Number of kernel axes of one layer: batch, input and output axes."""
        return len(self.batch_shape) + len(self.in_shape) + len(self.out_shape)

    def to_kernel(self, mat: Float[Array, "*stack n m"]) -> Array:
        """Reshapes ``(*stack, n, m)`` matrices into the base kernel's shape and axis order.

        ``stack`` is ``(*layers, *batch)``; ``layers`` may be empty (an unstacked or a scanned slice).
        """
        return mat.reshape(mat.shape[:-2] + self.in_shape + self.out_shape)

    def from_kernel(self, kernel: Array) -> Float[Array, "*stack n m"]:
        """Inverse of :meth:`to_kernel`: the base kernel as ``(*layers, *batch, n, m)`` matrices."""
        lead = kernel.shape[: kernel.ndim - self.matrix_ndim]
        return kernel.reshape(lead + self.batch_shape + (self.n, self.m))

    def lora_branch(
        self, x: Array, a: Float[Array, "*batch *in r"], gate: Float[Array, "*batch r"], b: Float[Array, "*batch r *out"]
    ) -> Array:
        """``((x · a) * gate) · b`` contracted as the base layer contracts ``x`` with its kernel (unscaled).

        ``a``, ``gate`` and ``b`` carry the module's batch axes only (no layer axes): one layer's slice.
        """
        raise NotImplementedError(f"{type(self).__name__}.lora_branch")

    def input_norms(self, x: Array) -> Float[Array, "*batch *in"]:
        """Float32 L2 norm of each input feature of ``x`` over every other axis, shaped ``(*batch, *in)``."""
        raise NotImplementedError(f"{type(self).__name__}.input_norms")


@dataclasses.dataclass(frozen=True)
class LinearSpec(KernelSpec):
    """``nnx.Linear``: kernel ``(in, out)``, ``y = x @ kernel`` over the last input axis."""

    kind: ClassVar[str] = "linear"

    def lora_branch(self, x, a, gate, b):
        return ((x @ a) * gate) @ b

    def input_norms(self, x):
        return _norms(x, tuple(range(x.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class GeneralSpec(KernelSpec):
    """``nnx.LinearGeneral``: kernel ``(*batch, *in, *out)``; ``axis`` are the input axes contracted.

    Its batch axes are the leading input axes (as ``nnx.LinearGeneral`` requires).
    """

    axis: tuple[int, ...] = ()
    kind: ClassVar[str] = "general"

    def lora_branch(self, x, a, gate, b):
        axes = tuple(ax % x.ndim for ax in self.axis)
        nb = len(self.batch_shape)
        if not nb:
            h = jnp.tensordot(x, a, axes=(axes, tuple(range(len(axes)))))
            return jnp.tensordot(h * gate, b, axes=1)
        bat = tuple(range(nb))
        h = jax.lax.dot_general(x, a, ((axes, tuple(range(nb, nb + len(axes)))), (bat, bat)))
        h = h * gate.reshape(gate.shape[:-1] + (1,) * (h.ndim - nb - 1) + gate.shape[-1:])
        return jax.lax.dot_general(h, b, (((h.ndim - 1,), (nb,)), (bat, bat)))

    def input_norms(self, x):
        kept = {ax % x.ndim for ax in self.axis} | set(range(len(self.batch_shape)))
        norms = _norms(x, tuple(i for i in range(x.ndim) if i not in kept))
        return norms.reshape(self.batch_shape + self.in_shape)


@dataclasses.dataclass(frozen=True)
class EinsumSpec(KernelSpec):
    """``nnx.Einsum``: any kernel axis order; letters shared by input and output are batch axes.

    Attributes:
      einsum: ``(x_spec, kernel_spec, y_spec, in_letters, out_letters)`` of the module's equation.
      batch_letters: the batch letters, in kernel order.
    """

    einsum: tuple[str, str, str, str, str] = ("", "", "", "", "")
    batch_letters: str = ""
    kind: ClassVar[str] = "einsum"

    def to_kernel(self, mat):
        full = super().to_kernel(mat)
        _, k, _, ins, outs = self.einsum
        return jnp.einsum(f"...{self.batch_letters}{ins}{outs}->...{k}", full)

    def from_kernel(self, kernel):
        _, k, _, ins, outs = self.einsum
        return super().from_kernel(jnp.einsum(f"...{k}->...{self.batch_letters}{ins}{outs}", kernel))

    def lora_branch(self, x, a, gate, b):
        xs, _, ys, ins, outs = self.einsum
        bl = self.batch_letters
        rest = "".join(c for c in xs if c in ys or c == ".")
        h = jnp.einsum(f"{xs},{bl}{ins}Z->{rest}Z", x, a)
        h = jnp.einsum(f"{rest}Z,{bl}Z->{rest}Z", h, gate) if bl else h * gate
        return jnp.einsum(f"{rest}Z,{bl}Z{outs}->{ys}", h, b)

    def input_norms(self, x):
        xs, _, _, ins, _ = self.einsum
        keep = ins + self.batch_letters
        named = xs.replace(".", "")
        lead = x.ndim - len(named)  # leading ellipsis axes (0 without one): always reduced
        axes = tuple(range(lead)) + tuple(lead + i for i, c in enumerate(named) if c not in keep)
        order = [c for c in named if c in keep]
        norms = jnp.transpose(_norms(x, axes), [order.index(c) for c in self.batch_letters + ins])
        return norms.reshape(self.batch_shape + self.in_shape)


def _norms(x: Array, axes: tuple[int, ...]) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes))


def _parse_einsum(path: str, eq: str, kshape: tuple[int, ...]) -> tuple:
    lhs, y = eq.split("->")
    x, k = lhs.split(",")
    if "." in k:
        raise ValueError(f"LoRA target {path!r}: einsum {eq!r} has an ellipsis in the kernel spec.")
    if "Z" in eq:
        raise ValueError(f"LoRA target {path!r}: einsum {eq!r} uses the letter 'Z', reserved for the rank.")
    ins = "".join(c for c in k if c in x and c not in y)
    outs = "".join(c for c in k if c in y and c not in x)
    batch = "".join(c for c in k if c in x and c in y)
    summed = [c for c in k if c not in x and c not in y]
    if summed:
        raise ValueError(
            f"LoRA target {path!r}: einsum {eq!r} sums kernel axes {summed} away (they appear in neither the "
            "input nor the output); LoRA needs every kernel axis to be an input, output or batch axis."
        )
    if not ins or not outs:
        raise ValueError(f"LoRA target {path!r}: einsum {eq!r} has no kernel input axis or no output axis.")
    return x, k, y, ins, outs, batch


def _layer_axes(path: str, module: nnx.Module, kshape: tuple[int, ...], own: tuple[int, ...], what: str):
    """The leading layer axes of ``kshape`` in front of the module's own kernel shape ``own``."""
    lead = len(kshape) - len(own)
    if lead < 0 or kshape[lead:] != own:
        raise ValueError(
            f"LoRA target {path!r}: {type(module).__name__} kernel has shape {kshape}, which does not end in the "
            f"shape {own} its {what} declare; cannot tell its stack (layer) axes from its input/output axes "
            "(stack axes must be leading, as nnx.vmap(out_axes=0) creates them)."
        )
    return kshape[:lead]


def kernel_spec_for(path: str, module: nnx.Module) -> KernelSpec:
    """Reads the :class:`KernelSpec` of an ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum``.

    Stack axes are read from the module's own declared features, never guessed.

    Raises:
      ValueError: the kernel's shape does not fit the module's declared features (the message names
        the path and the kernel shape), or an einsum kernel has axes LoRA cannot map.
      TypeError: an unsupported module type.
    """
    kshape = tuple(module.kernel.shape)
    if isinstance(module, nnx.Linear):
        own = (int(module.in_features), int(module.out_features))
        layers = _layer_axes(path, module, kshape, own, "in_features/out_features")
        return LinearSpec(own[:1], own[1:], layer_shape=layers)
    if isinstance(module, nnx.LinearGeneral):
        batch = tuple(int(v) for v in module.batch_axis.values())
        ins, outs = tuple(module.in_features), tuple(module.out_features)
        layers = _layer_axes(path, module, kshape, batch + ins + outs, "batch_axis/in_features/out_features")
        return GeneralSpec(ins, outs, axis=tuple(module.axis), batch_shape=batch, layer_shape=layers)
    if isinstance(module, nnx.Einsum):
        eq = module.einsum_str.replace(" ", "")
        own = tuple(module.kernel_shape)
        layers = _layer_axes(path, module, kshape, own, "einsum kernel_shape")
        x, k, y, ins, outs, batch = _parse_einsum(path, eq, own)
        if len(k) != len(own):
            raise ValueError(f"LoRA target {path!r}: einsum {eq!r} kernel spec {k!r} does not fit kernel_shape {own}.")
        size = dict(zip(k, own))
        return EinsumSpec(
            tuple(size[c] for c in ins),
            tuple(size[c] for c in outs),
            einsum=(x, k, y, ins, outs),
            batch_shape=tuple(size[c] for c in batch),
            batch_letters=batch,
            layer_shape=layers,
        )
    raise TypeError(f"LoRA target {path!r}: unsupported module type {type(module).__name__}.")
