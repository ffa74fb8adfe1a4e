"""``paired(tx, pairing)``: any LoRA-aware optax transform on a tree that holds A and B as separate leaves.

The LoRA-Pro forms (:func:`~lorapro_jax.lora_pro_sgd`, :func:`~lorapro_jax.scale_by_lora_pro`,
:func:`~lorapro_jax.lora_pro_adamw` ``full`` / ``efficient`` / ``lean``) and LoRA+ see every adapter as one
:class:`~lorapro_jax.LoraPair`. Trees made by qwix, flax's ``nnx.LoRA`` or PEFT-style code keep ``A`` and
``B`` as two leaves instead. :func:`paired` bridges the two: inside ``init`` / ``update`` (jit-safe: only
paths and shapes are inspected) the pairing packs the caller's tree into ``LoraPair`` nodes, the wrapped
transform runs, and the updates come back in the caller's structure.

LoRA-Pro: Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", arXiv 2407.18242.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from ..pairings.plan import Pairing, PairPlan
from ..lora.pair import is_lora_pair

__all__ = ["paired", "PairedState"]


class PairedState(NamedTuple):
    """State of :func:`paired`.

    Attributes:
      inner: the wrapped transform's state for the packed tree ``{"pairs": {layer: ...}, "rest": {path: ...}}``,
        with every ``LoraPair`` node of it stored as a plain ``{"a": ..., "b": ...}`` dict (so that
        ``nnx.Optimizer``, orbax and ``jax.jit`` see ordinary containers). E.g. for ``lora_pro_adamw(form="full")``
        ``inner[0].mu["pairs"][layer]`` is the ``(n, m)`` first moment of that layer.
    """

    inner: Any


def _is_var(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


def _store(state: Any) -> Any:
    """Replaces every ``LoraPair`` of a state by ``{"a", "b"}`` (the scale is static and comes from the plan)."""
    f = lambda x: {"a": x.a, "b": x.b} if is_lora_pair(x) else x
    return jax.tree.map(f, state, is_leaf=lambda x: is_lora_pair(x) or _is_var(x))


def _load(stored: Any, tx: optax.GradientTransformation, packed_params: Any, name: str) -> Any:
    """Rebuilds the wrapped transform's state (``LoraPair`` nodes included) from a stored one."""
    template = jax.eval_shape(tx.init, packed_params)
    treedef = jax.tree.structure(template)
    leaves = jax.tree.leaves(stored)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            f"paired({name}): the optimizer state holds {len(leaves)} arrays but the wrapped transform's state for "
            f"these parameters has {treedef.num_leaves}; was it initialised with another transform or tree?"
        )
    return jax.tree.unflatten(treedef, leaves)


def paired(tx: optax.GradientTransformation, pairing: Pairing) -> optax.GradientTransformationExtraArgs:
    """Runs a LoRA-aware transform on a tree whose A and B factors are separate leaves.

    The pairing (:func:`~lorapro_jax.qwix_pairing`, :func:`~lorapro_jax.nnx_lora_pairing`,
    :func:`~lorapro_jax.name_pairing`) finds each adapter's ``(A, B, scale)``; ``tx`` sees the packed tree
    ``{"pairs": {layer: LoraPair(a, b, scale)}, "rest": {path: leaf}}`` (non-LoRA leaves keep their paths and
    are trained as ``tx`` trains plain leaves) and the updates are returned in the caller's structure, so
    ``optax.apply_updates(params, updates)`` works as usual.

    Composes like any optax transform: put it inside ``optax.chain`` / ``optax.masked`` (masks then use the
    caller's structure; masking out only one factor of a pair is an error naming it), wrap a transform
    built with ``optax.inject_hyperparams`` (its hyperparameters are at ``state.inner.hyperparams``), or
    build ``paired`` inside the factory given to ``optax.inject_hyperparams``. Works in
    ``nnx.Optimizer(model, paired(tx, pairing), wrt=nnx.LoRAParam)``.

    Example (qwix)::

        provider = qwix.LoraProvider(module_path=".*", rank=8, alpha=16.0)
        model = qwix.apply_lora_to_model(model, provider, x, rngs=nnx.Rngs(0))
        tx = lp.paired(lp.lora_pro_adamw(1e-3, form="efficient"), lp.qwix_pairing(provider))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    Args:
      tx: a transform written against ``LoraPair`` (LoRA-Pro, LoRA+, or any optax transform).
      pairing: how to find the pairs.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`PairedState`; extra keyword arguments of
      ``update`` are passed on to ``tx``.

    Examples:
      A tree with ``lora_a`` / ``lora_b`` leaves, paired by name; the updates equal those of the same
      transform on :class:`~lorapro_jax.LoraPair` nodes (see :func:`~lorapro_jax.lora_pro_sgd`):

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import lorapro_jax as lp
      >>> pairing = lp.name_pairing(r"(?P<layer>.*)/lora_a$", r"(?P<layer>.*)/lora_b$", 1.0)
      >>> params = {"fc": {"lora_a": jnp.eye(3, 2), "lora_b": jnp.zeros((2, 3))}}
      >>> grads = {"fc": {"lora_a": jnp.zeros((3, 2)), "lora_b": jnp.ones((2, 3))}}
      >>> tx = lp.paired(lp.lora_pro_sgd(0.1), pairing)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> jax.tree.map(jnp.shape, updates)
      {'fc': {'lora_a': (3, 2), 'lora_b': (2, 3)}}
      >>> print(updates["fc"]["lora_b"].round(3))
      [[-0.1 -0.1 -0.1]
       [-0.1 -0.1 -0.1]]
    """
    tx = optax.with_extra_args_support(tx)
    name = getattr(pairing, "name", type(pairing).__name__)

    def init_fn(params):
        plan: PairPlan = pairing.plan(params)
        return PairedState(inner=_store(tx.init(plan.pack(params))))

    def update_fn(updates, state, params=None, **extra_args):
        plan: PairPlan = pairing.plan(updates)
        packed_updates = plan.pack(updates, "updates")
        packed_params = None if params is None else plan.pack(params, "params")
        template_params = packed_params if packed_params is not None else packed_updates
        inner = _load(state.inner, tx, template_params, name)
        new_updates, new_inner = tx.update(packed_updates, inner, packed_params, **extra_args)
        return plan.unpack(new_updates), PairedState(inner=_store(new_inner))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
