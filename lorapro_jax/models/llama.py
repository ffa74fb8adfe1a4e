"""Llama-family decoder (Llama 2/3, TinyLlama, SmolLM, ...) in Flax NNX with HF module names.

Linear paths match ``transformers.models.llama.modeling_llama``: ``model.layers.0.self_attn.q_proj``
(``k_proj``, ``v_proj``, ``o_proj``), ``model.layers.0.mlp.gate_proj`` (``up_proj``,
``down_proj``), ``lm_head`` / ``score``. Implements RMSNorm, rotary position embeddings (``default``,
``linear`` and ``llama3`` rope types, ``rope_theta`` from ``config.rope_parameters`` or the legacy
``config.rope_theta``), grouped-query attention (``num_key_value_heads``), SwiGLU MLP, causal +
padding masks and tied word embeddings.

Two layouts of the decoder stack, loading and saving the same Hugging Face checkpoints (per-layer keys):

* ``scan_layers=False`` (default): one module per layer in an ``nnx.List``, paths
  ``model.layers.{i}.self_attn.q_proj``.
* ``scan_layers=True``: the layers are built once with ``nnx.vmap`` (every layer parameter gains a
  leading ``(num_hidden_layers,)`` axis, paths ``model.layers.self_attn.q_proj``) and run with
  ``nnx.scan``: one compiled layer, as large JAX models are trained. LoRA adapts the stacked kernels
  as stacked pairs (:class:`~lorapro_jax.lora.pair.LoraPair` with leading stack axes).

``remat_policy`` (either layout) wraps each layer call in ``nnx.remat`` with the named
``jax.checkpoint_policies`` policy (e.g. ``"nothing_saveable"``, ``"dots_saveable"``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from ._common import (
    RMSNorm,
    attention,
    causal_mask,
    combine_masks,
    get_activation,
    last_token_index,
    last_token_pooling,
    make_dropout,
    padding_mask,
    stats_dtype,
)
from .base import HFModule
from .rope import apply_rotary, rope_inv_freq
from .rope import head_dim as _head_dim

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "LlamaModel",
]

Dtype = Any


def _normal(std: float):
    return nnx.initializers.normal(std)


def _checkpoint_policy(name: str | None) -> Any:
    """``jax.checkpoint_policies.<name>`` (``None`` when ``name`` is ``None``); a clear error otherwise."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or not callable(policy):
        raise ValueError(f"remat_policy={name!r} is not a jax.checkpoint_policies policy (e.g. 'nothing_saveable').")
    return policy


class KVCache(NamedTuple):
    """Keys and values of every layer for incremental decoding, one slot per token position.

    Slot ``t`` of a row holds the key/value of the ``t``-th token fed for that row (prompt padding
    included; the key mask given to :meth:`LlamaModel.decode` hides padding slots).

    Attributes:
        k: ``(layers, batch, max_len, kv_heads, head_dim)`` rotated keys.
        v: ``(layers, batch, max_len, kv_heads, head_dim)`` values.
    """

    k: Float[Array, "layers batch max_len kv_heads head_dim"]
    v: Float[Array, "layers batch max_len kv_heads head_dim"]


