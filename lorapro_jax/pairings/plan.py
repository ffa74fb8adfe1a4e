"""Pairings: finding the (A, B, scale) triples of a parameter tree that holds A and B as separate leaves.

lorapro_jax's own layers keep each adapter as one :class:`~lorapro_jax.LoraPair`. Other LoRA
implementations (qwix, flax's ``nnx.LoRA``, PEFT-style name conventions) keep ``A`` and ``B`` as two
leaves of the parameter tree. A *pairing* says which leaves belong together: it turns the caller's
tree into a :class:`PairPlan`, which packs the tree into ``LoraPair`` nodes and unpacks results back
into the caller's structure. :func:`lorapro_jax.paired` uses it to run any LoRA-aware optax transform
on such trees; every LoRA-aware transform stays written against ``LoraPair`` only.

Paths: a leaf's path is its key path joined by ``"/"`` (dict keys and attribute names as they are,
sequence indices as integers), e.g. ``"layers/0/attn/q/kernel_lora_a"``; ``nnx.Variable`` nodes are
leaves. The concrete pairings (by name, ``nnx.LoRA``, qwix) are in :mod:`lorapro_jax.pairings.names` and
:mod:`lorapro_jax.pairings.qwix`.

Layout: each pair must be in the Flax layout of :class:`~lorapro_jax.LoraPair`: ``a: (*in, r)``,
``b: (r, *out)``; the adapted weight is ``W0 + scale * a @ b``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from .. import _utils
from ..lora.pair import LoraPair

__all__ = ["Pairing", "PairPlan", "PairSpec", "foreign_pairs", "path_string"]


def path_string(key_path: Sequence[Any]) -> str:
    """``"/"``-joined names of a JAX key path (``DictKey``, ``GetAttrKey``, ``SequenceKey`` ...)."""
    return _utils.path_string(key_path, "/")


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_utils.is_variable)
    return [path_string(p) for p, _ in flat], [x for _, x in flat], treedef


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """One adapter found by a pairing.

    Attributes:
      name: the layer's name (unique within the plan), e.g. ``"layers/0/attn/q/kernel"``.
      a_path, b_path: the paths of the ``A`` and ``B`` leaves.
      a_index, b_index: their positions among the tree's leaves.
      scale: the LoRA scale ``s``.
      a_shape, b_shape: the factors' shapes (``(*stack, *in, r)`` and ``(*stack, r, *out)``).
      in_ndim: number of input axes of a stacked pair (``LoraPair.in_ndim``); ``None`` without stack axes.
    """

    name: str
    a_path: str
    b_path: str
    a_index: int
    b_index: int
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    in_ndim: int | None = None

    @property
    def stack_ndim(self) -> int:
        return 0 if self.in_ndim is None else len(self.a_shape) - 1 - self.in_ndim


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """The pairs of one tree structure, and the conversions to and from the packed form.

    The packed form is ``{"pairs": {name: LoraPair}, "rest": {path: leaf}}``: one ``LoraPair`` per adapter
    and every other leaf under its path. It is the tree the wrapped transform sees.
    """

    pairing_name: str
    treedef: Any
    paths: tuple[str, ...]
    pairs: tuple[PairSpec, ...]
    rest: tuple[int, ...]

    def _leaves(self, tree: Any, what: str) -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_utils.is_variable)
        if treedef != self.treedef:
            raise ValueError(
                f"{self.pairing_name}: the {what} tree does not have the structure of the tree the pairs were found "
                f"in ({treedef.num_leaves} leaves vs {self.treedef.num_leaves}); pass params and updates in the same "
                "structure."
            )
        return leaves

    def pack(self, tree: Any, what: str = "parameter") -> dict[str, dict[str, Any]]:
        """The caller's tree as ``{"pairs": {name: LoraPair}, "rest": {path: leaf}}``."""
        leaves = self._leaves(tree, what)
        pairs = {
            s.name: LoraPair(_utils.unwrap(leaves[s.a_index]), _utils.unwrap(leaves[s.b_index]), s.scale, s.in_ndim)
            for s in self.pairs
        }
        return {"pairs": pairs, "rest": {self.paths[i]: leaves[i] for i in self.rest}}

    def unpack(self, packed: dict[str, dict[str, Any]]) -> Any:
        """Inverse of :meth:`pack`: the caller's structure, from a packed tree (e.g. updates)."""
        leaves: list[Any] = [None] * len(self.paths)
        for s in self.pairs:
            p = packed["pairs"][s.name]
            leaves[s.a_index], leaves[s.b_index] = p.a, p.b
        for i in self.rest:
            leaves[i] = packed["rest"][self.paths[i]]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def pair_by_name(self) -> dict[str, PairSpec]:
        return {s.name: s for s in self.pairs}


