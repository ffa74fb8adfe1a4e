"""Shared building blocks for the Flax NNX model ports.

Everything here is architecture-agnostic: activation lookup (HF ``ACT2FN`` names), an RMS norm
with an HF-named ``weight`` parameter, a masked multi-head attention kernel written in plain
``jnp`` (supports grouped-query attention and additive position bias), a dropout factory that
implements the "deterministic unless a ``dropout`` RNG stream was given" policy, and pooling
helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "ACT_FNS",
    "RMSNorm",
    "attention",
    "get_activation",
    "last_token_pooling",
    "make_dropout",
    "mean_pooling",
]

Dtype = Any


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


#: Activation functions keyed by the names Hugging Face configs use (``hidden_act``,
#: ``dense_act_fn``). ``gelu`` is the exact erf form, ``gelu_new``/``gelu_pytorch_tanh`` the tanh
#: approximation, exactly as in ``transformers.activations.ACT2FN``.
ACT_FNS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Return the activation function for a Hugging Face activation name.

    Args:
        name: e.g. ``"gelu"``, ``"gelu_new"``, ``"relu"``, ``"silu"``.

    Raises:
        ValueError: for names that are not supported.
    """
    try:
        return ACT_FNS[name]
    except KeyError:
        raise ValueError(f"Unsupported activation {name!r}; supported: {sorted(ACT_FNS)}") from None


def make_dropout(rate: float, rngs: nnx.Rngs | None) -> nnx.Dropout:
    """Build an ``nnx.Dropout`` following the package-wide dropout policy.

    * If ``rngs`` has an explicit ``dropout`` stream (``nnx.Rngs(params=0, dropout=1)``), dropout
      is *active* by default (``deterministic=False``), the usual NNX convention.
    * Otherwise the layer starts deterministic. It still keeps a handle on the ``default`` stream
      (if any) so that ``model.train()`` can switch dropout on later.

    ``model.eval()`` / ``model.train()`` and the ``deterministic=`` argument of every model's
    ``__call__`` override the default.
    """
    if rngs is None:
        return nnx.Dropout(rate, deterministic=True)
    if "dropout" in rngs:
        return nnx.Dropout(rate, deterministic=False, rngs=rngs)
    if "default" in rngs:
        return nnx.Dropout(rate, deterministic=True, rngs=rngs)
    return nnx.Dropout(rate, deterministic=True)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm without bias or mean subtraction (T5 / Llama style).

    Mirrors ``T5LayerNorm`` and ``LlamaRMSNorm``: the parameter is called ``weight`` so its dotted
    path equals the Hugging Face name. The statistics are computed in float32 (float64 for float64
    inputs: see :func:`stats_dtype`) and the result is cast to the computation ``dtype`` before the
    scale is applied.

    Args:
        hidden_size: size of the normalised (last) axis.
        eps: variance epsilon.
        dtype: computation dtype of the output (``None``: dtype of the input).
        param_dtype: dtype of ``weight``.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        eps: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.weight = nnx.Param(jnp.ones((hidden_size,), dtype=param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Float[Array, "*batch hidden"]) -> Float[Array, "*batch hidden"]:
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(stats_dtype(x.dtype))
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(out_dtype)
        return self.weight[...].astype(out_dtype) * normed


def stats_dtype(dtype: Any) -> Any:
    """The dtype for numerically sensitive statistics (norms, attention scores, softmax).

    At least float32, as Hugging Face computes them for half-precision models; float64 inputs keep
    float64, so a float64 model is float64 throughout (tests compare in float64 at ~1e-12).
    """
    return jnp.promote_types(dtype, jnp.float32)


def attention(
    query: Float[Array, "batch q_len heads head_dim"],
    key: Float[Array, "batch kv_len kv_heads head_dim"],
    value: Float[Array, "batch kv_len kv_heads head_dim"],
    *,
    mask: Bool[Array, "*mask_dims"] | None = None,
    bias: Float[Array, "*bias_dims"] | None = None,
    scale: float | None = None,
    dropout: nnx.Dropout | None = None,
    deterministic: bool | None = None,
) -> Float[Array, "batch q_len heads head_dim"]:
    """Masked scaled dot-product attention in plain ``jnp`` (eager reference semantics).

    Supports grouped-query attention: ``heads`` must be a multiple of ``kv_heads`` and query head
    ``h`` attends with key/value head ``h // (heads // kv_heads)`` (HF ``repeat_kv`` order).
    Scores and softmax are computed in float32 (float64 for float64 queries, :func:`stats_dtype`);
    masked positions get that dtype's ``finfo.min`` so a fully masked row yields a uniform (finite)
    distribution instead of NaN.

    Args:
        query: ``(batch, q_len, heads, head_dim)``.
        key: ``(batch, kv_len, kv_heads, head_dim)``.
        value: ``(batch, kv_len, kv_heads, head_dim)``.
        mask: boolean, ``True`` = may attend; broadcastable to ``(batch, heads, q_len, kv_len)``.
        bias: additive float bias broadcastable to ``(batch, heads, q_len, kv_len)`` (T5 relative
            position bias).
        scale: multiplier for the scores; defaults to ``head_dim ** -0.5``.
        dropout: optional dropout applied to the attention probabilities.
        deterministic: forwarded to ``dropout``.

    Returns:
        ``(batch, q_len, heads, head_dim)`` in the dtype of ``query``.
    """
    b, q_len, n_heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if n_heads % kv_heads:
        raise ValueError(f"heads={n_heads} is not a multiple of kv_heads={kv_heads}")
    groups = n_heads // kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    q = query.reshape(b, q_len, kv_heads, groups, head_dim)
    acc = stats_dtype(query.dtype)
    scores = jnp.einsum("bqkgd,btkd->bkgqt", q, key, preferred_element_type=acc)
    scores = scores.astype(acc) * scale
    scores = scores.reshape(b, n_heads, q_len, key.shape[1])
    if bias is not None:
        scores = scores + bias.astype(acc)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    probs = probs.reshape(b, kv_heads, groups, q_len, key.shape[1])
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, value)
    return out.reshape(b, q_len, n_heads, head_dim)


