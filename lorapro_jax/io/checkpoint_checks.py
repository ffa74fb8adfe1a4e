"""Validation of what :mod:`lorapro_jax.checkpoint` reads back, before anything is written to a target.

A restore reads the JSON metadata and every array group into fresh arrays, checks them here (metadata
schema, every recorded leaf present with its recorded shape and dtype, the fingerprints recorded at save
time, see :mod:`lorapro_jax.io.integrity`) and only then writes them into the model / optimizer. Every
failure is a :class:`~lorapro_jax.errors.CorruptFileError` naming the file or directory and what was
expected there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import CorruptFileError
from .integrity import fingerprints, require

__all__ = ["load_json_item", "restore_item", "validate_meta", "verify_arrays"]


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {"/".join(prefix): tree}


def load_json_item(read: Callable[[], Any], directory: str, item: str, expected: str) -> Any:
    """Reads the orbax JSON item ``item`` of the checkpoint ``directory`` through ``read()``."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory; expected {expected}")
    file = os.path.join(directory, item, "metadata")
    require(os.path.isfile(file), directory, expected, f"its {item}/metadata file is missing")
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - orbax / json raise many types; all mean "unreadable"
        raise CorruptFileError(file, expected, f"{type(e).__name__}: {e}") from e


def restore_item(read: Callable[[], Any], directory: str, item: str, expected: str) -> Any:
    """Reads the orbax array item ``item`` of ``directory`` through ``read()``; errors name the item's folder."""
    where = os.path.join(directory, item)
    require(os.path.isdir(where), directory, expected, f"its array folder {item!r} is missing")
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError / RuntimeError / OSError
        raise CorruptFileError(where, expected, f"orbax could not read it: {type(e).__name__}: {str(e)[:300]}") from e


def _is_spec(v: Any) -> bool:
    return (
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
        and all(isinstance(d, int) and d >= 0 for d in v[0]) and isinstance(v[1], str)
    )


def _check_specs(specs: Any, file: str, expected: str, what: str) -> None:
    require(isinstance(specs, dict), file, expected, f"{what} is not a mapping")
    bad = sorted(k for k, v in specs.items() if not _is_spec(v))
    require(not bad, file, expected, f"{what} has malformed [shape, dtype] entries: {bad[:5]}")


def _check_layers(layers: Any, file: str, expected: str) -> None:
    require(isinstance(layers, dict), file, expected, "'layers' is not a mapping")
    for path, info in layers.items():
        ok = (
            isinstance(info, dict) and isinstance(info.get("rank"), int)
            and isinstance(info.get("scale"), (int, float)) and not isinstance(info.get("scale"), bool)
            and isinstance(info.get("in_shape"), list) and isinstance(info.get("out_shape"), list)
        )
        require(ok, file, expected, f"layer {path!r} lacks a valid rank / scale / in_shape / out_shape")


def validate_meta(meta: Any, file: str, fmt: str, version: int, expected: str, groups: tuple[str, ...] | None) -> None:
    """Schema of a checkpoint's JSON metadata (``format``, ``version``, ``layers``, leaf specs, fingerprints).

    ``groups=None``: an adapter checkpoint (``leaves`` / ``fingerprints`` at the top level); else the
    training checkpoint's ``groups`` / ``fingerprints`` mappings from group name to leaf specs.
    """
    require(isinstance(meta, dict), file, expected, f"the metadata is a {type(meta).__name__}, not a JSON object")
    require(meta.get("format") == fmt, file, expected, f"format is {meta.get('format')!r}, not {fmt!r}")
    v = meta.get("version")
    require(isinstance(v, int) and 1 <= v <= version, file, expected,
            f"version {v!r} is not one this lorapro_jax reads (1..{version})")
    _check_layers(meta.get("layers"), file, expected)
    if groups is None:
        _check_specs(meta.get("leaves"), file, expected, "'leaves'")
        named = {"": meta["leaves"]}
        fps = {"": meta.get("fingerprints")}
    else:
        require(isinstance(meta.get("groups"), dict), file, expected, "'groups' is not a mapping")
        named = meta["groups"]
        for g, specs in named.items():
            _check_specs(specs, file, expected, f"group {g!r}")
        fps = meta.get("fingerprints") or {}
        require(isinstance(fps, dict), file, expected, "'fingerprints' is not a mapping")
        fps = {g: fps.get(g) for g in named}
    for g, specs in named.items():
        fp = fps.get(g)
        if fp is None:  # checkpoints written before fingerprints existed
            continue
        ok = isinstance(fp, dict) and set(fp) == set(specs) and all(isinstance(x, int) for x in fp.values())
        require(ok, file, expected, f"fingerprints{' of ' + repr(g) if g else ''} do not cover the recorded leaves")


def verify_arrays(restored: Any, specs: dict[str, list], fps: dict[str, int] | None, where: str, expected: str) -> None:
    """Every recorded leaf restored with its recorded shape and dtype and, when recorded, fingerprint."""
    flat = _flatten(restored)
    missing = sorted(set(specs) - set(flat))
    require(not missing, where, expected, f"arrays missing: {missing[:5]}")
    wrong = []
    for k, (shape, dtype) in specs.items():
        leaf = flat[k]
        got_shape, got_dtype = tuple(np.shape(leaf)), str(np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype)))
        if got_shape != tuple(shape) or got_dtype != dtype:
            wrong.append(f"{k}: read {got_shape} {got_dtype}, recorded {tuple(shape)} {dtype}")
    require(not wrong, where, expected, "arrays of the wrong shape or dtype: " + "; ".join(wrong[:5]))
    if fps:
        got = fingerprints({k: flat[k] for k in specs})
        bad = sorted(k for k in specs if got[k] != fps[k])
        require(not bad, where, expected, f"the data of {bad[:5]} does not match the fingerprints recorded at save time")
