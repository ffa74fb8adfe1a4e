"""The names of Hugging Face checkpoints: NNX parameter paths <-> HF keys, stacked layouts, and writing HF checkpoints.

Naming contract: the NNX attribute path of every parameter, joined with ``"."``, is the HF module
name; the leaf maps as follows (torch ``nn.Linear`` stores ``(out, in)``, Flax ``(in, out)``):

==================  =======================  ===========
NNX leaf            HF suffix                transform
==================  =======================  ===========
``kernel``          ``weight``               transpose
``embedding``       ``weight``               --
``scale``           ``weight`` (LayerNorm)   --
``weight``          ``weight`` (RMSNorm)     --
``bias``            ``bias``                 --
==================  =======================  ===========

Stacked (scan-over-layers) layouts: a module whose ``hf_stacked()`` returns ``{"layers": L}`` holds its
``L`` layers as one module with stacked parameters (leading axis ``L``). Its HF keys
``<prefix>.layers.{i}.<rest>`` are stacked into one array on load and split back on export, so both
layouts read and write the same per-layer checkpoints. Linear kernels are transposed on their last two
axes only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..io.safetensors import save_file
from .base import HFModule

__all__ = [
    "CheckpointKeyError",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "hf_param_names",
    "hf_stacked_prefixes",
    "save_hf_checkpoint",
    "to_hf_state_dict",
]

#: NNX leaf name -> (HF leaf name, transpose?)
_LEAF_MAP: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
    "weight": ("weight", False),
    "bias": ("bias", False),
}

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointKeyError(KeyError):
    """Raised when checkpoint and model disagree (missing / unexpected keys or wrong shapes)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


def _hf_key(path: tuple[Any, ...]) -> tuple[str, bool] | None:
    leaf = str(path[-1])
    if leaf not in _LEAF_MAP:
        return None
    hf_leaf, transpose = _LEAF_MAP[leaf]
    return ".".join([str(p) for p in path[:-1]] + [hf_leaf]), transpose


def hf_param_names(model: nnx.Module, *, ignore_unknown: bool = False) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Map every ``nnx.Param`` of ``model`` to its HF checkpoint key.

    Returns:
        ``{hf_key: (nnx_path, transpose)}`` where ``transpose`` is ``True`` for Linear kernels.

    Raises:
        ValueError: a parameter leaf has no HF equivalent (e.g. an un-merged LoRA factor) and
            ``ignore_unknown`` is false.
    """
    out: dict[str, tuple[tuple[Any, ...], bool]] = {}
    unknown = []
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        m = _hf_key(path)
        if m is None:
            unknown.append(".".join(map(str, path)))
            continue
        key, transpose = m
        if key in out:
            raise ValueError(f"Two parameters map to the same HF key {key!r}")
        out[key] = (tuple(path), transpose)
    if unknown and not ignore_unknown:
        raise ValueError(
            "Parameters without a Hugging Face equivalent (merge adapters first or pass "
            f"ignore_unknown=True): {unknown}"
        )
    return out


def to_hf_state_dict(model: nnx.Module, *, ignore_unknown: bool = False) -> dict[str, np.ndarray]:
    """Export a model's parameters under Hugging Face names and layouts.

    Linear kernels ``(in, out)`` are transposed back to torch ``(out, in)``; everything else is
    copied as is. Stacked (scan-over-layers) parameters are written as per-layer keys. Tied weights
    (e.g. ``lm_head`` of a tied Llama) are not duplicated, matching what ``save_pretrained`` writes.

    Args:
        model: any model from :mod:`lorapro_jax.models` (or a sub-module: names are then relative).
        ignore_unknown: skip parameters whose leaf has no HF equivalent instead of raising.

    Returns:
        ``{hf_name: np.ndarray}`` ready for ``safetensors.numpy.save_file``.
    """
    out: dict[str, np.ndarray] = {}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for key, (path, transpose) in hf_param_names(model, ignore_unknown=ignore_unknown).items():
        arr = np.asarray(jax.device_get(flat[path][...]))
        out[key] = np.ascontiguousarray(_swap_last(arr) if transpose else arr)
    return _unstack_layers(out, hf_stacked_prefixes(model))


def save_hf_checkpoint(
    model: HFModule,
    directory: str | os.PathLike,
    *,
    config: Any | None = None,
    ignore_unknown: bool = False,
) -> Path:
    """Write ``model.safetensors`` (+ ``config.json``) in Hugging Face layout.

    Args:
        model: model to export (merge LoRA adapters before exporting a full checkpoint).
        directory: output directory (created if needed).
        config: config to write; defaults to ``model.config``. ``None`` and no ``model.config``:
            only the weights are written.
        ignore_unknown: see :func:`to_hf_state_dict`.

    Returns:
        The output directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model, ignore_unknown=ignore_unknown), directory / SAFE_WEIGHTS_NAME, {"format": "pt"})
    config = config if config is not None else getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(str(directory))
    return directory




