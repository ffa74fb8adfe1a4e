"""Export LoRA-adapted models: merged weights, and adapters in Hugging Face PEFT's format.

* :func:`export_merged` — every ``nnx.Param`` of the model with the adapters merged into the base
  kernels (``W0 + s * a @ b``, Flax layout), keyed by the dotted path the model would have without
  LoRA (the ``LoRALayer``'s ``.base`` level dropped).
* :func:`export_merged_hf` — the same weights under Hugging Face names and torch layouts (through
  :func:`lorapro_jax.models.to_hf_state_dict`), optionally written as ``model.safetensors``.
* :func:`save_peft_adapter` / :func:`load_peft_adapter` — a PEFT LoRA adapter directory
  (``adapter_model.safetensors`` + ``adapter_config.json``) that ``peft.PeftModel.from_pretrained``
  loads onto the PyTorch base model, and its inverse (also to import adapters trained with PEFT).

PEFT layout (torch, paper notation; ``W0`` is ``(out, in) = (m, n)``)::

    base_model.model.<prefix><module>.lora_A.weight : (r, n)  = paper A = aᵀ
    base_model.model.<prefix><module>.lora_B.weight : (m, r)  = paper B = bᵀ
    W = W0 + scaling * B @ A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

with per-module ``r`` and ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` (PEFT matches a
pattern key ``k`` against a module name ``name`` with ``re.match(rf"(.*\\.)?({k})$", name)``; the
first matching key wins). Gates and masks are folded into A on export (``a * a_mask * gate``), so the
exported adapter is the effective one.

References: Hu et al., "LoRA", arXiv 2106.09685; Kalajdzievski, "rsLoRA", arXiv 2312.03732;
Hugging Face PEFT (adapter file format).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from .._utils import matches_targets, norm_prefix
from ..errors import CorruptFileError, check_config, check_module, check_path
from ..lora.config import LoraConfig
from ..lora.nnx_lora import LoRALayer, LoRAParam, lora_layers, merge_and_unwrap
from ..lora.per_layer import LayerSlice, per_layer_view
from ..lora.pair import lora_scale
from .peft_modules import (
    modules_to_save_state_dict,
    modules_to_save_targets,
    saved_modules,
)

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "export_merged",
    "export_merged_hf",
    "load_peft_adapter",
    "modules_to_save_state_dict",
    "peft_config",
    "peft_module_rank_alpha",
    "peft_state_dict",
    "save_peft_adapter",
]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


# -- merged weights ------------------------------------------------------------------------------------
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
        _save_safetensors(sd, Path(out_file), {"format": "pt"})
    return sd


# -- safetensors I/O (bf16 included) ---------------------------------------------------------------------
_ST_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def _st_dtype(code: str) -> np.dtype:
    for name, c in _ST_CODES.items():
        if c == code:
            return np.dtype(jnp.dtype(name))
    raise TypeError(f"unsupported safetensors dtype {code!r}")


def _save_safetensors(tensors: Mapping[str, np.ndarray], file: Path, metadata: dict[str, str]) -> None:
    """Writes a safetensors file; numpy-native dtypes through ``safetensors.numpy``, bf16 by hand."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if all(v.dtype.name in _ST_CODES and v.dtype.name != "bfloat16" for v in tensors.values()):
        from safetensors.numpy import save_file

        save_file(dict(tensors), str(file), metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for k in sorted(tensors):
        v = tensors[k]
        if v.dtype.name not in _ST_CODES:
            raise TypeError(f"cannot write tensor {k!r} of dtype {v.dtype} to safetensors")
        raw = v.tobytes()
        header[k] = {"dtype": _ST_CODES[v.dtype.name], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for raw in blobs:
            f.write(raw)


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a safetensors file as numpy (bf16 through ``ml_dtypes``)."""
    from .integrity import read_safetensors_header

    header, start_of_data = read_safetensors_header(file)
    with open(file, "rb") as f:
        f.seek(start_of_data)
        data = f.read()
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[k] = np.frombuffer(data[start:end], dtype=_st_dtype(info["dtype"])).reshape(info["shape"]).copy()
    return out


# -- PEFT adapters ----------------------------------------------------------------------------------------
def _exportable(
    model: nnx.Module, allow_flatten: bool, who: str, stacked_prefixes: Mapping[str, int] | None = None
) -> dict[str, LoRALayer | LayerSlice]:
    """``{per-layer module path: layer}``; a stacked layer appears once per layer as a ``LayerSlice``."""
    check_module(model, "model", who, f"{who}(model, ...)")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model has no LoRA layers (apply_lora first).")
    for path, layer in layers.items():
        spec = layer.spec
        if spec.batch_shape:
            raise ValueError(
                f"{who}: LoRA layer {path!r} wraps an nnx.{type(layer.base).__name__} with batch axes "
                f"{spec.batch_shape} (one matrix per batch index); PEFT has no batched Linear to export it to."
            )
        if (len(spec.in_shape) != 1 or len(spec.out_shape) != 1) and not allow_flatten:
            base = type(layer.base).__name__
            raise ValueError(
                f"{who}: LoRA layer {path!r} wraps an nnx.{base} with kernel input axes {spec.in_shape} and "
                f"output axes {spec.out_shape}; PEFT's LoRA adapts 2-D torch nn.Linear weights. Pass "
                f"allow_flatten=True to treat it as an (out, in) = ({spec.m}, {spec.n}) Linear (row-major "
                "flattening of the input axes and of the output axes, in the kernel's axis order), which is "
                "right only if the matching Hugging Face nn.Linear flattens its features the same way."
            )
    return per_layer_view(model, layers, stacked_prefixes, who)


def _peft_matrices(layer: LoRALayer | LayerSlice) -> tuple[Float[np.ndarray, "r n"], Float[np.ndarray, "m r"]]:
    """PEFT ``lora_A.weight`` ``(r, n)`` and ``lora_B.weight`` ``(m, r)`` of a layer, gate and mask folded in."""
    p = layer.effective_pair()
    r = p.a.shape[-1]
    a = np.asarray(jax.device_get(p.a)).reshape(-1, r)  # (n, r)
    b = np.asarray(jax.device_get(p.b)).reshape(r, -1)  # (r, m)
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)


def peft_state_dict(
    model: nnx.Module,
    *,
    prefix: str = "",
    allow_flatten: bool = False,
    dtype: Any = np.float32,
    stacked_prefixes: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The adapter tensors under PEFT's names: ``base_model.model.<prefix><path>.lora_{A,B}.weight``.

    A stacked layer (scan-over-layers model, pair ``a: (L, *in, r)``) writes one pair of tensors per layer
    under the per-layer path ``<stacked prefix>.<i>.<rest>`` (see :mod:`lorapro_jax.lora.per_layer`).

    Args:
      model: a LoRA-adapted model.
      prefix: prepended to every module path (e.g. ``"bert."`` when ``model`` is a bare encoder and the
        PyTorch model is ``BertForSequenceClassification``); a trailing ``"."`` is added if missing.
      allow_flatten: export multi-axis kernels (LinearGeneral / Einsum) as flattened 2-D Linears.
      dtype: dtype of the written tensors (``None``: the LoRA parameter dtype).
      stacked_prefixes: ``{module path: L}`` of the modules that hold stacked layers (e.g.
        ``{"model.layers": 32}``); default: declared by the model's ``hf_stacked()`` methods.

    Returns:
      ``{key: array}``; ``lora_A.weight`` is ``(r, in)``, ``lora_B.weight`` is ``(out, r)``.
    """
    prefix = norm_prefix(prefix)
    out = {}
    for path, layer in _exportable(model, allow_flatten, "peft_state_dict", stacked_prefixes).items():
        a_t, b_t = _peft_matrices(layer)
        if dtype is not None:
            a_t, b_t = a_t.astype(dtype), b_t.astype(dtype)
        out[f"base_model.model.{prefix}{path}.lora_A.weight"] = a_t
        out[f"base_model.model.{prefix}{path}.lora_B.weight"] = b_t
    return out


def _pattern_key(keys: Sequence[str], name: str) -> str | None:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def peft_module_rank_alpha(config: Mapping[str, Any], module_name: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scaling)`` that PEFT gives the module ``module_name`` under ``config``.

    ``module_name`` is the module's name in the base model (``<prefix><path>``).
    """
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rk, ak = _pattern_key(list(rp), module_name), _pattern_key(list(ap), module_name)
    r = int(rp[rk]) if rk is not None else int(config["r"])
    alpha = float(ap[ak]) if ak is not None else float(config["lora_alpha"])
    return r, alpha, lora_scale(alpha, r, bool(config.get("use_rslora", False)))


def _clean(x: float) -> float:
    """Removes float noise (15.999999999999998 -> 16.0) when a short decimal is that close."""
    short = float(f"{x:.10g}")
    return short if math.isclose(short, x, rel_tol=1e-12) else x


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    return _clean(scale * (math.sqrt(r) if rslora else r))


def _scale_ok(alpha: float, r: int, rslora: bool, scale: float) -> bool:
    return math.isclose(lora_scale(alpha, r, rslora), scale, rel_tol=1e-9, abs_tol=0.0)


def peft_config(
    model: nnx.Module,
    *,
    base_model_name_or_path: str | None,
    prefix: str = "",
    task_type: str | None = None,
    config: LoraConfig | None = None,
    use_rslora: bool | None = None,
    target_modules: str | Sequence[str] | None = None,
    allow_flatten: bool = False,
    modules_to_save: Sequence[str] | None = None,
    stacked_prefixes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict that makes PEFT rebuild ``model``'s adapters with the same scales.

    ``r`` / ``lora_alpha`` / ``use_rslora`` / ``lora_dropout`` come from ``config`` when given, else
    ``r`` is the most common rank, ``use_rslora`` the given flag (default ``False``) and ``lora_alpha``
    the most common ``scale * r`` (``scale * sqrt(r)`` with rsLoRA). Layers with another rank get a
    ``rank_pattern`` entry, layers whose scale PEFT would not reproduce an ``alpha_pattern`` entry
    (keys: full module names ``<prefix><path>``). ``target_modules`` defaults to the list of those full
    names. ``modules_to_save`` (module paths of ``model``) is written as ``<prefix><path>``. The result is
    checked by recomputing every module's rank and scale with PEFT's rules.

    Raises:
      ValueError: a layer cannot be exported (see ``allow_flatten``), ``target_modules`` misses an
        adapted module, or ``config`` disagrees with the model's scales in a way no pattern can fix.
    """
    check_config(config, "peft_config", optional=True)
    prefix = norm_prefix(prefix)
    layers = _exportable(model, allow_flatten, "peft_config", stacked_prefixes)
    info = {f"{prefix}{p}": (int(l.pair.rank), float(l.pair.scale)) for p, l in layers.items()}
    if config is not None:
        if use_rslora is not None and use_rslora != config.rslora:
            raise ValueError(f"peft_config: use_rslora={use_rslora} contradicts config.rslora={config.rslora}.")
        rslora, r, alpha, dropout = config.rslora, config.rank, float(config.alpha), float(config.dropout)
    else:
        rslora, dropout = bool(use_rslora), 0.0
        r = collections.Counter(rank for rank, _ in info.values()).most_common(1)[0][0]
        alpha = collections.Counter(_alpha_for(s, rk, rslora) for rk, s in info.values()).most_common(1)[0][0]
    rank_pattern = {name: rk for name, (rk, _) in info.items() if rk != r}
    alpha_pattern = {
        name: _alpha_for(s, rk, rslora) for name, (rk, s) in info.items() if not _scale_ok(alpha, rk, rslora, s)
    }
    names = sorted(info)
    saved = None if modules_to_save is None else [prefix + p for p in saved_modules(model, modules_to_save, "peft_config")]
    if target_modules is None:
        target_modules = names
    else:
        target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        missed = [n for n in names if not matches_targets(target_modules, n)]
        if missed:
            raise ValueError(f"peft_config: target_modules {target_modules!r} do not match the adapted modules {missed}.")
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": saved,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }
    for name, (rk, s) in info.items():  # self-check with PEFT's own matching rules
        pr, _, ps = peft_module_rank_alpha(cfg, name)
        if pr != rk or not math.isclose(ps, s, rel_tol=1e-9):
            raise ValueError(
                f"peft_config: module {name!r} (rank {rk}, scale {s}) would get rank {pr}, scale {ps} in PEFT; "
                "its rank_pattern / alpha_pattern key also matches another module name. Use distinct prefixes."
            )
    return cfg


def save_peft_adapter(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None,
    prefix: str = "",
    task_type: str | None = None,
    config: LoraConfig | None = None,
    use_rslora: bool | None = None,
    target_modules: str | Sequence[str] | None = None,
    dtype: Any = np.float32,
    allow_flatten: bool = False,
    modules_to_save: Sequence[str] | None = None,
    stacked_prefixes: Mapping[str, int] | None = None,
) -> Path:
    """Writes a PEFT LoRA adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``.

    Load it in PyTorch with ``PeftModel.from_pretrained(base_model, out_dir)``. Gates and masks are
    folded into ``lora_A``; the scale of every layer is reproduced through ``r``/``lora_alpha`` and
    ``rank_pattern``/``alpha_pattern`` (see :func:`peft_config`). Only LoRA layers whose kernels are
    2-D (``nnx.Linear``, or LinearGeneral/Einsum with one input and one output axis) are exported
    unless ``allow_flatten``. Modules trained in full (e.g. a classifier head) are written only when
    named in ``modules_to_save``, as PEFT does: their weights under ``base_model.model.<prefix><path>.*``
    (torch layout) and the names in the config's ``modules_to_save``. A ``task_type="SEQ_CLS"`` adapter
    without its head loads in PEFT with the torch model's own (untrained) ``classifier``.

    Args:
      model: a LoRA-adapted model.
      out_dir: output directory (created).
      base_model_name_or_path: the HF base model id/path recorded in the config.
      prefix: module-name prefix in the PyTorch model (e.g. ``"bert."``, ``"model."``).
      task_type: PEFT task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...), or ``None``.
      config: the :class:`LoraConfig` used (sets ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``).
      use_rslora: without ``config``: write ``use_rslora`` (scales are then expressed as ``alpha/sqrt(r)``).
      target_modules: PEFT ``target_modules`` (default: the full names of the adapted modules).
      dtype: tensor dtype (default float32; ``None`` keeps the parameter dtype, bf16 included).
      allow_flatten: see :func:`peft_state_dict`.
      modules_to_save: module paths of ``model`` saved in full (e.g. ``["classifier"]``); they must hold
        no LoRA layer and have Hugging Face parameter names (:func:`lorapro_jax.models.hf_param_names`).
      stacked_prefixes: see :func:`peft_state_dict` (stacked layers are written per layer).

    Returns:
      The output directory.
    """
    sig = "save_peft_adapter(model, out_dir, base_model_name_or_path=...)"
    check_module(model, "model", "save_peft_adapter", sig)
    check_path(out_dir, "out_dir", "save_peft_adapter", sig)
    check_config(config, "save_peft_adapter", optional=True)
    cfg = peft_config(
        model,
        base_model_name_or_path=base_model_name_or_path,
        prefix=prefix,
        task_type=task_type,
        config=config,
        use_rslora=use_rslora,
        target_modules=target_modules,
        allow_flatten=allow_flatten,
        modules_to_save=modules_to_save,
        stacked_prefixes=stacked_prefixes,
    )
    tensors = peft_state_dict(
        model, prefix=prefix, allow_flatten=allow_flatten, dtype=dtype, stacked_prefixes=stacked_prefixes
    )
    if modules_to_save:
        tensors.update(modules_to_save_state_dict(model, modules_to_save, prefix=prefix, dtype=dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_safetensors(tensors, out_dir / PEFT_WEIGHTS_NAME, {"format": "pt"})
    (out_dir / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir


_PEFT_CONFIG_EXPECTED = "a PEFT adapter_config.json: a JSON object with integer r > 0 and numeric lora_alpha"


def _read_peft_config(file: Path) -> dict[str, Any]:
    from .integrity import read_json, require

    cfg = read_json(file, _PEFT_CONFIG_EXPECTED)
    require(isinstance(cfg, dict), file, _PEFT_CONFIG_EXPECTED, f"it holds a JSON {type(cfg).__name__}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    require(isinstance(r, int) and not isinstance(r, bool) and r > 0, file, _PEFT_CONFIG_EXPECTED, f"r is {r!r}")
    require(isinstance(alpha, (int, float)) and not isinstance(alpha, bool), file, _PEFT_CONFIG_EXPECTED,
            f"lora_alpha is {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        require(isinstance(cfg.get(key) or {}, dict), file, _PEFT_CONFIG_EXPECTED, f"{key} is not a mapping")
    require(isinstance(cfg.get("peft_type", "LORA"), str), file, _PEFT_CONFIG_EXPECTED, "peft_type is not a string")
    return cfg


def load_peft_adapter(
    model: nnx.Module,
    adapter_dir: str | os.PathLike,
    *,
    prefix: str = "",
    allow_flatten: bool = False,
    load_modules_to_save: bool = True,
    stacked_prefixes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Loads a PEFT LoRA adapter directory into an adapted ``model`` (in place; inverse of save).

    Every LoRA layer of ``model`` must have its ``lora_A`` / ``lora_B`` in the file and every LoRA
    tensor of the file must have a LoRA layer (``apply_lora`` with the adapter's target modules
    first). Per layer: ``a = lora_Aᵀ``, ``b = lora_Bᵀ`` (reshaped to the kernel's axes), the scale
    PEFT would use (``lora_alpha / r`` or ``/ sqrt(r)``, with ``rank_pattern`` / ``alpha_pattern``);
    the gate and mask are reset to ones (the file's A already has them folded in). A rank other than
    the layer's replaces the layer's factors, gate and mask with the file's rank. The LoRA scale is a
    static part of the parameter tree: create optimizers after loading.

    Modules the adapter saved in full (``modules_to_save``, e.g. PEFT's ``classifier`` of a
    ``SEQ_CLS`` adapter) are loaded into the model's module of the same name (torch layouts
    converted, cast to the parameter's dtype); each such module of the model must be complete in
    the file. Nothing is written unless the whole file fits.

    Args:
      model: a LoRA-adapted model (not merged).
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      prefix: the module-name prefix used when the adapter was saved (e.g. ``"bert."``).
      allow_flatten: accept multi-axis kernels (see :func:`peft_state_dict`).
      load_modules_to_save: ``False`` ignores the ``modules_to_save`` tensors of the file (e.g. to
        load a ``SEQ_CLS`` adapter's LoRA factors into a bare encoder).
      stacked_prefixes: see :func:`peft_state_dict`; a stacked layer reads its ``L`` per-layer entries
        (they must share one rank and one scale, static parts of the stacked pair).

    Returns:
      The adapter config dict.

    Raises:
      ValueError: not a LoRA adapter / unsupported variant (DoRA, embedding LoRA), missing or
        unexpected keys, shape or rank mismatches (the message names the modules).
    """
    sig = "load_peft_adapter(model, adapter_dir)"
    check_module(model, "model", "load_peft_adapter", sig)
    check_path(adapter_dir, "adapter_dir", "load_peft_adapter", sig)
    adapter_dir = Path(adapter_dir)
    cfg = _read_peft_config(adapter_dir / PEFT_CONFIG_NAME)
    if cfg.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"load_peft_adapter: {adapter_dir} holds a {cfg.get('peft_type')} adapter, not LORA.")
    if cfg.get("use_dora"):
        raise ValueError(f"load_peft_adapter: {adapter_dir} is a DoRA adapter (use_dora=true); not supported.")
    tensors = _load_safetensors(adapter_dir / PEFT_WEIGHTS_NAME)
    prefix = norm_prefix(prefix)
    layers = _exportable(model, allow_flatten, "load_peft_adapter", stacked_prefixes)
    saved_names = list(cfg.get("modules_to_save") or [])
    saved = modules_to_save_targets(model, saved_names, prefix) if saved_names and load_modules_to_save else {}
    found: dict[str, dict[str, np.ndarray]] = {}
    unexpected, saved_found = [], {}
    for key, arr in tensors.items():
        m = _PEFT_KEY.match(key)
        if key in saved:
            saved_found[key] = arr
            continue
        if m is None and not load_modules_to_save and any(key.rpartition(".")[0].endswith(e) for e in saved_names):
            continue  # a modules_to_save tensor, deliberately ignored
        if m is None or not m["module"].startswith(prefix) or m["module"][len(prefix) :] not in layers:
            unexpected.append(key)
            continue
        found.setdefault(m["module"][len(prefix) :], {})[m["ab"]] = arr
    missing = [p for p in layers if set(found.get(p, {})) != {"A", "B"}]
    saved_missing = sorted(set(saved) - set(saved_found))
    if unexpected or missing or saved_missing:
        raise ValueError(
            f"load_peft_adapter: {adapter_dir} does not fit the model (prefix {prefix!r}). "
            f"Keys without a LoRA layer or a modules_to_save module ({saved_names}): {sorted(unexpected)}. "
            f"LoRA layers without both lora_A and lora_B: {missing}. "
            f"Parameters of modules_to_save modules missing from the file: {saved_missing}."
        )
    errors, new = [], {}
    for key, arr in saved_found.items():
        path, var, transpose = saved[key]
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != tuple(var.get_value().shape):
            errors.append(f"{key} (modules_to_save {prefix}{path}): {arr.shape} in torch layout, the model has "
                          f"{tuple(var.get_value().shape[::-1] if transpose else var.get_value().shape)}")
    for path, layer in layers.items():
        a_t, b_t = found[path]["A"], found[path]["B"]
        r, _, scale = peft_module_rank_alpha(cfg, prefix + path)
        spec = layer.spec
        if a_t.shape != (r, spec.n) or b_t.shape != (spec.m, r):
            errors.append(
                f"{prefix}{path}: lora_A {a_t.shape}, lora_B {b_t.shape}; expected ({r}, {spec.n}) and "
                f"({spec.m}, {r}) for rank {r} (from the config) and the layer's {spec.m} x {spec.n} weight"
            )
            continue
        new[path] = (a_t, b_t, r, scale)
    if errors:
        raise ValueError("load_peft_adapter: shape mismatch:\n  " + "\n  ".join(errors))
    by_layer = _stack_slices(new, layers, prefix)  # stacked layers: their L per-layer entries, stacked
    merged = [p for p in new if layers[p].merged]
    if merged:  # checked before anything is written: a failed load leaves the model as it was
        raise ValueError(f"load_peft_adapter: LoRA layers {merged} are merged; unmerge them first.")
    nonfinite = sorted(k for k, v in tensors.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
    if nonfinite:
        raise CorruptFileError(adapter_dir / PEFT_WEIGHTS_NAME, "finite LoRA weights", f"NaN or inf in {nonfinite[:5]}")
    for key, arr in saved_found.items():
        _, var, transpose = saved[key]
        old = var.get_value()
        val = jnp.asarray(arr.T if transpose else arr, dtype=old.dtype)
        var.set_value(jax.device_put(val, old.sharding) if getattr(old, "sharding", None) is not None else val)
    for path, (layer, a_t, b_t, r, scale) in by_layer.items():
        old = layer.pair
        spec = layer.spec
        stack = a_t.shape[:-2]  # (L,) for a stacked layer, () otherwise
        a = jnp.asarray(np.swapaxes(a_t, -1, -2).reshape(stack + spec.in_shape + (r,)), dtype=old.a.dtype)
        b = jnp.asarray(np.swapaxes(b_t, -1, -2).reshape(stack + (r,) + spec.out_shape), dtype=old.b.dtype)
        if tuple(old.a.shape) == a.shape and getattr(old.a, "sharding", None) is not None:
            a, b = jax.device_put(a, old.a.sharding), jax.device_put(b, old.b.sharding)
        layer.lora.set_value(old.replace(a=a, b=b, scale=float(scale)))
        layer.gate.set_value(jnp.ones(stack + (r,), layer.gate.get_value().dtype))
        if layer.a_mask is not None:
            layer.a_mask.set_value(jnp.ones(a.shape, layer.a_mask.get_value().dtype))
    return cfg


def _stack_slices(new: dict[str, tuple], views: Mapping[str, Any], prefix: str) -> dict[str, tuple]:
    """``{path: (LoRALayer, lora_A, lora_B, r, scale)}``, the per-layer entries of a stacked layer stacked.

    ``new`` maps per-layer paths to ``(lora_A (r, n), lora_B (m, r), r, scale)``; a stacked layer gets
    ``lora_A (L, r, n)``, ``lora_B (L, m, r)`` from its ``L`` entries, in layer order.
    """
    out: dict[str, tuple] = {}
    groups: dict[str, list[tuple[str, int, tuple]]] = {}
    for name, entry in new.items():
        view = views[name]
        if isinstance(view, LayerSlice):
            groups.setdefault(view.stacked_path, []).append((name, view.index, entry))
        else:
            out[name] = (view, *entry)
    for path, items in groups.items():
        items.sort(key=lambda t: t[1])
        ranks = {(e[2], e[3]) for _, _, e in items}
        if len(ranks) != 1:
            raise ValueError(
                f"load_peft_adapter: the layers of the stacked LoRA layer {path!r} get different ranks / scales "
                f"{sorted(ranks)} from the adapter config (names {prefix}{items[0][0]} ...); a stacked pair has one."
            )
        r, scale = ranks.pop()
        a = np.stack([e[0] for _, _, e in items])
        b = np.stack([e[1] for _, _, e in items])
        out[path] = (views[items[0][0]].layer, a, b, r, scale)
    return out
