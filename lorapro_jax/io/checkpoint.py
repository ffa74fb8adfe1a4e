"""Orbax checkpoints for LoRA fine-tuning: adapters alone, and the storage format both checkpoint kinds share.

Two entry points (the second in :mod:`lorapro_jax.io.train_checkpoint`):

* :func:`save_adapters` / :func:`restore_adapters`: only the LoRA state of a model — every
  :class:`~lorapro_jax.lora.nnx_lora.LoRAParam` (its :class:`~lorapro_jax.lora.pair.LoraPair` is
  stored as ``{"a": (*in, r), "b": (r, *out)}``, Flax layout) plus the rank-allocation state
  (:class:`LoRAGate` ``(r,)``, :class:`LoRAMask` like ``a``, :class:`LoRAStat`), with JSON metadata
  (per layer: rank, scale, kernel shapes; the :class:`~lorapro_jax.lora.config.LoraConfig` if given).
* :class:`TrainCheckpointer`: an ``orbax.checkpoint.CheckpointManager`` that saves and restores
  everything a training run needs to continue bit for bit — the trainable variables (the
  optimizer's ``wrt`` filter: adapters and e.g. a classifier head), the LoRA gates/masks/statistics,
  the model's RNG streams (dropout), the whole ``nnx.Optimizer`` state (step count and ``opt_state``,
  e.g. LoRA-Pro's full-size Adam moments ``(*in, *out)`` per pair), an optional extra ``nnx.Rngs``,
  and a JSON ``data_state`` (e.g. ``{"epoch": 1, "index": 17}``).

Storage format: every group of variables is written as a plain nested dict of arrays whose keys are
the NNX path components (``{"encoder": {"layer": {"0": ... {"query": {"lora": {"a": .., "b": ..}}}}}}``),
so a checkpoint never depends on pickled Python classes. Typed PRNG keys are stored as their raw
``jax.random.key_data``.

Restoring always goes INTO an existing model / optimizer (concrete, or abstract from
``nnx.eval_shape``): its structure, shapes, dtypes and shardings are the restore template, so
restored arrays land with the target's sharding. A checkpoint that does not fit the target (missing
or unexpected variables, other shapes, other LoRA ranks or scales) raises a ``ValueError`` naming the
offending paths before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .._utils import fit_report, key_name
from .checkpoint_checks import load_json_item, restore_item, validate_meta, verify_arrays
from ..errors import CorruptFileError, check_config, check_module, check_path
from .integrity import fingerprints
from ..lora.config import LoraConfig
from ..lora.nnx_lora import LoRAGate, LoRAMask, LoRAParam, LoRAStat, lora_layers

__all__ = [
    "ADAPTER_FILTER",
    "read_adapter_metadata",
    "restore_adapters",
    "save_adapters",
]

FORMAT_VERSION = 1
_ADAPTERS_EXPECTED = "a lorapro_jax adapter checkpoint written by save_adapters"
_log = logging.getLogger("lorapro_jax.checkpoint")  # the documented logger name

#: The LoRA variables saved by :func:`save_adapters`: factors, gates, masks and statistics.
ADAPTER_FILTER = nnx.Any(LoRAParam, LoRAGate, LoRAMask, LoRAStat)

Path = tuple[str, ...]


# -- state <-> plain nested dicts ----------------------------------------------------------------------
def _is_prng_key(x: Any) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def _flat_leaves(state: nnx.State) -> list[tuple[Path, nnx.Variable, Path, Any]]:
    """``[(full_path, variable, sub_path, leaf)]`` for every array leaf of every Variable in ``state``.

    ``sub_path`` addresses the leaf inside the Variable's value (``("a",)`` / ``("b",)`` for a
    :class:`LoraPair`, ``()`` for a plain array).
    """
    out = []
    for vpath, var in nnx.to_flat_state(state):
        value = var.get_value()
        sub, _ = jax.tree_util.tree_flatten_with_path(value)
        for kp, leaf in sub:
            sp = tuple(key_name(k) for k in kp)
            out.append((tuple(str(p) for p in vpath) + sp, var, sp, leaf))
    return out


def _storable(x: Any) -> Any:
    if _is_prng_key(x):
        return jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    if isinstance(x, (bool, int, float)):
        return np.asarray(x)
    raise TypeError(f"cannot checkpoint a leaf of type {type(x).__name__}: {x!r}")


def _key_impl(key: Any) -> Any:
    """The PRNG implementation of a (possibly abstract) typed key array."""
    found = []

    def probe(k):
        found.append(jax.random.key_impl(k))
        return jnp.zeros(())

    jax.eval_shape(probe, key)
    return found[0]


def _template_leaf(x: Any) -> jax.ShapeDtypeStruct:
    """Restore template (shape, dtype, sharding) of one target leaf, in its stored form."""
    sharding = getattr(x, "sharding", None)
    if _is_prng_key(x):
        sds = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


def _nest(items: Iterable[tuple[Path, Any]]) -> dict:
    tree: dict = {}
    for path, value in items:
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _lookup(tree: dict, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _leaf_specs(state: nnx.State) -> dict[str, list]:
    """``{"a/b/c": [shape, dtype]}`` in stored form (for JSON metadata and template checks)."""
    out = {}
    for path, _, _, leaf in _flat_leaves(state):
        t = _template_leaf(leaf)
        out["/".join(path)] = [list(t.shape), str(jnp.dtype(t.dtype))]
    return out


def _to_plain(state: nnx.State) -> dict:
    return _nest((path, _storable(leaf)) for path, _, _, leaf in _flat_leaves(state))


def _template(state: nnx.State, saved: dict[str, list] | None = None) -> dict:
    """Restore template of ``state``; with ``saved`` specs, in the stored dtype (cast on write-back)."""

    def leaf_t(path, leaf):
        t = _template_leaf(leaf)
        if saved is not None:
            t = jax.ShapeDtypeStruct(t.shape, jnp.dtype(saved["/".join(path)][1]), sharding=t.sharding)
        return t

    return _nest((path, leaf_t(path, leaf)) for path, _, _, leaf in _flat_leaves(state))


def _flat_fingerprints(plain: dict) -> dict[str, int]:
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            walk(v, prefix + (k,)) if isinstance(v, dict) else flat.__setitem__("/".join(prefix + (k,)), v)

    walk(plain, ())
    return fingerprints(flat)


_FIT_LABELS = ("missing from the checkpoint", "in the checkpoint but not in the target", "shape mismatch")


def _check_specs(group: str, saved: dict[str, list], target: dict[str, list]) -> None:
    shapes = sorted(
        f"{k}: checkpoint {tuple(saved[k][0])}, target {tuple(target[k][0])}"
        for k in set(saved) & set(target)
        if list(saved[k][0]) != list(target[k][0])
    )
    parts = fit_report(sorted(set(target) - set(saved)), sorted(set(saved) - set(target)), shapes, labels=_FIT_LABELS, counts=False)
    if parts:
        raise ValueError(f"checkpoint group {group!r} does not fit the restore target; " + "; ".join(parts))


def _write_back(target: Any, state: nnx.State, restored: dict) -> None:
    """Writes restored plain arrays into the Variables of ``state`` (taken from ``target``)."""
    by_var: dict[int, tuple[nnx.Variable, list]] = {}
    for path, var, sub, leaf in _flat_leaves(state):
        value = _lookup(restored, path)
        if _is_prng_key(leaf):
            value = jax.random.wrap_key_data(value, impl=_key_impl(leaf))
        elif isinstance(leaf, (bool, int, float)):
            value = type(leaf)(np.asarray(value))
        elif getattr(value, "dtype", None) != getattr(leaf, "dtype", None):
            value = value.astype(leaf.dtype)  # stored dtype -> the target's
        by_var.setdefault(id(var), (var, []))[1].append(value)
    for var, leaves in by_var.values():
        treedef = jax.tree_util.tree_structure(var.get_value())
        var.set_value(jax.tree_util.tree_unflatten(treedef, leaves))
    nnx.update(target, state)


# -- LoRA layer metadata -------------------------------------------------------------------------------
def _layer_metadata(model: nnx.Module) -> dict[str, dict]:
    out = {}
    for path, layer in lora_layers(model).items():
        pair = layer.lora.get_value()
        out[path] = {
            "kind": layer.spec.kind,
            "rank": int(pair.a.shape[-1]),
            "scale": float(pair.scale),
            "in_shape": list(layer.spec.in_shape),
            "out_shape": list(layer.spec.out_shape),
            "stack_shape": list(pair.stack_shape),
            "dtype": str(jnp.dtype(pair.a.dtype)),
            "merged": bool(layer.merged),
        }
    return out


def _check_layers(saved: dict[str, dict], model: nnx.Module) -> None:
    target = _layer_metadata(model)
    errors = []
    for path in sorted(set(saved) & set(target)):
        s, t = saved[path], target[path]
        for field in ("rank", "in_shape", "out_shape", "stack_shape"):
            if s.get(field, []) != t[field]:  # checkpoints before 0.2.0 hold no stack_shape: unstacked
                errors.append(f"{path}: {field} is {s[field]} in the checkpoint but {t[field]} in the target")
        if not math.isclose(s["scale"], t["scale"], rel_tol=1e-12, abs_tol=0.0):
            errors.append(
                f"{path}: LoRA scale is {s['scale']} in the checkpoint but {t['scale']} in the target "
                "(build the target with the same alpha / rslora / rank)"
            )
        if t["merged"]:
            errors.append(f"{path}: the target layer is merged; unmerge it before restoring adapters into it")
    missing = sorted(set(target) - set(saved))
    unexpected = sorted(set(saved) - set(target))
    if missing:
        errors.append(f"LoRA layers of the target not in the checkpoint: {missing}")
    if unexpected:
        errors.append(f"LoRA layers in the checkpoint but not in the target: {unexpected}")
    if errors:
        raise ValueError("LoRA checkpoint does not fit the target model:\n  " + "\n  ".join(errors))


def _config_dict(config: LoraConfig | None) -> dict | None:
    if config is None:
        return None
    d = dataclasses.asdict(config)
    if not isinstance(d["targets"], str):
        d["targets"] = list(d["targets"])
    if d["rank_overrides"] is not None:
        d["rank_overrides"] = [list(x) for x in d["rank_overrides"]]
    return d


def _abspath(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _has_leaves(state: nnx.State) -> bool:
    return bool(_flat_leaves(state))


def _warn_unfinished(directory: str) -> None:
    """Logs every temporary step folder of an interrupted save (orbax then removes them)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if ocp.utils.TMP_DIR_SUFFIX in name:
            _log.warning(
                "removing the unfinished checkpoint %s: its save was interrupted before orbax renamed it into place, "
                "so it was never a checkpoint and is not restored", os.path.join(directory, name)
            )


