"""Load Hugging Face safetensors checkpoints into the NNX models and export them back.

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

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import HFModule

__all__ = [
    "MODEL_REGISTRY",
    "CheckpointKeyError",
    "hf_param_names",
    "hf_stacked_prefixes",
    "load_pretrained",
    "read_safetensors",
    "resolve_model_class",
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


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def _registry() -> dict[str, type[HFModule]]:
    from . import bert, llama, t5

    classes: list[type[HFModule]] = [
        bert.BertModel,
        bert.BertForSequenceClassification,
        t5.T5Model,
        t5.T5ForConditionalGeneration,
        t5.T5EncoderModel,
        t5.T5EncoderForSequenceClassification,
        llama.LlamaModel,
        llama.LlamaForCausalLM,
        llama.LlamaForSequenceClassification,
    ]
    reg: dict[str, type[HFModule]] = {c.__name__: c for c in classes}
    # model_type -> default class
    reg.update({"bert": bert.BertModel, "t5": t5.T5ForConditionalGeneration, "llama": llama.LlamaForCausalLM})
    return reg


class _LazyRegistry(Mapping):
    """Name -> model class; built on first access to avoid import cycles."""

    def _d(self) -> dict[str, type[HFModule]]:
        if not hasattr(self, "_cache"):
            self._cache = _registry()
        return self._cache

    def __getitem__(self, k: str) -> type[HFModule]:
        return self._d()[k]

    def __iter__(self):
        return iter(self._d())

    def __len__(self) -> int:
        return len(self._d())


#: Names accepted by :func:`load_pretrained`: every class name plus ``"bert"``, ``"t5"``,
#: ``"llama"`` (default class of that ``model_type``).
MODEL_REGISTRY: Mapping[str, type[HFModule]] = _LazyRegistry()


def resolve_model_class(model_cls_or_name: type[HFModule] | str | None, config: Any) -> type[HFModule]:
    """Resolve a class, a registry name, ``"auto"`` or ``None`` against a config.

    ``"auto"``/``None`` use ``config.architectures[0]`` when it is a registered class name, else
    the default class for ``config.model_type``.

    Raises:
        ValueError: unknown name, or the class is for a different ``model_type`` than the config.
    """
    if model_cls_or_name is None or model_cls_or_name == "auto":
        archs = list(getattr(config, "architectures", None) or [])
        name = next((a for a in archs if a in MODEL_REGISTRY), None) or config.model_type
        if name not in MODEL_REGISTRY:
            raise ValueError(f"No NNX model for model_type={config.model_type!r}; known: {sorted(MODEL_REGISTRY)}")
        cls = MODEL_REGISTRY[name]
    elif isinstance(model_cls_or_name, str):
        if model_cls_or_name not in MODEL_REGISTRY:
            raise ValueError(f"Unknown model {model_cls_or_name!r}; known: {sorted(MODEL_REGISTRY)}")
        cls = MODEL_REGISTRY[model_cls_or_name]
    else:
        cls = model_cls_or_name
    if cls.model_type and getattr(config, "model_type", cls.model_type) != cls.model_type:
        raise ValueError(
            f"{cls.__name__} expects model_type={cls.model_type!r} but the config has "
            f"model_type={config.model_type!r}"
        )
    return cls


# ----------------------------------------------------------------------------------------------
# safetensors reading
# ----------------------------------------------------------------------------------------------

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _st_dtype(code: str) -> Any:
    if code in _ST_DTYPES:
        return _ST_DTYPES[code]
    import ml_dtypes  # shipped with jax

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if code in extra:
        return extra[code]
    raise TypeError(f"Unsupported safetensors dtype {code}")


def _read_raw(file: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Read tensors straight from the safetensors byte layout (used for bf16/fp8, which
    ``safe_open(framework="numpy")`` cannot represent)."""
    out: dict[str, np.ndarray] = {}
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for k in keys:
            info = header[k]
            start, end = info["data_offsets"]
            f.seek(base + start)
            buf = f.read(end - start)
            out[k] = np.frombuffer(buf, dtype=_st_dtype(info["dtype"])).reshape(info["shape"]).copy()
    return out


def _read_file(file: Path) -> dict[str, np.ndarray]:
    from ..integrity import read_safetensors_header

    read_safetensors_header(file)  # names the file if it is truncated or not safetensors
    return _read_checked(file)


