"""PEFT export for trees that hold A and B as separate leaves (qwix, ``nnx.LoRA``, any tree with a pairing).

The pairs come from a :class:`~lorapro_jax.pairings.Pairing`; the tensors and ``adapter_config.json`` are
what :func:`~lorapro_jax.io.peft.save_peft_adapter` writes for our own ``apply_lora`` models, so
``PeftModel.from_pretrained`` and :func:`~lorapro_jax.export.load_peft_adapter` read them. A layout PEFT cannot
hold is a ``ValueError`` naming the layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._utils import norm_prefix
from ..pairings.plan import Pairing, foreign_pairs
from .peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .peft_config import common_rank_alpha, config_dict
from .safetensors import save_file

__all__ = ["peft_state_dict_paired", "save_peft_adapter_paired"]


def peft_state_dict_paired(tree: Any, pairing: Pairing, *, prefix: str = "", dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """PEFT tensors ``base_model.model.<prefix><module>.lora_{A,B}.weight`` (``(r, in)``, ``(out, r)``) of a tree.

    ``<module>`` is ``pairing.module_name(layer)`` (qwix: the module path, ``nnx.LoRALinear``: the layer's path,
    dotted). Only 2-D factors (``a (in, r)``, ``b (r, out)``, as for torch ``nn.Linear``) are supported; a pair
    with more axes is an error naming it.
    """
    prefix = norm_prefix(prefix)
    out: dict[str, np.ndarray] = {}
    for name, p in foreign_pairs(tree, pairing).items():
        if p.a.ndim != 2 or p.b.ndim != 2:
            raise ValueError(
                f"peft_state_dict_paired: not supported for layer {name!r}: factors a{tuple(p.a.shape)}, "
                f"b{tuple(p.b.shape)} have more than 2 axes; PEFT's LoRA adapts 2-D nn.Linear weights."
            )
        module = pairing.module_name(name)
        a_t, b_t = np.asarray(jax.device_get(p.a)).T, np.asarray(jax.device_get(p.b)).T
        if dtype is not None:
            a_t, b_t = a_t.astype(dtype), b_t.astype(dtype)
        for kind, x in (("A", a_t), ("B", b_t)):
            key = f"base_model.model.{prefix}{module}.lora_{kind}.weight"
            if key in out:
                raise ValueError(f"peft_state_dict_paired: two layers map to the PEFT module {prefix}{module!r}.")
            out[key] = np.ascontiguousarray(x)
    return out


def save_peft_adapter_paired(
    tree: Any,
    pairing: Pairing,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None,
    prefix: str = "",
    task_type: str | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Writes a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``) from a foreign tree.

    Tensors as :func:`peft_state_dict_paired`; ``r`` / ``lora_alpha`` the most common rank and ``scale · r``, with
    ``rank_pattern`` / ``alpha_pattern`` for the other layers, so PEFT rebuilds every layer's scale. Loadable with
    ``PeftModel.from_pretrained`` and :func:`lorapro_jax.export.load_peft_adapter`.
    """
    prefix_n = norm_prefix(prefix)
    tensors = peft_state_dict_paired(tree, pairing, prefix=prefix, dtype=dtype)
    info = {f"{prefix_n}{pairing.module_name(n)}": (p.rank, p.scale) for n, p in foreign_pairs(tree, pairing).items()}
    r, alpha = common_rank_alpha(info, rslora=False)
    cfg = config_dict(
        info, r=r, alpha=alpha, rslora=False, dropout=0.0, target_modules=sorted(info), modules_to_save=None,
        base_model_name_or_path=base_model_name_or_path, task_type=task_type, who="save_peft_adapter_paired",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / PEFT_WEIGHTS_NAME, {"format": "pt"})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out
