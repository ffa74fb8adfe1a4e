"""Pairings by leaf names: :func:`name_pairing` (regexes on paths, any tree) and :func:`nnx_lora_pairing` (flax's ``nnx.LoRA``).

Regexes are matched with ``re.search`` against the ``"/"``-joined leaf paths of :mod:`lorapro_jax.pairings.plan`.
"""

from __future__ import annotations

import re
from typing import Callable

from .plan import Pairing, _shape

__all__ = ["NamePairing", "name_pairing", "nnx_lora_pairing"]

Scale = float | Callable[[str], float | None]


def _layer_group(pattern: re.Pattern, which: str) -> str | int:
    if "layer" in pattern.groupindex:
        return "layer"
    if pattern.groups >= 1:
        return 1
    raise ValueError(
        f"name_pairing: the {which} pattern {pattern.pattern!r} has no group naming the layer; write e.g. "
        r"'(?P<layer>.*)/lora_A$' (a group named 'layer', or a first group)."
    )


class NamePairing(Pairing):
    """Pairs leaves by regexes on their paths; see :func:`name_pairing`."""

    def __init__(
        self,
        a_pattern: str,
        b_pattern: str,
        scale: Scale,
        *,
        kernel_path: Callable[[str], str] | None = None,
        module_name: Callable[[str], str] | None = None,
        stack_ndim: int | None = None,
        name: str = "name_pairing",
    ):
        self.a_pattern, self.b_pattern = re.compile(a_pattern), re.compile(b_pattern)
        self._kernel_path, self._module_name, self._stack_ndim = kernel_path, module_name, stack_ndim
        self._ga, self._gb = _layer_group(self.a_pattern, "A"), _layer_group(self.b_pattern, "B")
        if not callable(scale):
            scale = float(scale)
            if not scale > 0:
                raise ValueError(f"{name}: the LoRA scale must be positive, got {scale}.")
        self.scale = scale
        self.name = name

    def __repr__(self) -> str:
        return f"{self.name}({self.a_pattern.pattern!r}, {self.b_pattern.pattern!r}, {self.scale!r})"

    def kernel_path(self, name: str) -> str | None:
        return self._kernel_path(name) if self._kernel_path is not None else None

    def stack_ndim(self, name, a_shape, b_shape) -> int:
        if self._stack_ndim is not None:
            return int(self._stack_ndim)
        return super().stack_ndim(name, a_shape, b_shape)

    def module_name(self, name: str) -> str:
        return self._module_name(name) if self._module_name is not None else super().module_name(name)

    def scale_for(self, layer: str, a_path: str, a_shape: tuple[int, ...]) -> float:
        if not callable(self.scale):
            return self.scale
        try:
            s = self.scale(layer)
        except Exception as e:  # the user's function: name the layer in the error
            raise ValueError(f"{self.name}: the scale function failed for layer {layer!r} ({a_path}): {e!r}") from e
        if s is None or not float(s) > 0:
            raise ValueError(
                f"{self.name}: cannot determine the LoRA scale of layer {layer!r} ({a_path}): the scale function "
                f"returned {s!r}, expected a positive float."
            )
        return float(s)

    def _collect(self, paths: list[str]) -> tuple[dict[str, int], dict[str, int]]:
        found: tuple[dict[str, int], dict[str, int]] = ({}, {})
        for i, p in enumerate(paths):
            ma, mb = self.a_pattern.search(p), self.b_pattern.search(p)
            if ma and mb:
                raise ValueError(f"{self.name}: the path {p} matches both the A and the B pattern ({self!r}).")
            for side, m, g in ((0, ma, self._ga), (1, mb, self._gb)):
                if not m:
                    continue
                layer = m.group(g) or ""
                if layer in found[side]:
                    raise ValueError(
                        f"{self.name}: layer {layer!r} has two {'AB'[side]} factors: {paths[found[side][layer]]} "
                        f"and {p}."
                    )
                found[side][layer] = i
        return found

    def match(self, paths, leaves):
        a_of, b_of = self._collect(paths)
        lonely = [f"A {paths[i]} (layer {k!r}) has no B" for k, i in a_of.items() if k not in b_of]
        lonely += [f"B {paths[i]} (layer {k!r}) has no A" for k, i in b_of.items() if k not in a_of]
        if lonely:
            raise ValueError(f"{self.name}: unpaired LoRA factors: " + "; ".join(lonely) + ".")
        out = []
        for layer, ai in a_of.items():
            a_shape = _shape(leaves[ai], paths[ai])
            out.append((layer, ai, b_of[layer], self.scale_for(layer, paths[ai], a_shape)))
        return out


