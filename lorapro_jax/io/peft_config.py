"""PEFT's ``adapter_config.json``: the rank / alpha rules and the config dict, with its self-check.

PEFT gives a module ``name`` the rank ``rank_pattern[k]`` and alpha ``alpha_pattern[k]`` of the first
pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``, else the config's ``r`` and ``lora_alpha``;
its scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). :func:`config_dict` writes
``r`` / ``lora_alpha`` for the most common rank and scale and patterns for the other modules, then
recomputes every module's rank and scale with these rules, so a written config always rebuilds the
adapters it describes. Used by :mod:`lorapro_jax.io.peft` (our models) and
:mod:`lorapro_jax.io.peft_paired` (foreign trees).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..lora.pair import lora_scale

__all__ = ["common_rank_alpha", "config_dict", "peft_module_rank_alpha"]


def _pattern_key(keys: Sequence[str], name: str) -> str | None:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", name):
            return k
    return None


def peft_module_rank_alpha(config: Mapping[str, Any], module_name: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scaling)`` that PEFT gives the module ``module_name`` under ``config``.

    ``module_name`` is the module's name in the base model (``<prefix><path>``).
    """
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    rk, ak = _pattern_key(list(rp), module_name), _pattern_key(list(ap), module_name)
    r = int(rp[rk]) if rk is not None else int(config["r"])
    alpha = float(ap[ak]) if ak is not None else float(config["lora_alpha"])
    return r, alpha, lora_scale(alpha, r, bool(config.get("use_rslora", False)))


def _clean(x: float) -> float:
    """Removes float noise (15.999999999999998 -> 16.0) when a short decimal is that close."""
    short = float(f"{x:.10g}")
    return short if math.isclose(short, x, rel_tol=1e-12) else x


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    return _clean(scale * (math.sqrt(r) if rslora else r))


def _scale_ok(alpha: float, r: int, rslora: bool, scale: float) -> bool:
    return math.isclose(lora_scale(alpha, r, rslora), scale, rel_tol=1e-9, abs_tol=0.0)


def common_rank_alpha(info: Mapping[str, tuple[int, float]], rslora: bool) -> tuple[int, float]:
    """``(r, lora_alpha)``: the most common rank and the most common ``scale * r`` (``* sqrt(r)`` with rsLoRA)
    of ``info = {module name: (rank, scale)}``."""
    r = collections.Counter(rank for rank, _ in info.values()).most_common(1)[0][0]
    alpha = collections.Counter(_alpha_for(s, rk, rslora) for rk, s in info.values()).most_common(1)[0][0]
    return int(r), alpha


def config_dict(
    info: Mapping[str, tuple[int, float]],
    *,
    r: int,
    alpha: float,
    rslora: bool,
    dropout: float,
    target_modules: str | Sequence[str],
    modules_to_save: Sequence[str] | None,
    base_model_name_or_path: str | None,
    task_type: str | None,
    who: str,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict for ``info = {module name: (rank, scale)}``, checked by PEFT's rules.

    Modules whose rank is not ``r`` get a ``rank_pattern`` entry, modules whose scale PEFT would not
    reproduce from ``alpha`` an ``alpha_pattern`` entry (keys: the full module names).

    Raises:
      ValueError: (prefixed by ``who``) a module would get another rank or scale in PEFT (a pattern key
        that also matches another module name).
    """
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "use_rslora": rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None if modules_to_save is None else list(modules_to_save),
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {name: rk for name, (rk, _) in info.items() if rk != r},
        "alpha_pattern": {
            name: _alpha_for(s, rk, rslora) for name, (rk, s) in info.items() if not _scale_ok(alpha, rk, rslora, s)
        },
        "use_dora": False,
    }
    for name, (rk, s) in info.items():  # self-check with PEFT's own matching rules
        pr, _, ps = peft_module_rank_alpha(cfg, name)
        if pr != rk or not math.isclose(ps, s, rel_tol=1e-9):
            raise ValueError(
                f"{who}: module {name!r} (rank {rk}, scale {s}) would get rank {pr}, scale {ps} in PEFT; "
                "its rank_pattern / alpha_pattern key also matches another module name. Use distinct prefixes."
            )
    return cfg
