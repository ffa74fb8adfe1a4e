"""Tiny random Hugging Face-layout checkpoints for the model tests.

The parameter names are written out by hand from the HF module trees (not derived from
``lorapro_jax.models``), so a naming mistake in the NNX ports shows up as a load error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from transformers import BertConfig, LlamaConfig, T5Config


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=71,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        hidden_dropout_prob=0.3,
        attention_probs_dropout_prob=0.3,
        num_labels=2,
    )


def bert_state_dict(cfg: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    hs, inter = cfg.hidden_size, cfg.intermediate_size
    sd = {
        "embeddings.word_embeddings.weight": w(cfg.vocab_size, hs, std=1.0),
        "embeddings.position_embeddings.weight": w(cfg.max_position_embeddings, hs, std=0.5),
        "embeddings.token_type_embeddings.weight": w(cfg.type_vocab_size, hs, std=0.5),
        "embeddings.position_ids": np.arange(cfg.max_position_embeddings, dtype=np.int64)[None],  # HF buffer
    }

    def ln(name):
        sd[name + ".weight"] = (1.0 + 0.1 * rng.standard_normal(hs)).astype(np.float32)
        sd[name + ".bias"] = w(hs, std=0.1)

    def lin(name, n_out, n_in):
        sd[name + ".weight"] = w(n_out, n_in)
        sd[name + ".bias"] = w(n_out, std=0.1)

    ln("embeddings.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            lin(p + "attention.self." + m, hs, hs)
        lin(p + "attention.output.dense", hs, hs)
        ln(p + "attention.output.LayerNorm")
        lin(p + "intermediate.dense", inter, hs)
        lin(p + "output.dense", hs, inter)
        ln(p + "output.LayerNorm")
    lin("pooler.dense", hs, hs)
    return sd


def tiny_t5_config(*, feed_forward_proj: str = "relu", tied: bool = True, num_decoder_layers: int = 3) -> T5Config:
    return T5Config(
        vocab_size=61,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=num_decoder_layers,
        num_heads=4,
        # small bucket count so that short test sequences reach the logarithmic buckets
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        num_labels=3,
    )


def t5_state_dict(cfg: T5Config, seed: int = 0, *, tied: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(cfg.d_model)).astype(np.float32)

    d, inner, ff, h = cfg.d_model, cfg.d_kv * cfg.num_heads, cfg.d_ff, cfg.num_heads
    gated = cfg.feed_forward_proj.startswith("gated-")
    sd: dict[str, np.ndarray] = {"shared.weight": w(cfg.vocab_size, d, std=1.0)}

    def attn(prefix):
        sd[prefix + "q.weight"] = w(inner, d)
        sd[prefix + "k.weight"] = w(inner, d)
        sd[prefix + "v.weight"] = w(inner, d)
        sd[prefix + "o.weight"] = w(d, inner)

    def ffn(prefix):
        if gated:
            sd[prefix + "DenseReluDense.wi_0.weight"] = w(ff, d)
            sd[prefix + "DenseReluDense.wi_1.weight"] = w(ff, d)
        else:
            sd[prefix + "DenseReluDense.wi.weight"] = w(ff, d)
        sd[prefix + "DenseReluDense.wo.weight"] = w(d, ff)
        sd[prefix + "layer_norm.weight"] = norm()

    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            p = f"{stack}.block.{i}.layer."
            attn(p + "0.SelfAttention.")
            sd[p + "0.layer_norm.weight"] = norm()
            if i == 0:
                sd[p + "0.SelfAttention.relative_attention_bias.weight"] = w(cfg.relative_attention_num_buckets, h, std=1.0)
            if stack == "decoder":
                attn(p + "1.EncDecAttention.")
                sd[p + "1.layer_norm.weight"] = norm()
                ffn(p + "2.")
            else:
                ffn(p + "1.")
        sd[f"{stack}.final_layer_norm.weight"] = norm()
    if not tied:
        sd["lm_head.weight"] = w(cfg.vocab_size, d, std=0.5)
    return sd


def tiny_llama_config(*, tied: bool = False, **kw) -> LlamaConfig:
    base = {
        "vocab_size": 53,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000.0,
        "tie_word_embeddings": tied,
        "pad_token_id": 0,
        "num_labels": 4,
        "architectures": ["LlamaForCausalLM"],
    }
    base.update(kw)
    return LlamaConfig(**base)


def llama_state_dict(cfg: LlamaConfig, seed: int = 0, *, tied: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(cfg.hidden_size)).astype(np.float32)

    hs, hd = cfg.hidden_size, cfg.head_dim
    nq, nkv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": w(cfg.vocab_size, hs, std=1.0)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(nq, hs)
        sd[p + "self_attn.k_proj.weight"] = w(nkv, hs)
        sd[p + "self_attn.v_proj.weight"] = w(nkv, hs)
        sd[p + "self_attn.o_proj.weight"] = w(hs, nq)
        sd[p + "mlp.gate_proj.weight"] = w(inter, hs)
        sd[p + "mlp.up_proj.weight"] = w(inter, hs)
        sd[p + "mlp.down_proj.weight"] = w(hs, inter)
        sd[p + "input_layernorm.weight"] = norm()
        sd[p + "post_attention_layernorm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    if not tied:
        sd["lm_head.weight"] = w(cfg.vocab_size, hs, std=0.5)
    return sd


def write_checkpoint(directory: Path, cfg, sd: dict[str, np.ndarray], *, shards: int = 1) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (or ``shards`` files plus an index)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(directory))
    if shards == 1:
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    keys = sorted(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory
