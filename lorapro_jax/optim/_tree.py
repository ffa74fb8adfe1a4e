"""Tree helpers shared by the LoRA-aware optax transforms."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._utils import unwrap as unwrap_variable  # the value of an NNX Variable, else the leaf
from ..lora.pair import LoraPair, is_lora_pair

__all__ = ["map_pairs", "check_finite", "require_params", "unwrap_variable"]


def map_pairs(
    on_pair: Callable[..., Any],
    on_leaf: Callable[..., Any],
    tree: Any,
    *rest: Any,
) -> Any:
    """Maps ``on_pair(path, pair, *rest_nodes)`` over :class:`LoraPair` nodes and ``on_leaf`` elsewhere.

    ``path`` is the ``jax.tree_util.keystr`` of the node, for error messages. ``rest`` trees must have
    the structure of ``tree`` up to its pairs and leaves; the first of them (the params) must hold a
    ``LoraPair`` wherever ``tree`` does.
    """

    def f(path, node, *others):
        p = jax.tree_util.keystr(path)
        if is_lora_pair(node):
            for o in others[:1]:  # the params tree; state trees may hold plain arrays per pair
                if o is not None and not is_lora_pair(o):
                    raise ValueError(
                        f"LoRA pair at {p}: the matching node of another tree is {type(o).__name__}, expected a "
                        "LoraPair (are params passed in the same structure as the updates?)."
                    )
            for field in ("a", "b"):
                v = getattr(node, field)
                if not hasattr(v, "shape"):
                    raise ValueError(
                        f"LoRA pair at {p}: its '{field}' is {type(v).__name__}, not an array. LoRA-aware transforms "
                        "need both A and B of a pair; do not mask out only one of them."
                    )
            return on_pair(p, node, *others)
        return on_leaf(p, node, *others)

    return jax.tree_util.tree_map_with_path(f, tree, *rest, is_leaf=is_lora_pair)


def require_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(
            f"{name} needs the current parameter values: call `tx.update(updates, state, params)` "
            "(nnx.Optimizer does this for you)."
        )


def check_finite(tree: Any, name: str) -> None:
    """Raises (at run time, also under jit) an error naming the paths of non-finite leaves of ``tree``.

    Uses a single ``jax.debug.callback`` per call with one boolean per leaf.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = [(jax.tree_util.keystr(p), x) for p, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flat:
        return
    paths = [p for p, _ in flat]
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in flat])

    def _raise(ok):
        import numpy as np

        ok = np.asarray(ok)
        if not ok.all():
            bad = [p for p, good in zip(paths, ok) if not good]
            raise FloatingPointError(f"{name}: non-finite gradient values at {bad}")

    jax.debug.callback(_raise, flags)


def pair_like(pair: LoraPair, a: Any, b: Any) -> LoraPair:
    return pair.replace(a=a, b=b)


class Packed:
    """An opaque leaf bundling several per-node results (e.g. update and new moments) of one map."""

    __slots__ = ("items",)

    def __init__(self, *items):
        self.items = items


def unzip_packed(tree: Any, n: int) -> tuple[Any, ...]:
    """Splits a tree of :class:`Packed` leaves into ``n`` trees of the same structure."""
    is_packed = lambda x: isinstance(x, Packed)
    return tuple(jax.tree.map(lambda t: t.items[i], tree, is_leaf=is_packed) for i in range(n))
