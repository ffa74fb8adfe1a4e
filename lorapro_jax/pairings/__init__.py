"""Pairings: how the (A, B, scale) triples of a parameter tree are found.

lorapro_jax's own layers hold each adapter as one :class:`~lorapro_jax.LoraPair` (nothing to find). Trees that
hold A and B as two leaves need a pairing: :func:`name_pairing` (regexes on leaf paths, any tree),
:func:`nnx_lora_pairing` (flax ``nnx.LoRA``) and :func:`qwix_pairing` (qwix LoRA / QLoRA). A pairing's
:class:`PairPlan` packs the tree into ``LoraPair`` nodes and back; :func:`lorapro_jax.paired` runs any
LoRA-aware optax transform through it.
"""

from .plan import Pairing, PairPlan, PairSpec, foreign_pairs, path_string
from .names import NamePairing, name_pairing, nnx_lora_pairing
from .qwix import qwix_pairing

__all__ = [
    "NamePairing",
    "PairPlan",
    "PairSpec",
    "Pairing",
    "foreign_pairs",
    "name_pairing",
    "nnx_lora_pairing",
    "path_string",
    "qwix_pairing",
]
