"""LoRA for Flax Linen models, by method interception (no change to the model's code).

Linen modules are stateless, so the adapters live in a separate dict ``{module path: LoraPair}``
that you train with any optax optimizer (LoRA-Pro included) while the base ``params`` stay frozen::

    lora_params = init_linen_lora(model, params, config, jax.random.key(0), x)
    y = apply_linen_lora(model, params, lora_params, x)             # base(x) + s·((x a)·b) per target
    grads = jax.grad(lambda lp_: loss(apply_linen_lora(model, params, lp_, x)))(lora_params)

Supported targets: ``nn.Dense`` and ``nn.DenseGeneral`` (no ``batch_dims``). Paths are the Linen
module paths joined by dots (e.g. ``"encoder.layers_0.attn.query"``), matched by
:meth:`LoraConfig.matches`. Same layout as the NNX transform: ``a: (*in_shape, r)``,
``b: (r, *out_shape)``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ..errors import check_config
from .config import LoraConfig
from .pair import LoraPair, pair_matrices

__all__ = ["linen_targets", "init_linen_lora", "apply_linen_lora", "merge_linen_lora"]


def _spec(module: nn.Module, x: Array) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(contracted input axes, in_shape, out_shape) of a Dense / DenseGeneral call on ``x``."""
    if isinstance(module, nn.Dense):
        return (x.ndim - 1,), (x.shape[-1],), (module.features,)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"LoRA target {'.'.join(module.path)!r}: nn.DenseGeneral with batch_dims is not supported.")
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axis = tuple(a % x.ndim for a in axis)
        feats = module.features if isinstance(module.features, tuple) else (module.features,)
        return axis, tuple(x.shape[a] for a in axis), tuple(feats)
    return None


def linen_targets(model: nn.Module, params: Any, config: LoraConfig, *args, **kwargs) -> dict[str, tuple]:
    """Traces ``model.apply`` abstractly and returns ``{path: (axes, in_shape, out_shape)}`` of the targets.

    Raises:
      ValueError: no Dense/DenseGeneral path matches ``config.targets`` (lists the candidates).
    """
    check_config(config, "linen_targets")
    found: dict[str, tuple] = {}
    candidates: list[str] = []

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral)) and a:
            path = ".".join(mod.path)
            candidates.append(path)
            if config.matches(path):
                found[path] = _spec(mod, a[0])
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p: model.apply(p, *args, **kwargs), params)
    if not found:
        raise ValueError(f"LoRA targets {config.targets!r} match no Dense/DenseGeneral module. Candidates: {candidates}")
    return found


def init_linen_lora(model: nn.Module, params: Any, config: LoraConfig, key: Array, *args, **kwargs) -> dict[str, LoraPair]:
    """Creates ``{path: LoraPair}`` for every targeted Linen Dense/DenseGeneral (A init as in NNX, B = 0).

    ``args``/``kwargs`` are example inputs for ``model.apply`` (only shapes are used).

    Raises:
      ValueError: no match, or a rank above ``min(m, n)`` (names the path).
    """
    check_config(config, "init_linen_lora")
    out = {}
    dtype = jnp.dtype(config.param_dtype)
    for i, (path, (axes, in_shape, out_shape)) in enumerate(sorted(linen_targets(model, params, config, *args, **kwargs).items())):
        r = config.rank_for(path)
        n, m = math.prod(in_shape), math.prod(out_shape)
        if r > min(n, m):
            raise ValueError(f"LoRA rank {r} for {path!r} exceeds min(m, n) = min({m}, {n}) = {min(m, n)}.")
        k = jax.random.fold_in(key, i)
        if config.init == "kaiming":
            a = jax.random.uniform(k, in_shape + (r,), dtype, -1 / math.sqrt(n), 1 / math.sqrt(n))
        else:
            a = jax.random.normal(k, in_shape + (r,), dtype) / r
        out[path] = LoraPair(a, jnp.zeros((r,) + out_shape, dtype), config.scale_for(r))
    return out


def apply_linen_lora(
    model: nn.Module,
    params: Any,
    lora_params: dict[str, LoraPair],
    *args,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    **kwargs,
) -> Any:
    """``model.apply(params, *args, **kwargs)`` with ``s·((drop(x) a) b)`` added to each adapted module.

    Raises:
      ValueError: a path in ``lora_params`` was never called (stale or misspelled adapter).
    """
    used: set[str] = set()

    def interceptor(next_fun, a, kw, context):
        y = next_fun(*a, **kw)
        mod = context.module
        if context.method_name != "__call__" or not a:
            return y
        path = ".".join(mod.path)
        pair = lora_params.get(path)
        if pair is None:
            return y
        used.add(path)
        x = a[0]
        axes, _, _ = _spec(mod, x)
        if dropout_rate > 0 and dropout_key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, hash(path) % (2**31)), 1 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1 - dropout_rate), 0)
        h = jnp.tensordot(x, pair.a.astype(x.dtype), axes=(axes, tuple(range(len(axes)))))
        return y + (pair.scale * jnp.tensordot(h, pair.b.astype(x.dtype), axes=1)).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        out = model.apply(params, *args, **kwargs)
    missing = set(lora_params) - used
    if missing:
        raise ValueError(f"LoRA adapters for {sorted(missing)} were not used: no such Dense/DenseGeneral was called.")
    return out


def merge_linen_lora(params: Any, lora_params: dict[str, LoraPair]) -> Any:
    """Returns a copy of ``params`` with ``s·a@b`` added to each adapted kernel (``params/<path>/kernel``)."""
    params = jax.tree.map(lambda x: x, params)  # shallow structural copy
    for path, pair in lora_params.items():
        node = params["params"] if "params" in params else params
        for key in path.split("."):
            if key not in node:
                raise ValueError(f"merge_linen_lora: no parameters at {path!r} (missing {key!r}).")
            node = node[key]
        a2, b2 = pair_matrices(pair)
        k = node["kernel"]
        node["kernel"] = (k.astype(jnp.float32) + pair.scale * (a2 @ b2).reshape(k.shape)).astype(k.dtype)
    return params