def _read_checked(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    from safetensors import SafetensorError

    from ..errors import CorruptFileError
    from ..integrity import SAFETENSORS_EXPECTED

    out: dict[str, np.ndarray] = {}
    fallback: list[str] = []
    try:
        with safe_open(str(file), framework="numpy") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
                try:
                    out[k] = f.get_tensor(k)
                except TypeError:  # bfloat16 etc. have no numpy dtype
                    fallback.append(k)
    except SafetensorError as e:
        raise CorruptFileError(file, SAFETENSORS_EXPECTED, f"SafetensorError: {e}") from e
    if fallback:
        out.update(_read_raw(file, fallback))
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a (possibly sharded) safetensors checkpoint into ``{hf_name: np.ndarray}``.

    Args:
        path: a directory containing ``model.safetensors`` or ``model.safetensors.index.json``
            (sharded: every shard named in ``weight_map`` is read), or a single ``.safetensors``
            file.

    Returns:
        HF-layout arrays (``nn.Linear`` weights are ``(out, in)``). bfloat16 tensors come back
        as ``ml_dtypes.bfloat16`` arrays.

    Raises:
        FileNotFoundError: no safetensors weights found.
    """
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _read_sharded(path)
        return _read_file(path)
    index = path / SAFE_WEIGHTS_INDEX_NAME
    single = path / SAFE_WEIGHTS_NAME
    if single.is_file():
        return _read_file(single)
    if index.is_file():
        return _read_sharded(index)
    raise FileNotFoundError(
        f"No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path} (only safetensors checkpoints are supported)"
    )


def _read_sharded(index: Path) -> dict[str, np.ndarray]:
    from ..integrity import read_json, require

    expected = 'a safetensors index: {"weight_map": {tensor name: shard file name}}'
    doc = read_json(index, expected)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    require(isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()), index, expected,
            "no weight_map of tensor name -> shard file name")
    require(all(Path(v).name == v for v in weight_map.values()), index, expected, "a shard name is a path, not a file name")
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise FileNotFoundError(f"{index.parent / shard}: shard listed in {index} does not exist")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _read_file(index.parent / shard)
        wanted = {k for k, v in weight_map.items() if v == shard}
        missing = wanted - tensors.keys()
        if missing:
            raise CheckpointKeyError(f"Shard {shard} lacks keys listed in {index.name}: {sorted(missing)}")
        out.update(tensors)
    return out


# ----------------------------------------------------------------------------------------------
# Name mapping
# ----------------------------------------------------------------------------------------------


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
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model, ignore_unknown=ignore_unknown), str(directory / SAFE_WEIGHTS_NAME),
              metadata={"format": "pt"})
    config = config if config is not None else getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(str(directory))
    return directory


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _compile(patterns: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


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


def _matches(key: str, pats: list[re.Pattern[str]]) -> bool:
    return any(p.search(key) for p in pats)


def _normalise_prefix(
    tensors: dict[str, np.ndarray], expected: set[str], prefix: str | None
) -> dict[str, np.ndarray]:
    """Add or strip ``base_model_prefix`` so that base checkpoints load into task models and
    task checkpoints into base models (HF's rule)."""
    if not prefix:
        return tensors
    p = prefix + "."
    model_nests = any(k.startswith(p) for k in expected)
    ckpt_nests = any(k.startswith(p) for k in tensors)
    if model_nests and not ckpt_nests:
        return {(p + k if (p + k) in expected else k): v for k, v in tensors.items()}
    if ckpt_nests and not model_nests:
        return {(k.removeprefix(p)): v for k, v in tensors.items()}
    return tensors


def _fresh_rng_state(others: list[tuple[tuple[Any, ...], Any]], rngs: nnx.Rngs) -> dict[tuple[Any, ...], Any]:
    """Concrete values for abstract dropout RNG variables: independent keys split from the
    ``dropout`` (else ``default``) stream of ``rngs`` and zero counters."""
    key_paths = [p for p, v in others if isinstance(v, nnx.RngKey)]
    out: dict[tuple[Any, ...], Any] = {}
    if key_paths:
        stream = "dropout" if "dropout" in rngs else "default"
        keys = jax.random.split(rngs[stream](), len(key_paths))
        shapes = {p: tuple(v.shape) for p, v in others}
        # A stacked (scan-over-layers) dropout stream holds one key per layer.
        out.update({p: jax.random.split(keys[i], shapes[p]) if shapes[p] else keys[i] for i, p in enumerate(key_paths)})
    for p, v in others:
        if isinstance(v, nnx.RngCount):
            out[p] = jnp.zeros(v.shape, v.dtype)
    return out


def _init_missing(
    model: HFModule,
    missing: list[tuple[tuple[Any, ...], bool]],
    flat_abs: dict[tuple[Any, ...], Any],
    rngs: nnx.Rngs,
) -> dict[tuple[Any, ...], Any]:
    """HF ``_init_weights``-style values for parameters absent from the checkpoint: kernels and
    embeddings ~ N(0, ``model.hf_init_std()``), biases 0, norm scales 1."""
    out: dict[tuple[Any, ...], Any] = {}
    if not missing:
        return out
    std = model.hf_init_std()
    stream = "params" if "params" in rngs else "default"
    for path, _ in missing:
        var = flat_abs[path]
        leaf = str(path[-1])
        if leaf in ("kernel", "embedding"):
            out[path] = (std * jax.random.normal(rngs[stream](), var.shape, jnp.float32)).astype(var.dtype)
        elif leaf == "bias":
            out[path] = jnp.zeros(var.shape, var.dtype)
        else:  # LayerNorm scale / RMSNorm weight
            out[path] = jnp.ones(var.shape, var.dtype)
    return out


def load_pretrained(
    model_cls_or_name: type[HFModule] | str | None,
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    rngs: nnx.Rngs | None = None,
    config: Any | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    allow_missing: str | Iterable[str] | None = None,
    allow_unexpected: str | Iterable[str] | None = None,
    **model_kwargs: Any,
) -> HFModule:
    """Build an NNX model from a local Hugging Face checkpoint directory.

    Steps: read ``config.json`` with ``transformers.AutoConfig`` (local files only), build the
    model abstractly (``nnx.eval_shape``, no random init of loaded weights), read the
    safetensors weights (single file or sharded index), map HF names onto NNX paths (Linear
    weights transposed to ``(in, out)``, cast to ``param_dtype``), check for missing, unexpected
    and mis-shaped keys, and initialise only the parameters that are legitimately missing
    (e.g. a new classification head). No random initialisation of loaded weights ever runs.

    Args:
        model_cls_or_name: a model class, a name from :data:`MODEL_REGISTRY` (class name or
            ``"bert"``/``"t5"``/``"llama"``), or ``None``/``"auto"`` to use
            ``config.architectures``.
        path: checkpoint directory (``config.json`` + ``model.safetensors`` or
            ``model.safetensors.index.json``), or a GGUF checkpoint: a ``.gguf`` file or a folder
            holding one (config from its metadata, weights dequantized to float32, see
            :mod:`lorapro_jax.models.gguf`).
        dtype: computation dtype.
        param_dtype: parameter dtype; defaults to ``dtype``.
        rngs: RNGs used for newly initialised parameters and dropout (default ``nnx.Rngs(0)``,
            i.e. dropout off until ``model.train()``; pass ``nnx.Rngs(params=0, dropout=1)`` to
            have dropout on by default).
        config: a ready ``transformers`` config (skips reading ``config.json``).
        config_overrides: keyword overrides for ``AutoConfig.from_pretrained`` (e.g.
            ``{"num_labels": 3}``).
        allow_missing: regex(es) (``re.search`` on the HF key) of parameters that may be absent
            from the checkpoint. They are initialised like HF's ``_init_weights`` (kernels and
            embeddings ~ N(0, ``model.hf_init_std()``), biases 0, norm scales 1) from the
            ``params`` (else ``default``) stream of ``rngs``. Task heads of the class
            (``classifier``, ``score``) are always allowed.
        allow_unexpected: regex(es) of checkpoint keys that may be left unused.
        **model_kwargs: forwarded to the model constructor (``pooling=``, ``num_labels=``,
            ``tie_word_embeddings=`` ...).

    Returns:
        The model with checkpoint weights.

    Raises:
        CheckpointKeyError: missing keys not covered by ``allow_missing``, unexpected keys not
            covered by ``allow_unexpected``, or shape mismatches; the message lists the keys.
    """
    from .gguf import find_gguf, gguf_config, read_gguf_tensors

    path = Path(path)
    gguf_file = find_gguf(path)  # a .gguf file (or a folder holding one) is read by models.gguf
    if config is None and gguf_file is not None:
        config = gguf_config(gguf_file, **dict(config_overrides or {}))
    elif config is None:
        from transformers import AutoConfig

        from ..integrity import read_json, require

        cfg_file = path / "config.json"
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory; expected a local Hugging Face checkpoint directory")
        expected = "a Hugging Face config.json (a JSON object with a model_type)"
        doc = read_json(cfg_file, expected)
        require(isinstance(doc, dict) and isinstance(doc.get("model_type"), str), cfg_file, expected, "no model_type")
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, **dict(config_overrides or {}))
    elif config_overrides:
        for k, v in config_overrides.items():
            setattr(config, k, v)
    cls = resolve_model_class(model_cls_or_name, config)
    param_dtype = dtype if param_dtype is None else param_dtype
    rngs = nnx.Rngs(0) if rngs is None else rngs

    tensors = read_gguf_tensors(gguf_file) if gguf_file is not None else read_safetensors(path)
    prepare = getattr(cls, "hf_prepare_kwargs", None)
    if prepare is not None:
        for k, v in prepare(config, tensors).items():
            model_kwargs.setdefault(k, v)

    def build(r: nnx.Rngs) -> HFModule:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=r, **model_kwargs)

    abstract = nnx.eval_shape(lambda: build(nnx.clone(rngs)))
    names = hf_param_names(abstract)
    expected = set(names)
    stacked = hf_stacked_prefixes(abstract)
    tensors = _normalise_prefix(tensors, _per_layer_names(expected, stacked), cls.base_model_prefix)
    tensors = _stack_layers(tensors, expected, stacked, path)

    # Tied aliases: accept a duplicate of its source; use it as the source if the source is absent.
    for alias, src in abstract.hf_tied_aliases_for_instance().items():
        if alias not in tensors:
            continue
        if src not in tensors:
            tensors[src] = tensors.pop(alias)
        elif tensors[alias].shape == tensors[src].shape and np.array_equal(tensors[alias], tensors[src]):
            del tensors[alias]

    ignore = _compile(abstract.hf_ignore_unexpected_for_instance()) + _compile(allow_unexpected)
    ok_missing = _compile(cls.hf_default_allow_missing) + _compile(allow_missing)

    flat_abs = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    missing = sorted(k for k in expected if k not in tensors)
    bad_missing = [k for k in missing if not _matches(k, ok_missing)]
    unexpected = sorted(k for k in tensors if k not in expected and not _matches(k, ignore))
    mismatched = []
    for key in sorted(expected & tensors.keys()):
        p, transpose = names[key]
        want = tuple(flat_abs[p].shape)
        got = tuple(_swap_last(tensors[key]).shape if transpose else tensors[key].shape)
        if want != got:
            mismatched.append(f"{key}: checkpoint {tuple(tensors[key].shape)} vs model {want} (after transpose: {transpose})")
    if bad_missing or unexpected or mismatched:
        parts = [f"Cannot load {path} into {cls.__name__}:"]
        if bad_missing:
            parts.append(f"  missing keys ({len(bad_missing)}): {bad_missing}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            parts.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
        parts.append("Use allow_missing=/allow_unexpected= regexes for keys that are expected to differ.")
        raise CheckpointKeyError("\n".join(parts))

    loaded_paths = {names[k][0] for k in expected if k in tensors}
    model = abstract
    others = list(nnx.to_flat_state(nnx.state(abstract, nnx.Not(nnx.Param))))
    only_rng_state = all(isinstance(v, (nnx.RngKey, nnx.RngCount)) for _, v in others)
    if only_rng_state:
        # Every non-parameter variable is dropout RNG state: fill it directly, and initialise the
        # (allowed) missing parameters HF-style -- no second trace of the constructor needed.
        fresh = _fresh_rng_state(others, rngs)
        fresh.update(_init_missing(abstract, [names[k] for k in missing], flat_abs, rngs))
        nnx.update(model, nnx.from_flat_state(fresh))
    else:
        def keep(path: tuple[Any, ...], x: Any) -> bool:
            return not (isinstance(x, nnx.Param) and tuple(path) in loaded_paths)

        # Unknown extra state: create everything not coming from the checkpoint for real inside
        # jit (XLA drops the random init of the parameters that the checkpoint overwrites).
        rest = nnx.jit(lambda r: nnx.state(build(r), keep))(rngs)
        nnx.update(model, rest)
    loaded = {}
    for key in expected & tensors.keys():
        p, transpose = names[key]
        arr = _swap_last(tensors[key]) if transpose else tensors[key]
        loaded[p] = jnp.asarray(arr, dtype=flat_abs[p].dtype)
    nnx.update(model, nnx.from_flat_state(loaded))
    return model
