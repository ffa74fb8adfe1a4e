"""T5 encoder-decoder (T5 / T5 v1.1 / Flan-T5) in Flax NNX, mirroring Hugging Face module names.

Linear paths match ``transformers.models.t5.modeling_t5``: ``encoder.block.0.layer.0.SelfAttention.q``,
``decoder.block.1.layer.1.EncDecAttention.o``, ``encoder.block.0.layer.1.DenseReluDense.wi``
(``wi_0``/``wi_1`` for gated feed-forwards), ``lm_head``. Differences from vanilla attention that
T5 needs and this port implements: no ``1/sqrt(d)`` score scaling, bucketed relative position
bias owned by block 0 and shared by all blocks of a stack, RMS-style ``T5LayerNorm`` (no bias, no
mean), pre-norm residual blocks, and -- for tied embeddings -- decoder output scaling by
``d_model ** -0.5`` before the (shared) LM head.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

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
    make_dropout,
    mean_pooling,
    padding_mask,
)
from .base import HFModule

__all__ = [
    "T5EncoderForSequenceClassification",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5Model",
    "T5ModelOutput",
    "relative_position_bucket",
    "shift_right",
    "t5_activation",
]

Dtype = Any


class T5ModelOutput(NamedTuple):
    """Output of :class:`T5Model`.

    Attributes:
        last_hidden_state: ``(batch, tgt_len, d_model)`` decoder output.
        encoder_last_hidden_state: ``(batch, src_len, d_model)`` encoder output.
    """

    last_hidden_state: Float[Array, "batch tgt_len d_model"]
    encoder_last_hidden_state: Float[Array, "batch src_len d_model"]


def t5_activation(config: Any) -> tuple[str, bool]:
    """``(activation name, is_gated)`` from ``config.feed_forward_proj`` (HF's rule:
    ``"gated-gelu"`` means the tanh-approximated ``gelu_new``)."""
    proj = config.feed_forward_proj
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"Invalid feed_forward_proj {proj!r}")
    gated = parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return act, gated


def relative_position_bucket(
    relative_position: Int[Array, "q_len k_len"],
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> Int[Array, "q_len k_len"]:
    """Mesh-TensorFlow / HF T5 relative position bucketing.

    Half the buckets (per direction) hold exact small distances, the rest are logarithmically
    spaced up to ``max_distance``; larger distances share the last bucket.

    Args:
        relative_position: ``memory_position - query_position``.
        bidirectional: encoder (``True``) or causal decoder (``False``, positive offsets invalid).
        num_buckets: total number of buckets.
        max_distance: distance mapped to the last bucket.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        rel = jnp.abs(relative_position)
    else:
        rel = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = jnp.maximum(rel, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


def shift_right(labels: Int[Array, "batch tgt_len"], decoder_start_token_id: int, pad_token_id: int):
    """HF ``_shift_right``: prepend the start token, drop the last label, map ``-100`` to pad."""
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1
    )
    return jnp.where(shifted == -100, pad_token_id, shifted)


def _normal(std: float):
    return nnx.initializers.normal(std)