def padding_mask(
    attention_mask: Int[Array, "batch kv_len"] | None,
) -> Bool[Array, "batch 1 1 kv_len"] | None:
    """Turn an HF-style ``(batch, kv_len)`` 1/0 mask into a broadcastable boolean key mask."""
    if attention_mask is None:
        return None
    return (attention_mask > 0)[:, None, None, :]


def causal_mask(q_len: int, kv_len: int | None = None) -> Bool[Array, "1 1 q_len kv_len"]:
    """Lower-triangular boolean mask (query ``i`` may attend keys ``<= i``)."""
    kv_len = q_len if kv_len is None else kv_len
    offset = kv_len - q_len
    q_idx = jnp.arange(q_len)[:, None] + offset
    k_idx = jnp.arange(kv_len)[None, :]
    return (k_idx <= q_idx)[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the non-``None`` boolean masks (``None`` if all are ``None``)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else jnp.logical_and(out, m)
    return out


def mean_pooling(
    last_hidden_state: Float[Array, "batch seq hidden"],
    attention_mask: Int[Array, "batch seq"] | None = None,
) -> Float[Array, "batch hidden"]:
    """Attention-mask-weighted mean over the sequence (sentence-transformers ``Pooling``).

    Args:
        last_hidden_state: token embeddings, ``(batch, seq, hidden)``.
        attention_mask: ``(batch, seq)`` with 1 for real tokens; ``None`` averages every position.

    Returns:
        ``(batch, hidden)`` mean of the unmasked token vectors (the token count is clamped at
        ``1e-9`` exactly like sentence-transformers).
    """
    if attention_mask is None:
        return jnp.mean(last_hidden_state, axis=1)
    m = attention_mask[..., None].astype(last_hidden_state.dtype)
    summed = jnp.sum(last_hidden_state * m, axis=1)
    counts = jnp.clip(jnp.sum(m, axis=1), 1e-9, None)
    return summed / counts


def last_token_index(
    input_ids: Int[Array, "batch seq"] | None,
    attention_mask: Int[Array, "batch seq"] | None,
    pad_token_id: int | None,
    seq_len: int,
) -> Int[Array, " batch"]:
    """Index of the right-most real token of each row.

    Uses ``attention_mask`` when given (works for any padding side and for ``pad == eos``
    tokenizers), otherwise the right-most token that differs from ``pad_token_id`` (HF's rule),
    otherwise the last position.
    """
    positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
    if attention_mask is not None:
        real = attention_mask > 0
    elif input_ids is not None and pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        batch = 1 if input_ids is None else input_ids.shape[0]
        return jnp.full((batch,), seq_len - 1, dtype=jnp.int32)
    return jnp.max(jnp.where(real, positions, 0), axis=-1)


def last_token_pooling(
    hidden: Float[Array, "batch seq features"],
    index: Int[Array, " batch"],
) -> Float[Array, "batch features"]:
    """Gather ``hidden[b, index[b]]`` for every row ``b``."""
    return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