def name_pairing(
    a_pattern: str,
    b_pattern: str,
    scale: Scale,
    *,
    kernel_path: Callable[[str], str] | None = None,
    module_name: Callable[[str], str] | None = None,
    stack_ndim: int | None = None,
) -> Pairing:
    """A pairing by regexes on leaf paths, for any parameter tree.

    Every leaf whose ``"/"``-joined path matches ``a_pattern`` (``re.search``) is an ``A`` factor, every one
    matching ``b_pattern`` a ``B`` factor; the group named ``layer`` (or the first group) of each match names the
    layer, and the A and B of the same layer form a pair. Factors must be in the Flax layout ``a: (*in, r)``,
    ``b: (r, *out)`` (PEFT's torch ``lora_A.weight (r, in)`` must be transposed first).

    Example::

        pairing = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", scale=2.0)
        tx = lp.paired(lp.lora_pro_adamw(1e-3), pairing)

    Args:
      a_pattern: regex selecting the A leaves, with a group naming the layer.
      b_pattern: regex selecting the B leaves, with a group naming the layer.
      scale: the LoRA scale ``s`` of every pair, or a function of the layer name returning it.
      kernel_path: optional function of the layer name giving the path of its base kernel ``W0`` (needed by
        :func:`~lorapro_jax.lora_ga_init_paired`; without it LoRA-GA is not supported for this pairing).
      module_name: optional function of the layer name giving its dotted module name for PEFT export
        (default: the layer name with ``"/"`` replaced by ``"."``).
      stack_ndim: leading stack axes of every pair (``a (*stack, *in, r)``, ``b (*stack, r, *out)``: a stack of
        independent adapters, run as a stacked :class:`~lorapro_jax.LoraPair`). Default: read from the shapes
        (``b`` not starting with the rank but after ``k`` axes shared with ``a``); an ambiguous pair is an error.

    Returns:
      A :class:`Pairing`. Its plan raises ``ValueError`` naming the paths for an A without its B (or the
      reverse), two factors of one kind for a layer, mismatched ranks, a scale function returning ``None``,
      and a tree in which no pair is found.
    """
    return NamePairing(
        a_pattern, b_pattern, scale, kernel_path=kernel_path, module_name=module_name, stack_ndim=stack_ndim
    )


def nnx_lora_pairing(scale: Scale = 1.0) -> Pairing:
    """The pairing of flax's ``nnx.LoRA`` / ``nnx.LoRALinear``: leaves ``.../lora_a (in, r)``, ``.../lora_b (r, out)``.

    ``nnx.LoRA`` computes ``x @ lora_a @ lora_b`` with no scaling, so the default scale is 1.0; pass the
    scale your model applies (a float, or a function of the layer path) if it multiplies the LoRA branch.
    The layer name of a pair is the path of its ``nnx.LoRA`` module (``""`` for a bare ``nnx.LoRA``).
    """
    return NamePairing(
        r"^(?:(?P<layer>.*)/)?lora_a$",
        r"^(?:(?P<layer>.*)/)?lora_b$",
        scale,
        kernel_path=_nnx_lora_kernel,
        module_name=_nnx_lora_module,
        name="nnx_lora_pairing",
    )


def _nnx_lora_kernel(layer: str) -> str:
    """``nnx.LoRALinear`` keeps its ``nnx.LoRA`` at ``<module>/lora`` and its kernel at ``<module>/kernel``."""
    parent, _, last = layer.rpartition("/")
    return f"{parent}/kernel" if parent and last == "lora" else f"{layer}/base_module/kernel" if layer else "base_module/kernel"


def _nnx_lora_module(layer: str) -> str:
    parent, _, last = layer.rpartition("/")
    return (parent if last == "lora" else layer).replace("/", ".")