class T5Attention(nnx.Module):
    """Multi-head attention with projections ``q``, ``k``, ``v``, ``o`` (no biases) and, in the
    first block of each stack, ``relative_attention_bias`` (an ``nnx.Embed`` of
    ``(num_buckets, n_heads)``)."""

    def __init__(
        self,
        config: Any,
        *,
        has_relative_attention_bias: bool,
        is_decoder: bool,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        f = config.initializer_factor
        d, kv, h = config.d_model, config.d_kv, config.num_heads
        self.n_heads, self.d_kv = h, kv
        self.is_decoder = is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.q = nnx.Linear(d, h * kv, kernel_init=_normal(f * (d * kv) ** -0.5), **kw)
        self.k = nnx.Linear(d, h * kv, kernel_init=_normal(f * d**-0.5), **kw)
        self.v = nnx.Linear(d, h * kv, kernel_init=_normal(f * d**-0.5), **kw)
        self.o = nnx.Linear(h * kv, d, kernel_init=_normal(f * (h * kv) ** -0.5), **kw)
        self.relative_attention_bias = (
            nnx.Embed(
                self.num_buckets, h, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                embedding_init=_normal(f * d**-0.5),
            )
            if has_relative_attention_bias
            else None
        )
        self.dropout = make_dropout(config.dropout_rate, rngs)

    def compute_bias(self, q_len: int, k_len: int) -> Float[Array, "1 heads q_len k_len"]:
        """Relative position bias ``(1, heads, q_len, k_len)`` (zeros without the table)."""
        if self.relative_attention_bias is None:
            return jnp.zeros((1, self.n_heads, q_len, k_len), jnp.float32)
        ctx = jnp.arange(q_len, dtype=jnp.int32)[:, None]
        mem = jnp.arange(k_len, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(
            mem - ctx, bidirectional=not self.is_decoder, num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        values = self.relative_attention_bias(buckets)  # (q, k, heads)
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(
        self,
        hidden: Float[Array, "batch q_len d_model"],
        *,
        key_value_states: Float[Array, "batch k_len d_model"] | None = None,
        mask: Array | None = None,
        position_bias: Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[Float[Array, "batch q_len d_model"], Array]:
        """Returns ``(output, position_bias)`` so later blocks can reuse block 0's bias."""
        b, q_len, _ = hidden.shape
        src = hidden if key_value_states is None else key_value_states
        k_len = src.shape[1]
        q = self.q(hidden).reshape(b, q_len, self.n_heads, self.d_kv)
        k = self.k(src).reshape(b, k_len, self.n_heads, self.d_kv)
        v = self.v(src).reshape(b, k_len, self.n_heads, self.d_kv)
        if position_bias is None:
            position_bias = self.compute_bias(q_len, k_len)
        out = attention(
            q, k, v, mask=mask, bias=position_bias, scale=1.0, dropout=self.dropout, deterministic=deterministic
        )
        return self.o(out.reshape(b, q_len, self.n_heads * self.d_kv)), position_bias


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm self-attention sub-layer: ``layer_norm`` -> ``SelfAttention`` -> residual."""

    def __init__(self, config: Any, *, has_relative_attention_bias: bool, is_decoder: bool, dtype, param_dtype, rngs):
        self.SelfAttention = T5Attention(
            config, has_relative_attention_bias=has_relative_attention_bias, is_decoder=is_decoder,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.dropout = make_dropout(config.dropout_rate, rngs)

    def __call__(self, hidden, *, mask, position_bias, deterministic=None):
        out, position_bias = self.SelfAttention(
            self.layer_norm(hidden), mask=mask, position_bias=position_bias, deterministic=deterministic
        )
        return hidden + self.dropout(out, deterministic=deterministic), position_bias


class T5LayerCrossAttention(nnx.Module):
    """Pre-norm cross-attention sub-layer: ``layer_norm`` -> ``EncDecAttention`` -> residual."""

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        self.EncDecAttention = T5Attention(
            config, has_relative_attention_bias=False, is_decoder=True, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.dropout = make_dropout(config.dropout_rate, rngs)

    def __call__(self, hidden, encoder_hidden, *, mask, position_bias, deterministic=None):
        out, position_bias = self.EncDecAttention(
            self.layer_norm(hidden), key_value_states=encoder_hidden, mask=mask, position_bias=position_bias,
            deterministic=deterministic,
        )
        return hidden + self.dropout(out, deterministic=deterministic), position_bias


class T5DenseActDense(nnx.Module):
    """``wo(dropout(act(wi(x))))``."""

    def __init__(self, config: Any, act: str, *, dtype, param_dtype, rngs):
        f, d, ff = config.initializer_factor, config.d_model, config.d_ff
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.wi = nnx.Linear(d, ff, kernel_init=_normal(f * d**-0.5), **kw)
        self.wo = nnx.Linear(ff, d, kernel_init=_normal(f * ff**-0.5), **kw)
        self.dropout = make_dropout(config.dropout_rate, rngs)
        self.act = act

    def __call__(self, x, *, deterministic=None):
        h = get_activation(self.act)(self.wi(x))
        return self.wo(self.dropout(h, deterministic=deterministic))


class T5DenseGatedActDense(nnx.Module):
    """``wo(dropout(act(wi_0(x)) * wi_1(x)))`` (T5 v1.1 / Flan-T5)."""

    def __init__(self, config: Any, act: str, *, dtype, param_dtype, rngs):
        f, d, ff = config.initializer_factor, config.d_model, config.d_ff
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.wi_0 = nnx.Linear(d, ff, kernel_init=_normal(f * d**-0.5), **kw)
        self.wi_1 = nnx.Linear(d, ff, kernel_init=_normal(f * d**-0.5), **kw)
        self.wo = nnx.Linear(ff, d, kernel_init=_normal(f * ff**-0.5), **kw)
        self.dropout = make_dropout(config.dropout_rate, rngs)
        self.act = act

    def __call__(self, x, *, deterministic=None):
        h = get_activation(self.act)(self.wi_0(x)) * self.wi_1(x)
        return self.wo(self.dropout(h, deterministic=deterministic))


class T5LayerFF(nnx.Module):
    """Pre-norm feed-forward sub-layer: ``layer_norm`` -> ``DenseReluDense`` -> residual."""

    def __init__(self, config: Any, *, dtype, param_dtype, rngs):
        act, gated = t5_activation(config)
        ff_cls = T5DenseGatedActDense if gated else T5DenseActDense
        self.DenseReluDense = ff_cls(config, act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
        self.dropout = make_dropout(config.dropout_rate, rngs)

    def __call__(self, hidden, *, deterministic=None):
        out = self.DenseReluDense(self.layer_norm(hidden), deterministic=deterministic)
        return hidden + self.dropout(out, deterministic=deterministic)


class T5Block(nnx.Module):
    """``layer = [self-attention, (cross-attention,) feed-forward]`` as an ``nnx.List``."""

    def __init__(self, config: Any, *, has_relative_attention_bias: bool, is_decoder: bool, dtype, param_dtype, rngs):
        self.is_decoder = is_decoder
        layers: list[nnx.Module] = [
            T5LayerSelfAttention(
                config, has_relative_attention_bias=has_relative_attention_bias, is_decoder=is_decoder,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            )
        ]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        layers.append(T5LayerFF(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.layer = nnx.List(layers)

    def __call__(
        self, hidden, *, mask, position_bias, encoder_hidden=None, encoder_mask=None, encoder_decoder_bias=None,
        deterministic=None,
    ):
        hidden, position_bias = self.layer[0](
            hidden, mask=mask, position_bias=position_bias, deterministic=deterministic
        )
        if self.is_decoder and encoder_hidden is not None:
            hidden, encoder_decoder_bias = self.layer[1](
                hidden, encoder_hidden, mask=encoder_mask, position_bias=encoder_decoder_bias,
                deterministic=deterministic,
            )
        hidden = self.layer[-1](hidden, deterministic=deterministic)
        return hidden, position_bias, encoder_decoder_bias


class T5Stack(nnx.Module):
    """Encoder or decoder stack: ``block`` (``nnx.List``), ``final_layer_norm``.

    The token embedding is owned by the parent model (``shared``), so ``embed_tokens`` does not
    appear in the NNX tree; HF's tied ``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight``
    aliases are accepted on load.
    """

    def __init__(self, config: Any, *, is_decoder: bool, num_layers: int, dtype, param_dtype, rngs):
        self.is_decoder = is_decoder
        self.block = nnx.List(
            [
                T5Block(
                    config, has_relative_attention_bias=(i == 0), is_decoder=is_decoder, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.final_layer_norm = RMSNorm(
            config.d_model, eps=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype
        )
        self.dropout = make_dropout(config.dropout_rate, rngs)

    def __call__(
        self,
        inputs_embeds: Float[Array, "batch seq d_model"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        encoder_hidden_states: Float[Array, "batch src_len d_model"] | None = None,
        encoder_attention_mask: Int[Array, "batch src_len"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq d_model"]:
        seq = inputs_embeds.shape[1]
        mask = padding_mask(attention_mask)
        if self.is_decoder:
            mask = combine_masks(mask, causal_mask(seq))
        enc_mask = padding_mask(encoder_attention_mask) if encoder_hidden_states is not None else None
        hidden = self.dropout(inputs_embeds, deterministic=deterministic)
        position_bias = None
        enc_dec_bias = None
        for blk in self.block:
            hidden, position_bias, enc_dec_bias = blk(
                hidden, mask=mask, position_bias=position_bias, encoder_hidden=encoder_hidden_states,
                encoder_mask=enc_mask, encoder_decoder_bias=enc_dec_bias, deterministic=deterministic,
            )
        hidden = self.final_layer_norm(hidden)
        return self.dropout(hidden, deterministic=deterministic)


def _tie_flag(config: Any) -> bool:
    """Original ``tie_word_embeddings`` of a T5 config (transformers 5 keeps it as
    ``scale_decoder_outputs`` and forces ``tie_word_embeddings=True``)."""
    flag = getattr(config, "scale_decoder_outputs", None)
    if flag is None:
        flag = getattr(config, "tie_word_embeddings", True)
    return bool(flag)


class _T5Base(HFModule):
    model_type = "t5"
    base_model_prefix = None
    hf_tied_aliases: ClassVar[dict[str, str]] = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def hf_init_std(self) -> float:
        """T5 has no ``initializer_range``; heads use ``initializer_factor * d_model ** -0.5``."""
        return float(self.config.initializer_factor * self.config.d_model**-0.5)

    def _build_shared(self, config, dtype, param_dtype, rngs):
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_normal(config.initializer_factor * 1.0),
        )

    def _build_encoder(self, config, dtype, param_dtype, rngs):
        self.encoder = T5Stack(
            config, is_decoder=False, num_layers=config.num_layers, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _build_decoder(self, config, dtype, param_dtype, rngs):
        n = config.num_decoder_layers if config.num_decoder_layers is not None else config.num_layers
        self.decoder = T5Stack(config, is_decoder=True, num_layers=n, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def encode(
        self,
        input_ids: Int[Array, "batch src_len"],
        attention_mask: Int[Array, "batch src_len"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch src_len d_model"]:
        """Run the encoder stack on token ids."""
        return self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)


class T5Model(_T5Base):
    """Bare T5 encoder-decoder: ``shared``, ``encoder``, ``decoder``.

    Args:
        config: a ``transformers.T5Config``.
        dtype: computation dtype; ``param_dtype``: parameter dtype; ``rngs``: init / dropout RNGs.
    """

    hf_ignore_unexpected = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)

    def __init__(self, config: Any, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self._build_shared(config, dtype, param_dtype, rngs)
        self._build_encoder(config, dtype, param_dtype, rngs)
        self._build_decoder(config, dtype, param_dtype, rngs)

    def __call__(
        self,
        input_ids: Int[Array, "batch src_len"],
        decoder_input_ids: Int[Array, "batch tgt_len"],
        attention_mask: Int[Array, "batch src_len"] | None = None,
        decoder_attention_mask: Int[Array, "batch tgt_len"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> T5ModelOutput:
        """Encode ``input_ids`` and decode ``decoder_input_ids`` (already shifted right)."""
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic)
        dec = self.decoder(
            self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask, deterministic=deterministic
        )
        return T5ModelOutput(dec, enc)


class T5ForConditionalGeneration(_T5Base):
    """T5 with a language-modelling head (``lm_head``, or ``shared`` when tied).

    With tied embeddings (original T5; transformers 5 records this as
    ``config.scale_decoder_outputs``) the decoder output is scaled by ``d_model ** -0.5`` and
    multiplied with ``shared``; there is no ``lm_head`` module. Untied models (T5 v1.1,
    Flan-T5) have an ``nnx.Linear`` ``lm_head`` and no scaling.

    Args:
        config: a ``transformers.T5Config``.
        tie_word_embeddings: override the config's flag (the loader sets ``False`` when a
            checkpoint marked tied ships a different ``lm_head.weight``).
        dtype, param_dtype, rngs: as in :class:`T5Model`.
    """

    hf_ignore_unexpected = T5Model.hf_ignore_unexpected

    def __init__(self, config: Any, *, tie_word_embeddings: bool | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.scale_decoder_outputs = _tie_flag(config)
        self.tie_word_embeddings = self.scale_decoder_outputs if tie_word_embeddings is None else tie_word_embeddings
        self.model_dim = config.d_model
        self._build_shared(config, dtype, param_dtype, rngs)
        self._build_encoder(config, dtype, param_dtype, rngs)
        self._build_decoder(config, dtype, param_dtype, rngs)
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else nnx.Linear(
                config.d_model, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=_normal(config.initializer_factor * 1.0),
            )
        )

    @classmethod
    def hf_prepare_kwargs(cls, config: Any, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Untie when a checkpoint marked tied carries a distinct ``lm_head.weight`` (HF does the same)."""
        if _tie_flag(config) and "lm_head.weight" in tensors and "shared.weight" in tensors:
            a, b = tensors["lm_head.weight"], tensors["shared.weight"]
            if a.shape != b.shape or not np.array_equal(a, b):
                return {"tie_word_embeddings": False}
        return {}

    def hf_tied_aliases_for_instance(self) -> dict[str, str]:
        aliases = dict(self.hf_tied_aliases)
        if self.tie_word_embeddings:
            aliases["lm_head.weight"] = "shared.weight"
        return aliases

    def __call__(
        self,
        input_ids: Int[Array, "batch src_len"],
        decoder_input_ids: Int[Array, "batch tgt_len"],
        attention_mask: Int[Array, "batch src_len"] | None = None,
        decoder_attention_mask: Int[Array, "batch tgt_len"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch tgt_len vocab"]:
        """Return LM logits ``(batch, tgt_len, vocab)``.

        ``decoder_input_ids`` must already be shifted right (see :func:`shift_right`).
        """
        enc = self.encode(input_ids, attention_mask, deterministic=deterministic)
        dec = self.decoder(
            self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask, deterministic=deterministic
        )
        if self.scale_decoder_outputs:
            dec = dec * (self.model_dim**-0.5)
        if self.lm_head is None:
            return self.shared.attend(dec)
        return self.lm_head(dec)


class T5EncoderModel(_T5Base):
    """Encoder half of T5: ``shared`` + ``encoder``; decoder / LM-head checkpoint keys are ignored."""

    hf_ignore_unexpected = (r"^decoder\.", r"^lm_head\.")

    def __init__(self, config: Any, *, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self._build_shared(config, dtype, param_dtype, rngs)
        self._build_encoder(config, dtype, param_dtype, rngs)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq d_model"]:
        """Return encoder hidden states ``(batch, seq, d_model)``."""
        return self.encode(input_ids, attention_mask, deterministic=deterministic)


class T5EncoderForSequenceClassification(_T5Base):
    """T5 encoder + masked mean pooling + dropout + linear ``classifier`` (for GLUE-style tasks).

    Not an HF class: the ``classifier`` head is always newly initialised; decoder and LM-head
    keys of a full T5 checkpoint are ignored.

    Args:
        config: a ``transformers.T5Config``; ``config.num_labels`` unless ``num_labels`` given.
        num_labels: number of logits.
        dtype, param_dtype, rngs: as in :class:`T5Model`.
    """

    hf_ignore_unexpected = T5EncoderModel.hf_ignore_unexpected
    hf_default_allow_missing = (r"^classifier\.",)

    def __init__(self, config: Any, *, num_labels: int | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.num_labels = int(num_labels if num_labels is not None else config.num_labels)
        self._build_shared(config, dtype, param_dtype, rngs)
        self._build_encoder(config, dtype, param_dtype, rngs)
        self.dropout = make_dropout(getattr(config, "classifier_dropout", 0.0) or 0.0, rngs)
        self.classifier = nnx.Linear(
            config.d_model, self.num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=_normal(config.initializer_factor * config.d_model**-0.5),
        )

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch num_labels"]:
        """Return logits ``(batch, num_labels)``."""
        h = self.encode(input_ids, attention_mask, deterministic=deterministic)
        pooled = self.dropout(mean_pooling(h, attention_mask), deterministic=deterministic)
        return self.classifier(pooled)