class LlamaAttention(nnx.Module):
    """GQA self-attention with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``."""

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        self.head_dim = _head_dim(config)
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        std = config.initializer_range
        kw = {"use_bias": bias, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "kernel_init": _normal(std)}
        h = config.hidden_size
        self.q_proj = nnx.Linear(h, self.n_heads * self.head_dim, **kw)
        self.k_proj = nnx.Linear(h, self.n_kv * self.head_dim, **kw)
        self.v_proj = nnx.Linear(h, self.n_kv * self.head_dim, **kw)
        self.o_proj = nnx.Linear(self.n_heads * self.head_dim, h, **kw)
        self.dropout = make_dropout(getattr(config, "attention_dropout", 0.0) or 0.0, rngs)

    def __call__(self, hidden, cos, sin, mask, *, deterministic=None):
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).reshape(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(hidden).reshape(b, s, self.n_kv, self.head_dim)
        v = self.v_proj(hidden).reshape(b, s, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, mask=mask, dropout=self.dropout, deterministic=deterministic)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim))

    def decode(self, hidden, cos, sin, mask, cache: KVCache, layer, index):
        """Attention of the new tokens ``hidden`` over the cache of layer ``layer`` (no dropout).

        Writes this call's keys / values into slots ``index .. index + seq - 1`` of layer ``layer``
        of ``cache`` first; ``mask`` ``(batch, 1, seq, max_len)`` says which slots each new token sees.
        Returns ``(output, cache)``.
        """
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).reshape(b, s, self.n_heads, self.head_dim)
        k = self.k_proj(hidden).reshape(b, s, self.n_kv, self.head_dim)
        v = self.v_proj(hidden).reshape(b, s, self.n_kv, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        at = (layer, 0, index, 0, 0)
        ck = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at)
        cv = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at)
        keys = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(q.dtype)
        values = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(q.dtype)
        out = attention(q, keys, values, mask=mask)
        return self.o_proj(out.reshape(b, s, self.n_heads * self.head_dim)), KVCache(ck, cv)


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        bias = bool(getattr(config, "mlp_bias", False))
        kw = {
            "use_bias": bias,
            "dtype": dtype,
            "param_dtype": param_dtype,
            "rngs": rngs,
            "kernel_init": _normal(config.initializer_range),
        }
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)
        self.act = config.hidden_act

    def __call__(self, x):
        return self.down_proj(get_activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``."""

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, hidden, cos, sin, mask, *, deterministic=None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, deterministic=deterministic)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def decode(self, hidden, cos, sin, mask, cache: KVCache, layer, index):
        """:meth:`__call__` with cached attention (:meth:`LlamaAttention.decode`); returns ``(hidden, cache)``."""
        att, cache = self.self_attn.decode(self.input_layernorm(hidden), cos, sin, mask, cache, layer, index)
        hidden = hidden + att
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), cache


class LlamaModel(HFModule):
    """Bare Llama decoder: ``embed_tokens``, ``layers``, ``norm``.

    Args:
        config: a ``transformers.LlamaConfig`` (or a compatible config, e.g. ``mistral`` without
            sliding window is *not* accepted by the loader's model_type check).
        dtype: computation dtype; ``param_dtype``: parameter dtype; ``rngs``: init / dropout RNGs.
        scan_layers: build the layers with ``nnx.vmap`` (one ``LlamaDecoderLayer`` whose parameters
            have a leading ``(num_hidden_layers,)`` axis) and run them with ``nnx.scan``; otherwise
            ``layers`` is an ``nnx.List`` of separate layers.
        remat_policy: name of a ``jax.checkpoint_policies`` policy; each layer call is then
            rematerialised with ``nnx.remat`` (``None``: no remat).
    """

    model_type = "llama"
    base_model_prefix = "model"
    hf_ignore_unexpected = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)self_attn\.rotary_emb\.inv_freq$")

    def __init__(self, config: Any, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None, scan_layers: bool = False, remat_policy: str | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        _checkpoint_policy(remat_policy)  # fail at construction, not at the first call
        self.scan_layers = bool(scan_layers)
        self.remat_policy = remat_policy
        self.num_layers = int(config.num_hidden_layers)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_normal(config.initializer_range),
        )

        def make_layer(r: nnx.Rngs) -> LlamaDecoderLayer:
            return LlamaDecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r)

        if self.scan_layers:
            make_stacked = nnx.split_rngs(splits=self.num_layers)(nnx.vmap(make_layer, in_axes=(0,), out_axes=0))
            self.layers = make_stacked(rngs)
        else:
            self.layers = nnx.List([make_layer(rngs) for _ in range(self.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        # Static (hashable) tuple; turned into an array at call time.
        self.inv_freq = tuple(float(x) for x in rope_inv_freq(config))

    def hf_stacked(self) -> dict[str, int]:
        """Attributes holding stacked layers, with their count (read by the HF loader and exporter)."""
        return {"layers": self.num_layers} if self.scan_layers else {}

    def _run_layers(self, h: Array, cos: Array, sin: Array, mask: Array | None, deterministic: bool | None) -> Array:
        def call(layer: LlamaDecoderLayer, x: Array) -> Array:
            return layer(x, cos, sin, mask, deterministic=deterministic)

        policy = _checkpoint_policy(self.remat_policy)
        if self.remat_policy is not None:
            call = nnx.remat(call, policy=policy)
        if not self.scan_layers:
            for layer in self.layers:
                h = call(layer, h)
            return h
        return nnx.scan(call, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, h)

    def rotary(self, position_ids: Int[Array, "batch seq"], dtype) -> tuple[Array, Array]:
        """``cos, sin`` of shape ``(batch, seq, head_dim)`` (float32 math, float64 for a float64
        ``dtype``; cast to ``dtype``)."""
        acc = stats_dtype(dtype)
        inv = jnp.asarray(self.inv_freq, dtype=acc)
        freqs = position_ids.astype(acc)[..., None] * inv
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        """Return final-norm hidden states ``(batch, seq, hidden)``.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)`` 1 for real tokens, 0 for padding (combined with the
                causal mask).
            position_ids: ``(batch, seq)``; default ``arange(seq)`` as in HF's plain forward
                (pass ``cumsum(mask) - 1`` yourself for left padding).
            deterministic: overrides the dropout layers' flag.
        """
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], input_ids.shape)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        mask = combine_masks(causal_mask(seq), padding_mask(attention_mask))
        h = self._run_layers(h, cos, sin, mask, deterministic)
        return self.norm(h)

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
        """An all-zero :class:`KVCache` for ``batch`` rows of up to ``max_len`` tokens (prompt +
        generated), in ``dtype`` (default: the embedding's computation dtype)."""
        cfg = self.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if dtype is None:
            dtype = self.embed_tokens.dtype or self.embed_tokens.param_dtype
        shape = (self.num_layers, batch, max_len, n_kv, _head_dim(cfg))
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def decode(
        self,
        input_ids: Int[Array, "batch seq"],
        position_ids: Int[Array, "batch seq"],
        kv_mask: Int[Array, "batch max_len"],
        cache: KVCache,
        index: Int[Array, ""] | int,
    ) -> tuple[Float[Array, "batch seq hidden"], KVCache]:
        """Incremental forward: the tokens ``input_ids`` fill cache slots ``index .. index + seq - 1``.

        The same computation as :meth:`__call__` on the whole sequence so far (no dropout, no remat),
        reading earlier keys / values from ``cache``. A new token in slot ``q`` attends slot ``t`` iff
        ``t <= q`` and ``kv_mask[b, t]`` (0 for padding), so left-padded prompts work with
        ``position_ids = cumsum(mask) - 1``.

        Args:
            input_ids: ``(batch, seq)`` the new tokens (the prompt at prefill, one token per step after).
            position_ids: ``(batch, seq)`` their rotary positions.
            kv_mask: ``(batch, max_len)`` 1 for slots holding real tokens (or to be filled by them).
            cache: from :meth:`init_cache` or the previous call.
            index: the first slot written (a traced scalar is fine: one compile for every step).

        Returns:
            ``(hidden, cache)``: final-norm hidden states ``(batch, seq, hidden)`` and the updated cache.
        """
        seq, max_len = input_ids.shape[1], cache.k.shape[2]
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, h.dtype)
        q_slot = index + jnp.arange(seq)[:, None]
        causal = (jnp.arange(max_len)[None, :] <= q_slot)[None, None]
        mask = jnp.logical_and(causal, padding_mask(kv_mask))

        def call(layer: LlamaDecoderLayer, carry: tuple) -> tuple:
            x, c, i = carry
            x, c = layer.decode(x, cos, sin, mask, c, i, index)
            return x, c, i + 1

        carry = (h, cache, jnp.int32(0))
        if self.scan_layers:
            carry = nnx.scan(call, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, carry)
        else:
            for layer in self.layers:
                carry = call(layer, carry)
        h, cache, _ = carry
        return self.norm(h), cache


def _tie(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


class LlamaForCausalLM(HFModule):
    """Llama with a language-modelling head: ``model`` + ``lm_head`` (absent when tied; the
    logits then use ``model.embed_tokens`` transposed).

    Args:
        config: a ``transformers.LlamaConfig``.
        tie_word_embeddings: override ``config.tie_word_embeddings``.
        dtype, param_dtype, rngs, scan_layers, remat_policy: as in :class:`LlamaModel`.
    """

    model_type = "llama"
    base_model_prefix = "model"
    hf_ignore_unexpected = LlamaModel.hf_ignore_unexpected

    def __init__(self, config: Any, *, tie_word_embeddings: bool | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None, scan_layers: bool = False,
                 remat_policy: str | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.tie_word_embeddings = _tie(config) if tie_word_embeddings is None else tie_word_embeddings
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, scan_layers=scan_layers,
                                remat_policy=remat_policy)
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs, kernel_init=_normal(config.initializer_range),
            )
        )

    @classmethod
    def hf_prepare_kwargs(cls, config: Any, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Untie when a checkpoint marked tied carries a distinct ``lm_head.weight``."""
        emb = tensors.get("model.embed_tokens.weight")
        head = tensors.get("lm_head.weight")
        if (
            _tie(config)
            and emb is not None
            and head is not None
            and (emb.shape != head.shape or not np.array_equal(emb, head))
        ):
            return {"tie_word_embeddings": False}
        return {}

    def hf_tied_aliases_for_instance(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        """Return next-token logits ``(batch, seq, vocab)``."""
        h = self.model(input_ids, attention_mask, position_ids, deterministic=deterministic)
        return self._head(h)

    def _head(self, h: Array) -> Array:
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)

    def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None) -> KVCache:
        """See :meth:`LlamaModel.init_cache`."""
        return self.model.init_cache(batch, max_len, dtype)

    def decode(
        self,
        input_ids: Int[Array, "batch seq"],
        position_ids: Int[Array, "batch seq"],
        kv_mask: Int[Array, "batch max_len"],
        cache: KVCache,
        index: Int[Array, ""] | int,
    ) -> tuple[Float[Array, "batch vocab"], KVCache]:
        """Next-token logits at the last new position, ``(batch, vocab)``, and the updated cache
        (:meth:`LlamaModel.decode`; the head runs on the last position only)."""
        h, cache = self.model.decode(input_ids, position_ids, kv_mask, cache, index)
        return self._head(h[:, -1]), cache


class LlamaForSequenceClassification(HFModule):
    """Llama + bias-free linear ``score`` read at the last real token of each sequence.

    The pooled position is the right-most token with ``attention_mask == 1`` when a mask is
    given (robust to ``pad == eos`` tokenizers and either padding side); otherwise HF's rule:
    the right-most token that is not ``config.pad_token_id`` (or the last token if the config has
    no pad id).

    Args:
        config: a ``transformers.LlamaConfig``; ``config.num_labels`` unless ``num_labels`` given.
        num_labels: number of logits.
        dtype, param_dtype, rngs, scan_layers, remat_policy: as in :class:`LlamaModel`.
    """

    model_type = "llama"
    base_model_prefix = "model"
    hf_ignore_unexpected = LlamaModel.hf_ignore_unexpected + (r"^lm_head\.",)
    hf_default_allow_missing = (r"^score\.",)

    def __init__(self, config: Any, *, num_labels: int | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None, scan_layers: bool = False,
                 remat_policy: str | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.num_labels = int(num_labels if num_labels is not None else config.num_labels)
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, scan_layers=scan_layers,
                                remat_policy=remat_policy)
        self.score = nnx.Linear(
            config.hidden_size, self.num_labels, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=_normal(config.initializer_range),
        )

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch num_labels"]:
        """Return logits ``(batch, num_labels)`` at the last real token."""
        h = self.model(input_ids, attention_mask, position_ids, deterministic=deterministic)
        idx = last_token_index(input_ids, attention_mask, self.pad_token_id, input_ids.shape[1])
        return self.score(last_token_pooling(h, idx))
