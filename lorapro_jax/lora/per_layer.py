"""Per-layer names of stacked LoRA layers (scan-over-layers models), for formats that name every layer.

A stacked :class:`~lorapro_jax.lora.nnx_lora.LoRALayer` at ``"model.layers.self_attn.q_proj"`` (pair
``a: (L, *in, r)``) stands for ``L`` per-layer modules ``"model.layers.{i}.self_attn.q_proj"``, the names
the unrolled model and Hugging Face PEFT use. Where the layer index goes is the path of the module that
holds the stacked layers (the one ``nnx.vmap`` built), given as ``stacked_prefixes={"model.layers": L}``
or read from the model: every sub-module with an ``hf_stacked()`` method returning ``{attribute: L}``
(as the scan-layers models in :mod:`lorapro_jax.models` do) declares ``"<its path>.<attribute>"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from .nnx_lora import LoRALayer
from .pair import LoraPair

__all__ = ["LayerSlice", "declared_stacked_prefixes", "per_layer_view"]


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Layer ``index`` of a stacked :class:`LoRALayer`, read like an unstacked one (read-only)."""

    layer: LoRALayer
    index: int
    stacked_path: str

    @property
    def spec(self):
        return self.layer.spec

    @property
    def merged(self) -> bool:
        return self.layer.merged

    @property
    def pair(self) -> LoraPair:
        p = self.layer.pair
        return LoraPair(p.a[self.index], p.b[self.index], p.scale)

    def effective_pair(self) -> LoraPair:
        p = self.layer.effective_pair()
        return LoraPair(p.a[self.index], p.b[self.index], p.scale)


def declared_stacked_prefixes(model: nnx.Module) -> dict[str, int]:
    """``{module path: L}`` declared by ``hf_stacked()`` methods of the model's sub-modules."""
    out: dict[str, int] = {}
    for path, node in nnx.iter_graph(model):
        get = getattr(node, "hf_stacked", None)
        if isinstance(node, nnx.Module) and callable(get):
            for attr, count in get().items():
                out[".".join([*map(str, path), str(attr)])] = int(count)
    return out


def per_layer_view(
    model: nnx.Module,
    layers: Mapping[str, LoRALayer],
    stacked_prefixes: Mapping[str, int] | None,
    who: str,
) -> dict[str, Any]:
    """``{per-layer path: LoRALayer or LayerSlice}``: unstacked layers as they are, stacked ones per layer.

    Raises:
      ValueError: a stacked layer lies under no stacked prefix (the message says what to pass), its
        layer count differs from the prefix's, it has more than one layer axis, or two names collide.
    """
    prefixes = dict(declared_stacked_prefixes(model) if stacked_prefixes is None else stacked_prefixes)
    out: dict[str, Any] = {}
    for path, layer in layers.items():
        k = layer.layer_ndim
        if k == 0:
            names = {path: layer}
        else:
            stack = layer.pair.stack_shape[:k]
            if k > 1:
                raise ValueError(f"{who}: LoRA layer {path!r} is stacked over {k} layer axes {stack}; one is supported.")
            hits = [p for p in prefixes if path.startswith(p + ".")]
            if not hits:
                raise ValueError(
                    f"{who}: LoRA layer {path!r} is stacked over {stack[0]} layers (kernel "
                    f"{tuple(layer.base.kernel.shape)}); say which module holds the layers so that each gets its "
                    f"own name '<prefix>.<i>.<rest>': pass stacked_prefixes={{'<module path>': {stack[0]}}} (e.g. "
                    "{'model.layers': 32} names model.layers.self_attn.q_proj's layers model.layers.{i}.self_attn."
                    "q_proj) or give that module an hf_stacked() method returning {attribute: number of layers}."
                )
            prefix = max(hits, key=len)
            if int(prefixes[prefix]) != stack[0]:
                raise ValueError(
                    f"{who}: LoRA layer {path!r} is stacked over {stack[0]} layers but stacked_prefixes says "
                    f"{prefix!r} holds {prefixes[prefix]}."
                )
            rest = path[len(prefix) + 1 :]
            names = {f"{prefix}.{i}.{rest}": LayerSlice(layer, i, path) for i in range(stack[0])}
        for name, view in names.items():
            if name in out:
                raise ValueError(f"{who}: two LoRA layers map to the per-layer name {name!r}.")
            out[name] = view
    return out