class Pairing:
    """Base class of pairings. Subclasses implement :meth:`match`; :meth:`plan` checks and builds the plan."""

    name = "pairing"

    def match(self, paths: list[str], leaves: list[Any]) -> list[tuple[str, int, int, float]]:
        """Returns ``(layer name, a index, b index, scale)`` for every adapter among the leaves.

        Raises ``ValueError`` naming the paths for an A without its B (or the reverse), and for a scale
        it cannot determine.
        """
        raise NotImplementedError

    def stack_ndim(self, name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
        """Number of leading stack axes of a pair: ``a (*stack, *in, r)``, ``b (*stack, r, *out)``.

        0 when ``b`` starts with the rank of ``a`` (an ordinary pair, which takes precedence); else the ``k``
        for which ``a`` and ``b`` share their first ``k`` axes and ``b``'s axis ``k`` is the rank.
        """
        r = a_shape[-1] if a_shape else None
        stacked = [
            k for k in range(1, min(len(a_shape) - 1, len(b_shape) - 1)) if a_shape[:k] == b_shape[:k] and b_shape[k] == r
        ]
        if b_shape and b_shape[0] == r:
            if stacked:
                raise ValueError(
                    f"{self.name}: the factors of {name!r}, a {a_shape} and b {b_shape}, read both as one pair and as a "
                    f"stack of {stacked[0]}-axis pairs (the stack size equals the rank); say which with "
                    "name_pairing(..., stack_ndim=0 or k)."
                )
            return 0
        return stacked[0] if stacked else 0

    def kernel_path(self, name: str) -> str | None:
        """Path of the base kernel ``W0`` adapted by pair ``name`` (for LoRA-GA), or ``None`` if unknown."""
        return None

    def module_name(self, name: str) -> str:
        """The dotted module name of pair ``name`` (PEFT's ``base_model.model.<module>.lora_A.weight``)."""
        return name.replace("/", ".")

    def plan(self, tree: Any) -> PairPlan:
        """Finds the pairs of ``tree`` (any pytree; ``nnx.State`` included). Static: uses paths and shapes only."""
        paths, leaves, treedef = _flatten(tree)
        found = self.match(paths, leaves)
        if not found:
            shown = paths[:12] + (["..."] if len(paths) > 12 else [])
            raise ValueError(f"{self.name} found no LoRA pair in a tree with leaves {shown}.")
        specs, used = [], set()
        for name, ai, bi, scale in found:
            a_shape, b_shape = tuple(_shape(leaves[ai], paths[ai])), tuple(_shape(leaves[bi], paths[bi]))
            k = _check_shapes(self, name, paths[ai], paths[bi], a_shape, b_shape)
            in_ndim = len(a_shape) - 1 - k if k else None
            specs.append(PairSpec(name, paths[ai], paths[bi], ai, bi, float(scale), a_shape, b_shape, in_ndim))
            used.update((ai, bi))
        rest = tuple(i for i in range(len(paths)) if i not in used)
        return PairPlan(self.name, treedef, tuple(paths), tuple(specs), rest)


def _shape(x: Any, path: str) -> tuple[int, ...]:
    x = _utils.unwrap(x)
    if not hasattr(x, "shape"):
        raise ValueError(f"LoRA factor at {path} is {type(x).__name__}, not an array.")
    return tuple(x.shape)


def _check_shapes(pairing: Pairing, name: str, a_path: str, b_path: str, a_shape, b_shape) -> int:
    """Checks the Flax layout of a pair; returns its number of leading stack axes."""
    k = pairing.stack_ndim(name, a_shape, b_shape)
    if len(a_shape) < k + 2 or len(b_shape) < k + 2 or a_shape[:k] != b_shape[:k] or a_shape[-1] != b_shape[k]:
        raise ValueError(
            f"{pairing.name}: the factors of {name!r} do not form a LoRA pair in the Flax layout a (*in, r), "
            f"b (r, *out) (or a stack of them, a (*stack, *in, r), b (*stack, r, *out)): {a_path} has shape "
            f"{a_shape}, {b_path} has shape {b_shape} (the last axis of A and the first axis of B after the stack "
            "axes must both be the rank)."
        )
    return k


def foreign_pairs(tree: Any, pairing: Pairing) -> dict[str, LoraPair]:
    """``{layer name: LoraPair(a, b, scale)}`` of a tree, as the pairing sees it."""
    return dict(pairing.plan(tree).pack(tree)["pairs"])
