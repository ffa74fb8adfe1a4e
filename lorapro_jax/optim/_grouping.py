"""Grouping of LoRA pairs for batched r x r algebra (an implementation detail of the LoRA-Pro transforms).

A tree of many adapted weights (e.g. q/k/v/o/gate/up/down x 32 layers = 224 pairs) has only a handful of
distinct pair shapes. The LoRA-Pro transforms collect the pairs of a tree, put pairs of equal shapes,
dtypes, scale and stack axes in one group, and run each group's work (Gram matrices, damped inverses,
Sylvester ``eigh``, the closed form, the lean form's factor updates) as one batched call over a new leading
*group* axis (in front of the pairs' own stack axes). Compile time and kernel launches then grow with the
number of distinct shapes, not with the number of pairs; the results are those of each pair alone (every
batched operation acts slice by slice).

Groups never leak: states and updates keep the caller's tree structure. The cost is one copy of each
grouped pair's factors (``O((n + m) r)``) into the batch and back; full-size arrays (the full form's
moments) are not grouped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..lora.pair import LoraPair, pair_matrices
from ._tree import Packed, map_pairs
from .closed_form import check_pair

__all__ = [
    "PairRecord",
    "gather_pairs",
    "group_records",
    "fill_slots",
    "map_groups",
    "pair_mats",
    "pair_update",
    "stack",
]


@dataclasses.dataclass
class PairRecord:
    """One LoRA pair of a tree, with the matching nodes of the params and state trees."""

    index: int  # position in the tree (order of :func:`gather_pairs`)
    path: str
    u: LoraPair  # the update (gradient) pair
    p: LoraPair  # the parameter pair
    states: tuple  # the matching nodes of the state trees


class _Slot:
    """Placeholder leaf for the result of pair number ``index`` (filled by :func:`fill_slots`)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def gather_pairs(
    on_leaf: Callable[..., Any], updates: Any, params: Any, *states: Any
) -> tuple[Any, list[PairRecord]]:
    """Maps ``on_leaf`` over non-pair leaves and records every pair (checked against its params).

    Returns the mapped tree, with a placeholder where each pair was, and the list of pair records.
    """
    records: list[PairRecord] = []

    def on_pair(path, u, p, *st):
        check_pair(path, u, p)
        records.append(PairRecord(len(records), path, u, p, st))
        return _Slot(len(records) - 1)

    return map_pairs(on_pair, on_leaf, updates, params, *states), records


def _signature(x: Any) -> Any:
    leaves, treedef = jax.tree.flatten(x)
    return treedef, tuple((tuple(v.shape), jnp.dtype(v.dtype).name) for v in leaves)


def group_records(records: list[PairRecord]) -> list[list[PairRecord]]:
    """Groups records whose pairs (update, params, states) have equal shapes, dtypes, scale and stack axes.

    Groups come in order of first appearance; members keep the tree order.
    """
    groups: dict[Any, list[PairRecord]] = {}
    for rec in records:
        key = (rec.p.scale, rec.p.stack_ndim, _signature((rec.u, rec.p, rec.states)))
        groups.setdefault(key, []).append(rec)
    return list(groups.values())


def map_groups(
    group_fn: Callable[[list[PairRecord]], list[Any]],
    on_leaf: Callable[..., Any],
    updates: Any,
    params: Any,
    *states,
) -> Any:
    """``on_leaf`` on non-pair leaves; ``group_fn(group) -> [result per member]`` once per group of pairs.

    Returns the tree of ``updates``' structure with each pair replaced by its result.
    """
    tree, records = gather_pairs(on_leaf, updates, params, *states)
    results: list[Any] = [None] * len(records)
    for group in group_records(records):
        outs = group_fn(group)
        for rec, out in zip(group, outs, strict=True):
            results[rec.index] = out
    return fill_slots(tree, results)


def fill_slots(tree: Any, results: dict[int, Any] | list[Any]) -> Any:
    """Replaces the placeholders of :func:`gather_pairs` by ``results[index]``."""
    is_leaf = lambda x: isinstance(x, (_Slot, Packed))
    return jax.tree.map(
        lambda x: results[x.index] if isinstance(x, _Slot) else x, tree, is_leaf=is_leaf
    )


def stack(xs: list[Any]) -> Any:
    """Stacks equal-shaped arrays along a new leading group axis (one member: a free reshape)."""
    return xs[0][None] if len(xs) == 1 else jnp.stack(xs)


def pair_mats(group: list[PairRecord], dtype: Any) -> tuple[Any, Any, Any, Any]:
    """The group's Flax-layout matrices ``a (G, *stack, n, r)``, ``b (G, *stack, r, m)``, ``g_a``, ``g_b``."""
    pm = [pair_matrices(rec.p) for rec in group]
    gm = [pair_matrices(rec.u) for rec in group]
    return tuple(
        stack([x[i].astype(dtype) for x in src])
        for src, i in ((pm, 0), (pm, 1), (gm, 0), (gm, 1))
    )


def pair_update(u: LoraPair, a_mat: Any, b_mat: Any) -> LoraPair:
    """The update pair from Flax-layout matrices ``a (*stack, n, r)``, ``b (*stack, r, m)`` (shape/dtype of ``u``)."""
    return u.replace(
        a=a_mat.reshape(u.a.shape).astype(u.a.dtype),
        b=b_mat.reshape(u.b.shape).astype(u.b.dtype),
    )
