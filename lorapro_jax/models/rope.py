"""Rotary position embeddings of the Llama family, following Hugging Face's rope init functions.

``rope_inv_freq`` reads ``rope_theta`` and the rope type from ``config.rope_parameters`` (or the legacy
``config.rope_scaling`` / ``config.rope_theta``) and supports the ``default``, ``linear`` and ``llama3`` types;
``apply_rotary`` is HF's "rotate_half" form, so q/k kernels in HF row order need no permutation.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["apply_rotary", "head_dim", "rope_inv_freq"]


def _rope_params(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        for k, v in legacy.items():
            params.setdefault(k, v)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    return params


def head_dim(config: Any) -> int:
    """Per-head width: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_inv_freq(config: Any) -> np.ndarray:
    """Inverse RoPE frequencies ``(head_dim // 2,)`` (float32), following HF's rope init functions.

    Supports ``rope_type`` ``"default"``, ``"linear"`` and ``"llama3"``.

    Raises:
        NotImplementedError: other rope types (``dynamic``, ``yarn``, ...) or partial rotary.
    """
    p = _rope_params(config)
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial_rotary_factor != 1 is not supported")
    dim = head_dim(config)
    base = float(p["rope_theta"])
    inv = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    kind = p["rope_type"]
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / float(p["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise NotImplementedError(f"rope_type={kind!r} is not supported (default, linear, llama3)")


def apply_rotary(
    x: Float[Array, "batch seq heads head_dim"],
    cos: Float[Array, "batch seq head_dim"],
    sin: Float[Array, "batch seq head_dim"],
) -> Float[Array, "batch seq heads head_dim"]:
    """HF ("rotate_half") rotary embedding: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]
