"""LoRA adapters in Hugging Face PEFT's format: write, read, and the tensors and config in between.

:func:`save_peft_adapter` / :func:`load_peft_adapter` — a PEFT LoRA adapter directory
(``adapter_model.safetensors`` + ``adapter_config.json``) that ``peft.PeftModel.from_pretrained``
loads onto the PyTorch base model, and its inverse (also to import adapters trained with PEFT).

PEFT layout (torch, paper notation; ``W0`` is ``(out, in) = (m, n)``)::

    base_model.model.<prefix><module>.lora_A.weight : (r, n)  = paper A = aᵀ
    base_model.model.<prefix><module>.lora_B.weight : (m, r)  = paper B = bᵀ
    W = W0 + scaling * B @ A,   scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

with per-module ``r`` and ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` (the rules are in
:mod:`lorapro_jax.io.peft_config`). Gates and masks are folded into A on export (``a * a_mask * gate``),
so the exported adapter is the effective one. Modules trained in full (``modules_to_save``) are in
:mod:`lorapro_jax.io.peft_modules`; trees that hold A and B as separate leaves in
:mod:`lorapro_jax.io.peft_paired`.

References: Hu et al., "LoRA", arXiv 2106.09685; Kalajdzievski, "rsLoRA", arXiv 2312.03732;
Hugging Face PEFT (adapter file format).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
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
from ..lora.nnx_lora import LoRALayer, lora_layers
from ..lora.per_layer import LayerSlice, per_layer_view
from .integrity import read_json, require
from .peft_config import common_rank_alpha, config_dict, peft_module_rank_alpha
from .peft_modules import modules_to_save_state_dict, modules_to_save_targets, saved_modules
from .safetensors import read_file, save_file

__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
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
        r, alpha = common_rank_alpha(info, rslora)
    names = sorted(info)
    saved = None if modules_to_save is None else [prefix + p for p in saved_modules(model, modules_to_save, "peft_config")]
    if target_modules is None:
        target_modules = names
    else:
        target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        missed = [n for n in names if not matches_targets(target_modules, n)]
        if missed:
            raise ValueError(f"peft_config: target_modules {target_modules!r} do not match the adapted modules {missed}.")
    return config_dict(
        info, r=r, alpha=alpha, rslora=rslora, dropout=dropout, target_modules=target_modules,
        modules_to_save=saved, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
        who="peft_config",
    )


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

    Examples:
      >>> import json, tempfile
      >>> import numpy as np
      >>> from flax import nnx
      >>> from safetensors.numpy import load_file
      >>> import lorapro_jax as lp
      >>> from lorapro_jax.export import save_peft_adapter
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc = nnx.Linear(4, 3, rngs=rngs)
      >>> config = lp.LoraConfig(rank=2, alpha=4.0, targets=["fc"])
      >>> model = lp.apply_lora(MLP(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     out = save_peft_adapter(model, d, base_model_name_or_path="my-base", config=config)
      ...     cfg = json.load(open(out / "adapter_config.json"))
      ...     tensors = load_file(str(out / "adapter_model.safetensors"))
      >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
      (2, 4.0, ['fc'])
      >>> {k: v.shape for k, v in sorted(tensors.items())}  # torch layout: lora_A (r, in), lora_B (out, r)
      {'base_model.model.fc.lora_A.weight': (2, 4), 'base_model.model.fc.lora_B.weight': (3, 2)}
      >>> bool(np.array_equal(tensors["base_model.model.fc.lora_A.weight"], np.asarray(model.fc.pair.a).T))
      True
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
    save_file(tensors, out_dir / PEFT_WEIGHTS_NAME, {"format": "pt"})
    (out_dir / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out_dir


_PEFT_CONFIG_EXPECTED = "a PEFT adapter_config.json: a JSON object with integer r > 0 and numeric lora_alpha"


def _read_peft_config(file: Path) -> dict[str, Any]:
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
    tensors = read_file(adapter_dir / PEFT_WEIGHTS_NAME)
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