def _check_targets(who: str, sig: str, model: Any, optimizer: Any, rngs: Any) -> None:
    check_module(model, "model", who, sig)
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(f"{who}: `optimizer` must be an nnx.Optimizer (or None), got {type(optimizer).__name__}. Call it as {sig}.")
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{who}: `rngs` must be an nnx.Rngs (or None), got {type(rngs).__name__}.")


# -- adapters only -------------------------------------------------------------------------------------
def save_adapters(
    path: str | os.PathLike,
    model: nnx.Module,
    *,
    config: LoraConfig | None = None,
    extra: dict | None = None,
    overwrite: bool = True,
) -> str:
    """Saves the LoRA state of ``model`` (factors, gates, masks, statistics) with orbax.

    Args:
      path: checkpoint directory (created; replaced when ``overwrite``).
      model: a model adapted with :func:`~lorapro_jax.apply_lora`.
      config: the :class:`LoraConfig` used, stored in the JSON metadata for reference.
      extra: any JSON-serialisable dict stored alongside (e.g. the base model's name).
      overwrite: replace an existing checkpoint at ``path``.

    Returns:
      The absolute checkpoint path.

    Raises:
      ValueError: ``model`` has no LoRA layers.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import lorapro_jax as lp
      >>> from lorapro_jax.checkpoint import restore_adapters, save_adapters
      >>> config = lp.LoraConfig(rank=2, targets=["layers.0"])
      >>> model = lp.apply_lora(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), config, rngs=nnx.Rngs(1))
      >>> other = lp.apply_lora(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))), config, rngs=nnx.Rngs(2))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     path = save_adapters(os.path.join(d, "adapters"), model, config=config)
      ...     meta = restore_adapters(path, other)
      >>> sorted(meta["layers"]), bool(jnp.array_equal(other.layers[0].pair.a, model.layers[0].pair.a))
      (['layers.0'], True)
    """
    sig = "save_adapters(path, model, config=...)"
    check_path(path, "path", "save_adapters", sig)
    check_module(model, "model", "save_adapters", sig)
    check_config(config, "save_adapters", optional=True)
    layers = _layer_metadata(model)
    if not layers:
        raise ValueError("save_adapters: the model has no LoRA layers (apply_lora first).")
    state = nnx.state(model, ADAPTER_FILTER)
    plain = _to_plain(state)
    meta = {
        "format": "lorapro_jax.adapters",
        "version": FORMAT_VERSION,
        "layers": layers,
        "config": _config_dict(config),
        "leaves": _leaf_specs(state),
        "fingerprints": _flat_fingerprints(plain),
        "extra": extra,
    }
    json.dumps(meta)  # fail early, before anything is written, on non-serialisable extras
    path = _abspath(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(adapters=ocp.args.StandardSave(plain), meta=ocp.args.JsonSave(meta)),
            force=overwrite,
        )
    return path


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an adapter checkpoint (``layers``: rank/scale/shapes per path, ``config``, ...)."""
    check_path(path, "path", "read_adapter_metadata", "read_adapter_metadata(path)")
    path = _abspath(path)

    def read():
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            return ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    meta = load_json_item(read, path, "meta", _ADAPTERS_EXPECTED)
    validate_meta(meta, os.path.join(path, "meta", "metadata"), "lorapro_jax.adapters", FORMAT_VERSION,
                  _ADAPTERS_EXPECTED, groups=None)
    return dict(meta)


def restore_adapters(path: str | os.PathLike, model: nnx.Module) -> dict:
    """Restores LoRA factors, gates, masks and statistics saved by :func:`save_adapters` into ``model``.

    ``model`` (concrete or abstract) must be adapted like the saved one: same LoRA layer paths, ranks,
    scales and optional masks/statistics. Restored arrays take the target's dtypes and shardings.

    Returns:
      The checkpoint's JSON metadata.

    All or nothing: every array is read and checked (recorded shapes, dtypes and fingerprints) before
    any is written into ``model``; after an error ``model`` holds exactly what it held before.

    Raises:
      TypeError: ``path`` / ``model`` swapped or of the wrong type.
      FileNotFoundError: ``path`` does not exist.
      CorruptFileError: a file of the checkpoint is corrupt, truncated, missing or not an adapter
        checkpoint (the message names the file).
      ValueError: the checkpoint does not fit ``model`` (the message names the paths), or a target
        layer is merged.
    """
    sig = "restore_adapters(path, model)"
    check_path(path, "path", "restore_adapters", sig)
    check_module(model, "model", "restore_adapters", sig)
    path = _abspath(path)
    meta = read_adapter_metadata(path)
    _check_layers(meta["layers"], model)
    state = nnx.state(model, ADAPTER_FILTER)
    _check_specs("adapters", meta["leaves"], _leaf_specs(state))
    template = _template(state, meta["leaves"])

    def read():
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            return ckptr.restore(path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(template)))["adapters"]

    restored = restore_item(read, path, "adapters", _ADAPTERS_EXPECTED)
    verify_arrays(restored, meta["leaves"], meta.get("fingerprints"), os.path.join(path, "adapters"), _ADAPTERS_EXPECTED)
    _write_back(model, state, restored)
    return meta
