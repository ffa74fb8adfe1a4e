"""Merged weights of a LoRA-adapted model: ``W0 + s * a @ b`` per adapted kernel, in Flax or Hugging Face form.

* :func:`export_merged` — every ``nnx.Param`` of the model with the adapters merged into the base
  kernels (``W0 + s * a @ b``, Flax layout), keyed by the dotted path the model would have without
  LoRA (the ``LoRALayer``'s ``.base`` level dropped).
* :func:`export_merged_hf` — the same weights under Hugging Face names and torch layouts (through
  :func:`lorapro_jax.models.to_hf_state_dict`), optionally written as ``model.safetensors``.

Reference: Hu et al., "LoRA", arXiv 2106.09685 (merging ``W = W0 + s B A`` for inference).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import check_module, check_path
from ..lora.nnx_lora import LoRAParam, lora_layers, merge_and_unwrap
from .safetensors import save_file

__all__ = ["export_merged", "export_merged_hf"]


def _unwrapped_key(path: tuple[str, ...], layer_paths: set[str]) -> tuple[str, str | None]:
    """Drops the ``base`` level below a LoRALayer; returns (dotted key, owning LoRA path or None)."""
    for i in range(len(path) - 1):
        prefix = ".".join(path[:i])
        if path[i] == "base" and prefix in layer_paths:
            return ".".join(path[:i] + path[i + 1 :]), prefix
    return ".".join(path), None


def export_merged(model: nnx.Module, *, dtype: Any = None) -> dict[str, np.ndarray]:
    """All parameters of ``model`` with every adapter merged into its base kernel (Flax layout).

    The model is not modified. For an adapted layer at ``p`` the merged kernel
    ``W0 + s * (a * a_mask * gate) @ b`` (computed in fp32, cast back to the kernel dtype) is returned
    under ``"p.kernel"`` (not ``"p.base.kernel"``); already merged layers are returned as they are.
    LoRA factors, gates, masks and statistics are not parameters of the merged model and are left out.

    Args:
      model: an NNX model, adapted or not.
      dtype: cast every array to this dtype (default: keep each parameter's dtype).

    Returns:
      ``{dotted path: np.ndarray}`` — e.g. ``"encoder.layer.0.attention.self.query.kernel": (in, out)``.
    """
    check_module(model, "model", "export_merged", "export_merged(model)")
    layers = lora_layers(model)
    out: dict[str, np.ndarray] = {}
    for vpath, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
        path = tuple(str(p) for p in vpath)
        key, owner = _unwrapped_key(path, set(layers))
        arr = var[...]
        if owner is not None and path[-1] == "kernel" and not layers[owner].merged:
            arr = (arr.astype(jnp.float32) + layers[owner].delta_kernel()).astype(arr.dtype)
        if key in out:
            raise ValueError(f"export_merged: two parameters map to the same key {key!r}.")
        arr = np.asarray(jax.device_get(arr))
        out[key] = arr.astype(dtype) if dtype is not None else arr
    return out


def _default_to_hf() -> Callable[[nnx.Module], dict[str, np.ndarray]]:
    try:
        from ..models import to_hf_state_dict
    except ImportError as e:  # pragma: no cover - depends on the optional models package
        raise ImportError(
            "export_merged_hf needs lorapro_jax.models.to_hf_state_dict; pass to_hf_state_dict=... explicitly."
        ) from e
    return to_hf_state_dict


def export_merged_hf(
    model: nnx.Module,
    out_file: str | os.PathLike | None = None,
    *,
    to_hf_state_dict: Callable[[nnx.Module], Mapping[str, np.ndarray]] | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """The merged model under Hugging Face names and torch layouts, optionally saved with safetensors.

    A copy of ``model`` is merged and unwrapped (:func:`~lorapro_jax.merge_and_unwrap`), so its module
    paths are the original ones (``encoder.layer.0.attention.self.query``, no ``.base``), and handed to
    ``to_hf_state_dict`` (default: :func:`lorapro_jax.models.to_hf_state_dict`, which transposes Linear
    kernels to ``(out, in)`` and renames ``kernel``/``scale``/``embedding`` to ``weight``). ``model``
    itself is not modified.

    Args:
      model: a (LoRA-adapted) model whose paths mirror the HF module names.
      out_file: if given, write the state dict there (``model.safetensors`` layout, ``format: pt``).
      to_hf_state_dict: ``f(unwrapped_model) -> {hf_name: array}``.
      dtype: cast every array to this dtype before returning / saving.

    Returns:
      ``{hf_name: np.ndarray}``.
    """
    check_module(model, "model", "export_merged_hf", "export_merged_hf(model, out_file)")
    if out_file is not None:
        check_path(out_file, "out_file", "export_merged_hf", "export_merged_hf(model, out_file)")
    fn = to_hf_state_dict or _default_to_hf()
    merged = merge_and_unwrap(nnx.clone(model))
    sd = {k: np.asarray(jax.device_get(v)) for k, v in fn(merged).items()}
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    if out_file is not None:
        save_file(sd, Path(out_file), {"format": "pt"})
    return sd
