"""Integrity checks for what the library reads back: array fingerprints and checked JSON.

* :func:`fingerprints` — a 32-bit fingerprint of every array of a pytree, computed on device in one
  jitted pass (sharded arrays included: it is a reduction). :mod:`lorapro_jax.io.checkpoint` stores them
  in a checkpoint's metadata and recomputes them after a restore, so a flipped bit, a truncated array
  file or an array of another checkpoint is reported instead of silently loaded.
* :func:`read_json` — ``json.load`` of a file whose errors name the file and what was expected;
  :func:`require` — the check that raises :class:`~lorapro_jax.errors.CorruptFileError`.

The fingerprint of an array ``x`` with raw bits ``u_i`` (its bytes viewed as unsigned integers of the
element width, widened to ``uint32``) is ``sum_i mix(u_i) * (2 i + 1) mod 2**32`` with the bijection
``mix(u) = (u * 0x9E3779B1) ^ (u >> 15)``. Each term is an odd multiple of a bijective image of one
element, so changing any single element always changes the sum; the shape and dtype are checked
separately. Integer sums wrap exactly, so the value does not depend on the reduction order (nor on
the sharding).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CorruptFileError

__all__ = ["fingerprint", "fingerprints", "read_json", "require"]

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def fingerprint(x: jax.Array) -> jax.Array:
    """The ``uint32`` fingerprint (a scalar) of one array; traceable."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = jnp.dtype(x.dtype).itemsize
    if width == 8:  # 64-bit (x64 mode): two uint32 words per element
        u = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
        u = jax.lax.bitcast_convert_type(x, _UINT[width]).astype(jnp.uint32).reshape(-1)
    idx = jnp.arange(u.shape[0], dtype=jnp.uint32)
    mixed = (u * jnp.uint32(0x9E3779B1)) ^ (u >> 15)
    return jnp.sum(mixed * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprint_jit = jax.jit(fingerprint)  # per leaf: leaves may live on different device sets


def _to_int(x: jax.Array) -> int:
    if getattr(x, "is_fully_addressable", True):
        return int(np.asarray(x))
    return int(np.asarray(x.addressable_data(0)))  # replicated scalar of a multi-process array


def fingerprints(tree: Any) -> Any:
    """The pytree of Python-int fingerprints of every array leaf of ``tree`` (same structure)."""
    fps = jax.tree.map(_fingerprint_jit, tree)  # all dispatched before the first is waited on
    return jax.tree.map(_to_int, fps)


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """``json.load`` of ``path``; a missing file raises ``FileNotFoundError`` and unreadable or
    non-JSON content :class:`CorruptFileError`, both naming the file and ``expected``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(path, expected, f"not valid JSON: {e}") from e


def require(cond: bool, path: str | os.PathLike, expected: str, detail: str) -> None:
    """Raises :class:`CorruptFileError` (``path``, ``expected``, ``detail``) unless ``cond``."""
    if not cond:
        raise CorruptFileError(path, expected, detail)
