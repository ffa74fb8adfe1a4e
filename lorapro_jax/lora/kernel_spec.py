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

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = ["KernelSpec", "kernel_spec_for"]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static description of how a base layer's kernel maps its input to its output.

    Attributes:
      kind: ``"linear"``, ``"general"`` or ``"einsum"``.
      in_shape: kernel axes contracted with the input (``n = prod(in_shape)``).
      out_shape: kernel axes that appear in the output (``m = prod(out_shape)``).
      axis: for ``"general"``: the input axes contracted (as given to ``nnx.LinearGeneral``).
      einsum: for ``"einsum"``: ``(x_spec, kernel_spec, y_spec, in_letters, out_letters)``.
      batch_shape: the module's own batch axes (``nnx.LinearGeneral`` ``batch_axis`` sizes, or the
        sizes of ``nnx.Einsum`` kernel letters shared by input and output); ``()`` for none.
      batch_letters: for ``"einsum"``: the batch letters, in kernel order.
      layer_shape: the layer (``nnx.vmap``) axes the kernel had when the layer was adapted; informative
        only (inside ``nnx.scan`` the same spec describes the per-layer slice).
    """

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axis: tuple[int, ...] = ()
    einsum: tuple[str, str, str, str, str] | None = None
    batch_shape: tuple[int, ...] = ()
    batch_letters: str = ""
    layer_shape: tuple[int, ...] = ()

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
        full = mat.reshape(mat.shape[:-2] + self.in_shape + self.out_shape)
        if self.kind != "einsum":
            return full
        _, k, _, ins, outs = self.einsum
        return jnp.einsum(f"...{self.batch_letters}{ins}{outs}->...{k}", full)

    def from_kernel(self, kernel: Array) -> Float[Array, "*stack n m"]:
        """Inverse of :meth:`to_kernel`: the base kernel as ``(*layers, *batch, n, m)`` matrices."""
        if self.kind == "einsum":
            _, k, _, ins, outs = self.einsum
            kernel = jnp.einsum(f"...{k}->...{self.batch_letters}{ins}{outs}", kernel)
        lead = kernel.shape[: kernel.ndim - self.matrix_ndim]
        return kernel.reshape(lead + self.batch_shape + (self.n, self.m))


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
        return KernelSpec("linear", own[:1], own[1:], layer_shape=layers)
    if isinstance(module, nnx.LinearGeneral):
        batch = tuple(int(v) for v in module.batch_axis.values())
        ins, outs = tuple(module.in_features), tuple(module.out_features)
        layers = _layer_axes(path, module, kshape, batch + ins + outs, "batch_axis/in_features/out_features")
        return KernelSpec(
            "general", ins, outs, axis=tuple(module.axis), batch_shape=batch, layer_shape=layers
        )
    if isinstance(module, nnx.Einsum):
        eq = module.einsum_str.replace(" ", "")
        own = tuple(module.kernel_shape)
        layers = _layer_axes(path, module, kshape, own, "einsum kernel_shape")
        x, k, y, ins, outs, batch = _parse_einsum(path, eq, own)
        if len(k) != len(own):
            raise ValueError(f"LoRA target {path!r}: einsum {eq!r} kernel spec {k!r} does not fit kernel_shape {own}.")
        size = dict(zip(k, own))
        return KernelSpec(
            "einsum",
            tuple(size[c] for c in ins),
            tuple(size[c] for c in outs),
            einsum=(x, k, y, ins, outs),
            batch_shape=tuple(size[c] for c in batch),
            batch_letters=batch,
            layer_shape=layers,
        )
    raise TypeError(f"LoRA target {path!r}: unsupported module type {type(module).__name__}.")
