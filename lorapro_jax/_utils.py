"""Small private helpers shared across the package: key paths, Variable values, module-name matching.

Each of these used to be written out in several modules, with small differences (the separator of a
path, the order of attributes looked up on a key). They live here once; callers keep their own
conventions through the arguments (``sep=``, the labels of a report).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["fit_report", "is_variable", "key_name", "matches_targets", "norm_prefix", "path_string", "unwrap"]


def key_name(k: Any) -> str:
    """The plain name of one key-path entry: ``DictKey.key``, ``GetAttrKey.name``, ``SequenceKey.idx``.

    Strings and integers (the path entries of ``nnx.iter_modules`` / ``nnx.to_flat_state``) are returned
    as ``str(k)``. JAX key types carry exactly one of these attributes, so the lookup order is immaterial.
    """
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_string(key_path: Iterable[Any], sep: str = ".") -> str:
    """The names of a key path joined by ``sep``: ``"layers.0.query"`` (``sep="."``, NNX module paths,
    Hugging Face names) or ``"layers/0/query"`` (``sep="/"``, the leaf paths of pairings and checkpoints)."""
    return sep.join(key_name(k) for k in key_path)


def is_variable(x: Any) -> bool:
    """Whether ``x`` is an ``nnx.Variable`` (flax is imported only when asked)."""
    from flax import nnx

    return isinstance(x, nnx.Variable)


def unwrap(x: Any) -> Any:
    """The value held by an NNX Variable (as found in states and optimizer states), else ``x`` itself."""
    get = getattr(x, "get_value", None)
    return get() if callable(get) else x


def norm_prefix(prefix: str) -> str:
    """A module-name prefix ending in ``"."`` (``"bert"`` -> ``"bert."``); ``""`` stays empty."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def matches_targets(targets: str | Sequence[str], name: str) -> bool:
    """PEFT's ``target_modules`` rule on a dotted module name.

    A string is a regex that must match the whole name (``re.fullmatch``); a sequence selects every
    name equal to one of its entries or ending in ``"." + entry``.
    """
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def fit_report(
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[str],
    *,
    labels: tuple[str, str, str] = ("missing keys", "unexpected keys", "shape mismatches"),
    counts: bool = True,
) -> list[str]:
    """The lines of a "does not fit" report: one per non-empty list, ``"<label> (<n>): [...]"``.

    Used wherever stored arrays are matched against a target by name (Hugging Face checkpoints, orbax
    checkpoints); ``labels`` names the three kinds in the caller's words, ``counts`` adds ``(n)``.
    """
    parts = []
    for label, items in zip(labels, (missing, unexpected, mismatched)):
        if items:
            parts.append(f"{label} ({len(items)}): {list(items)}" if counts else f"{label}: {list(items)}")
    return parts