def hf_stacked_prefixes(model: nnx.Module) -> dict[str, int]:
    """HF name prefixes of stacked layer collections in ``model``, with their layer counts.

    E.g. ``{"model.layers": 32}`` for a ``LlamaForCausalLM(..., scan_layers=True)``; ``{}`` for
    unrolled models. Read from every sub-module's ``hf_stacked()`` (see the module docstring).
    """
    out: dict[str, int] = {}
    for path, node in nnx.iter_graph(model):
        get = getattr(node, "hf_stacked", None)
        if isinstance(node, nnx.Module) and callable(get):
            for attr, count in get().items():
                out[".".join([*map(str, path), attr])] = int(count)
    return out


def _split_stacked(key: str, stacked: Mapping[str, int]) -> tuple[str, str] | None:
    """``(prefix, rest)`` when ``key`` is ``<prefix>.<rest>`` for a stacked prefix (rest not a layer index)."""
    for prefix in stacked:
        if key.startswith(prefix + "."):
            rest = key[len(prefix) + 1 :]
            if not rest.split(".", 1)[0].isdigit():
                return prefix, rest
    return None


def _per_layer_names(names: Iterable[str], stacked: Mapping[str, int]) -> set[str]:
    """The per-layer HF keys that the (possibly stacked) model names stand for."""
    out: set[str] = set()
    for key in names:
        hit = _split_stacked(key, stacked)
        if hit is None:
            out.add(key)
        else:
            prefix, rest = hit
            out.update(f"{prefix}.{i}.{rest}" for i in range(stacked[prefix]))
    return out


def _stack_layers(
    tensors: dict[str, np.ndarray], expected: set[str], stacked: Mapping[str, int], where: Any
) -> dict[str, np.ndarray]:
    """Stacks ``<prefix>.{i}.<rest>`` (i = 0..L-1) into ``<prefix>.<rest>`` for every expected stacked name.

    Raises:
        CheckpointKeyError: some but not all layers of a stacked name are present, or their shapes
            or dtypes differ (the message names the keys).
    """
    if not stacked:
        return tensors
    out = dict(tensors)
    for key in sorted(expected):
        hit = _split_stacked(key, stacked)
        if hit is None:
            continue
        prefix, rest = hit
        layer_keys = [f"{prefix}.{i}.{rest}" for i in range(stacked[prefix])]
        present = [k for k in layer_keys if k in tensors]
        if not present:
            continue  # reported as missing by the caller
        if len(present) != len(layer_keys):
            absent = [k for k in layer_keys if k not in tensors]
            raise CheckpointKeyError(f"Cannot load {where}: stacked parameter {key!r} lacks layers {absent}.")
        parts = [out.pop(k) for k in layer_keys]
        if len({(p.shape, p.dtype) for p in parts}) != 1:
            shapes = {k: (tuple(p.shape), str(p.dtype)) for k, p in zip(layer_keys, parts)}
            raise CheckpointKeyError(f"Cannot load {where}: layers of {key!r} differ in shape or dtype: {shapes}")
        out[key] = np.stack(parts)
    return out


def _unstack_layers(tensors: dict[str, np.ndarray], stacked: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Inverse of :func:`_stack_layers`: ``<prefix>.<rest>`` of shape ``(L, ...)`` to per-layer keys."""
    if not stacked:
        return tensors
    out: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        hit = _split_stacked(key, stacked)
        if hit is None:
            out[key] = arr
            continue
        prefix, rest = hit
        for i in range(stacked[prefix]):
            out[f"{prefix}.{i}.{rest}"] = np.ascontiguousarray(arr[i])
    return out


def _swap_last(arr: Any) -> Any:
    """Transposes a (possibly stacked) Linear kernel on its last two axes."""
    return np.swapaxes(arr, -1, -2)
