"""The pairing of qwix LoRA / QLoRA (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``; tunix uses it).

qwix (0.1.x) adds, next to each adapted weight ``<w>`` of a module, two ``nnx.LoRAParam`` leaves (Linen:
``params`` entries) ``<w>_lora_a`` and ``<w>_lora_b`` and computes ``y = base(x) + (alpha / rank) * ...``
with the ``alpha`` and ``rank`` of the first :class:`qwix.LoraRule` whose ``module_path`` regex fully
matches the module's ``"/"``-joined path. Their layouts are the Flax layout of
:class:`~lorapro_jax.LoraPair`:

* ``dot_general`` (``nnx.Linear``, ...): ``a (contract, r)``, ``b (r, remain)`` with the contracting and
  remaining axes of the weight flattened; batched ``dot_general`` weights give leading batch axes
  ``a (*batch, contract, r)``, ``b (*batch, r, remain)`` (a stack of independent adapters);
* ``einsum`` (``nnx.Einsum``): ``a (*contract, r)``, ``b (r, *remain)``, axes in the weight's order;
* ``conv_general_dilated``: ``a (*window, in, r)``, ``b (r, out)``.

This module does not import qwix: it reads the provider's rules.
"""

from __future__ import annotations

import re
from typing import Any

from .names import NamePairing
from .plan import Pairing

__all__ = ["qwix_pairing", "QwixPairing"]

_OPS = ("dot_general", "einsum", "conv_general_dilated")


def _rules(provider: Any) -> list[Any]:
    rules = getattr(provider, "_rules", None)
    if rules is None:
        rules = getattr(provider, "rules", None)
    if rules is None:
        raise TypeError(f"qwix_pairing: expected a qwix.LoraProvider (with rules), got {type(provider).__name__}.")
    return list(rules)


def _is_lora_rule(rule: Any) -> bool:
    return hasattr(rule, "rank") and hasattr(rule, "alpha")


def _first_rules(rules: list[Any], module_path: str) -> list[Any]:
    """The rule qwix would use at ``module_path``, for each op kind (qwix takes the first full match)."""
    ops = set(_OPS) | {op for r in rules for op in (getattr(r, "op_names", ()) or ())}
    chosen = []
    for op in sorted(ops):
        for rule in rules:
            names = getattr(rule, "op_names", ()) or ()
            if re.fullmatch(rule.module_path, module_path) and (not names or op in names):
                chosen.append(rule)
                break
    return chosen


class QwixPairing(NamePairing):
    """Pairs ``<w>_lora_a`` / ``<w>_lora_b`` leaves; the scale ``alpha / rank`` from the provider's rules."""

    def __init__(self, provider: Any):
        self.rules = _rules(provider)
        if not any(_is_lora_rule(r) for r in self.rules):
            raise ValueError(f"qwix_pairing: the provider has no LoraRule (rules: {self.rules}).")
        super().__init__(
            r"^(?P<layer>.*)_lora_a$", r"^(?P<layer>.*)_lora_b$", self._scale_unused, name="qwix_pairing"
        )

    def __repr__(self) -> str:
        return f"qwix_pairing(<provider with {len(self.rules)} rules>)"

    @staticmethod
    def _scale_unused(layer: str) -> float:  # pragma: no cover - scale_for is overridden
        raise AssertionError

    def kernel_path(self, name: str) -> str:
        return name  # qwix's layer name is the adapted weight's own path, e.g. "layers/0/mlp/kernel"

    def module_name(self, name: str) -> str:
        return name.rpartition("/")[0].replace("/", ".")

    def scale_for(self, layer: str, a_path: str, a_shape: tuple[int, ...]) -> float:
        module = layer.rpartition("/")[0]
        tried = [module]
        if module.startswith("params/") or module == "params":  # Linen variables: {"params": {...}}
            tried.append(module[len("params/") :] if module != "params" else "")
        rank = a_shape[-1]
        for path in tried:
            lora = [r for r in _first_rules(self.rules, path) if _is_lora_rule(r)]
            if not lora:
                continue
            scales = {float(r.alpha) / float(r.rank) for r in lora if int(r.rank) == rank}
            if len(scales) == 1:
                return scales.pop()
            if not scales:
                raise ValueError(
                    f"qwix_pairing: cannot determine the LoRA scale of {a_path}: its rank is {rank} but the provider's "
                    f"LoraRule(s) matching module path {path!r} have rank(s) {sorted({int(r.rank) for r in lora})}."
                )
            raise ValueError(
                f"qwix_pairing: cannot determine the LoRA scale of {a_path}: several LoraRules matching module path "
                f"{path!r} (for different ops) give different scales alpha/rank {sorted(scales)}."
            )
        raise ValueError(
            f"qwix_pairing: cannot determine the LoRA scale of {a_path}: no LoraRule of the provider matches its module "
            f"path {module!r} (rules' module_path: {[r.module_path for r in self.rules]})."
        )


def qwix_pairing(provider: Any) -> Pairing:
    """The pairing of a model adapted by ``qwix.apply_lora_to_model(model, provider, ...)``.

    Pairs each ``<weight>_lora_a`` leaf with the ``<weight>_lora_b`` leaf of the same module and takes the scale
    ``alpha / rank`` of the provider's rule that qwix applies there (the first :class:`qwix.LoraRule` whose
    ``module_path`` fully matches the module's path; for Linen trees a leading ``params`` key is skipped).

    Example::

        provider = qwix.LoraProvider(module_path=".*(q|v)_proj", rank=8, alpha=16.0)
        model = qwix.apply_lora_to_model(model, provider, x, rngs=nnx.Rngs(0))
        tx = lp.paired(lp.lora_pro_adamw(1e-3), lp.qwix_pairing(provider))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    Args:
      provider: the ``qwix.LoraProvider`` the model was adapted with.

    Returns:
      A :class:`~lorapro_jax.pairings.Pairing`; its plan raises ``ValueError`` naming the path for a factor
      without its partner, a factor whose module no LoraRule matches (or whose rank differs from the rule's),
      and a tree without any qwix LoRA factor.
    """
    return QwixPairing(provider)
