"""PEFT's ``modules_to_save``: modules trained in full (e.g. a classifier head) inside a LoRA adapter.

PEFT saves such a module whole, as ``base_model.model.<name>.<param>`` in torch layout (a Linear's
``weight`` is ``(out, in)``), and lists it in ``adapter_config.json``'s ``modules_to_save``; a module
whose full name ends with an entry is the one meant (PEFT's ``key.endswith(entry)`` rule). The
parameter names come from :func:`lorapro_jax.models.hf_param_names`. Used by :mod:`lorapro_jax.export`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from .._utils import norm_prefix, path_string
from ..lora.nnx_lora import lora_layers

__all__ = ["modules_to_save_state_dict", "modules_to_save_targets", "saved_modules"]


def _hf_param_names() -> Callable[..., dict[str, tuple[tuple[Any, ...], bool]]]:
    try:
        from ..models import hf_param_names
    except ImportError as e:  # pragma: no cover - depends on the optional models package
        raise ImportError("modules_to_save needs lorapro_jax.models.hf_param_names.") from e
    return hf_param_names


def saved_modules(model: nnx.Module, paths: Sequence[str], who: str) -> dict[str, nnx.Module]:
    """``{path: module}`` for ``modules_to_save``; each must exist and hold no LoRA layer."""
    if isinstance(paths, str):
        raise TypeError(f"{who}: modules_to_save must be a list of module paths, got the string {paths!r}.")
    modules = {path_string(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}
    layers = lora_layers(model)
    out = {}
    for path in paths:
        if path not in modules or not path:
            raise ValueError(f"{who}: modules_to_save entry {path!r} is not a module path of the model.")
        inner = [lp for lp in layers if lp == path or lp.startswith(path + ".")]
        if inner:
            raise ValueError(f"{who}: modules_to_save entry {path!r} holds LoRA layers {inner}; PEFT saves whole modules.")
        out[path] = modules[path]
    return out


def modules_to_save_state_dict(
    model: nnx.Module, modules_to_save: Sequence[str], *, prefix: str = "", dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Full weights of ``modules_to_save`` (e.g. a classifier head) under PEFT's adapter-file names.

    PEFT writes a module it trains in full as ``base_model.model.<name>.<param>`` in torch layout (a
    Linear's ``weight`` is ``(out, in)``); :func:`lorapro_jax.models.hf_param_names` gives the names.
    """
    prefix = norm_prefix(prefix)
    hf_names = _hf_param_names()
    out = {}
    for path, module in saved_modules(model, modules_to_save, "modules_to_save_state_dict").items():
        flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
        for key, (vpath, transpose) in hf_names(module).items():
            arr = np.asarray(jax.device_get(flat[vpath][...]))
            arr = np.ascontiguousarray(arr.T if transpose else arr)
            out[f"base_model.model.{prefix}{path}.{key}"] = arr.astype(dtype) if dtype is not None else arr
    return out


def modules_to_save_targets(
    model: nnx.Module, names: Sequence[str], prefix: str
) -> dict[str, tuple[str, nnx.Variable, bool]]:
    """``{file key: (module path, variable, transpose)}`` for the modules PEFT's ``modules_to_save`` names.

    PEFT's rule: a module whose full name ends with an entry is saved whole (outermost match wins).
    """
    hf_names = _hf_param_names()
    layers = lora_layers(model)
    chosen: list[tuple[str, nnx.Module]] = []
    candidates = [(path_string(p), n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module) and p]
    for path, module in sorted(candidates, key=lambda t: len(t[0])):
        if not any((prefix + path).endswith(e) for e in names):
            continue
        if any(path.startswith(c + ".") for c, _ in chosen):
            continue
        inner = [lp for lp in layers if lp == path or lp.startswith(path + ".")]
        if inner:
            raise ValueError(
                f"load_peft_adapter: module {prefix + path!r} is in the adapter's modules_to_save {list(names)} "
                f"but holds LoRA layers {inner} here."
            )
        chosen.append((path, module))
    out = {}
    for path, module in chosen:
        variables = {tuple(str(k) for k in p): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
        for key, (vpath, transpose) in hf_names(module).items():
            out[f"base_model.model.{prefix}{path}.{key}"] = (path, variables[tuple(str(k) for k in vpath)], transpose)
    return out
