"""Independent float64 NumPy reference forwards working directly on HF-layout state dicts.

Written from the published architectures (and HF's modeling files for conventions), sharing no
code with ``lorapro_jax.models``: weights stay in torch layout ``(out, in)``, heads are split
with explicit transposes, GQA uses ``np.repeat`` and T5 buckets are computed with scalar Python
math.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def f64(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in sd.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}


def linear(x, sd, name, bias=True):
    y = x @ sd[name + ".weight"].T
    if bias and (name + ".bias") in sd:
        y = y + sd[name + ".bias"]
    return y


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def gelu_erf(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTS = {"gelu": gelu_erf, "gelu_new": gelu_tanh, "relu": lambda x: np.maximum(x, 0.0), "silu": lambda x: x / (1 + np.exp(-x))}

NEG = -1e30


def split_heads(x, n):  # (B, S, n*D) -> (B, n, S, D)
    b, s, hd = x.shape
    return x.reshape(b, s, n, hd // n).transpose(0, 2, 1, 3)


def merge_heads(x):  # (B, n, S, D) -> (B, S, n*D)
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


# ----------------------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------------------


def bert_forward(sd, cfg, input_ids, attention_mask, token_type_ids=None):
    """Return (last_hidden_state, pooler_output or None)."""
    sd = f64(sd)
    ids = np.asarray(input_ids)
    _, s = ids.shape
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    eps = cfg.layer_norm_eps
    h = (
        sd["embeddings.word_embeddings.weight"][ids]
        + sd["embeddings.position_embeddings.weight"][np.arange(s)][None]
        + sd["embeddings.token_type_embeddings.weight"][tt]
    )
    h = layer_norm(h, sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps)
    n = cfg.num_attention_heads
    add_mask = np.where(np.asarray(attention_mask)[:, None, None, :] > 0, 0.0, NEG)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q = split_heads(linear(h, sd, p + "attention.self.query"), n)
        k = split_heads(linear(h, sd, p + "attention.self.key"), n)
        v = split_heads(linear(h, sd, p + "attention.self.value"), n)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + add_mask
        ctx = merge_heads(softmax(scores) @ v)
        a = linear(ctx, sd, p + "attention.output.dense")
        h = layer_norm(a + h, sd[p + "attention.output.LayerNorm.weight"], sd[p + "attention.output.LayerNorm.bias"], eps)
        inter = ACTS[cfg.hidden_act](linear(h, sd, p + "intermediate.dense"))
        o = linear(inter, sd, p + "output.dense")
        h = layer_norm(o + h, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps)
    pooled = np.tanh(linear(h[:, 0], sd, "pooler.dense")) if "pooler.dense.weight" in sd else None
    return h, pooled


def masked_mean(h, mask):
    m = np.asarray(mask, dtype=np.float64)[..., None]
    return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


# ----------------------------------------------------------------------------------------------
# T5
# ----------------------------------------------------------------------------------------------


def t5_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Scalar re-statement of the Mesh-TF bucketing rule."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(val, num_buckets - 1)


def t5_bias(table, q_len, k_len, bidirectional, cfg):
    out = np.zeros((table.shape[1], q_len, k_len))
    for i in range(q_len):
        for j in range(k_len):
            bk = t5_bucket(j - i, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
            out[:, i, j] = table[bk]
    return out[None]


def t5_attn(sd, prefix, x, kv, n_heads, bias, add_mask):
    q = split_heads(linear(x, sd, prefix + "q", bias=False), n_heads)
    k = split_heads(linear(kv, sd, prefix + "k", bias=False), n_heads)
    v = split_heads(linear(kv, sd, prefix + "v", bias=False), n_heads)
    scores = q @ k.transpose(0, 1, 3, 2) + bias + add_mask  # no 1/sqrt(d) in T5
    return linear(merge_heads(softmax(scores) @ v), sd, prefix + "o", bias=False)


def t5_ff(sd, prefix, x, cfg):
    proj = cfg.feed_forward_proj
    if proj.startswith("gated-"):
        act = ACTS["gelu_new" if proj == "gated-gelu" else proj.split("-")[1]]
        hmid = act(linear(x, sd, prefix + "wi_0", bias=False)) * linear(x, sd, prefix + "wi_1", bias=False)
    else:
        hmid = ACTS[proj](linear(x, sd, prefix + "wi", bias=False))
    return linear(hmid, sd, prefix + "wo", bias=False)


def t5_stack(sd, cfg, name, x, mask, n_layers, enc=None, enc_mask=None):
    eps = cfg.layer_norm_epsilon
    is_dec = name == "decoder"
    s = x.shape[1]
    add = np.where(np.asarray(mask)[:, None, None, :] > 0, 0.0, NEG)
    if is_dec:
        add = add + np.where(np.tril(np.ones((s, s))) > 0, 0.0, NEG)[None, None]
    bias = t5_bias(sd[f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"], s, s, not is_dec, cfg)
    h = x
    for i in range(n_layers):
        p = f"{name}.block.{i}.layer."
        hn = rms_norm(h, sd[p + "0.layer_norm.weight"], eps)
        h = h + t5_attn(sd, p + "0.SelfAttention.", hn, hn, cfg.num_heads, bias, add)
        ff_idx = 1
        if is_dec:
            enc_add = np.where(np.asarray(enc_mask)[:, None, None, :] > 0, 0.0, NEG)
            hn = rms_norm(h, sd[p + "1.layer_norm.weight"], eps)
            h = h + t5_attn(sd, p + "1.EncDecAttention.", hn, enc, cfg.num_heads, 0.0, enc_add)
            ff_idx = 2
        h = h + t5_ff(sd, f"{p}{ff_idx}.DenseReluDense.", rms_norm(h, sd[f"{p}{ff_idx}.layer_norm.weight"], eps), cfg)
    return rms_norm(h, sd[f"{name}.final_layer_norm.weight"], eps)


def t5_forward(sd, cfg, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, tied: bool):
    """Return (lm_logits, decoder_hidden, encoder_hidden)."""
    sd = f64(sd)
    emb = sd["shared.weight"]
    enc = t5_stack(sd, cfg, "encoder", emb[np.asarray(input_ids)], attention_mask, cfg.num_layers)
    dec = t5_stack(
        sd, cfg, "decoder", emb[np.asarray(decoder_input_ids)], decoder_attention_mask, cfg.num_decoder_layers,
        enc=enc, enc_mask=attention_mask,
    )
    if tied:
        logits = (dec * cfg.d_model**-0.5) @ emb.T
    else:
        logits = dec @ sd["lm_head.weight"].T
    return logits, dec, enc


# ----------------------------------------------------------------------------------------------
# Llama
# ----------------------------------------------------------------------------------------------


def llama_inv_freq(cfg):
    hd = cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    return 1.0 / theta ** (np.arange(0, hd, 2) / hd)


def rotate(x, pos, inv_freq):  # x: (B, n, S, D)
    ang = pos[:, None] * inv_freq[None, :]  # (S, D/2)
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    # rotate_half convention: pair (i, i + D/2)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama_forward(sd, cfg, input_ids, attention_mask):
    """Return final normed hidden states (B, S, H) of the base model (keys prefixed ``model.``)."""
    sd = f64(sd)
    ids = np.asarray(input_ids)
    _, s = ids.shape
    h = sd["model.embed_tokens.weight"][ids]
    n, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    pos = np.arange(s, dtype=np.float64)
    inv = llama_inv_freq(cfg)
    allowed = np.tril(np.ones((s, s), bool))[None, None] & (np.asarray(attention_mask)[:, None, None, :] > 0)
    add = np.where(allowed, 0.0, NEG)
    eps = cfg.rms_norm_eps
    act = ACTS[cfg.hidden_act]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, sd[p + "input_layernorm.weight"], eps)
        q = rotate(split_heads(linear(x, sd, p + "self_attn.q_proj"), n), pos, inv)
        k = rotate(split_heads(linear(x, sd, p + "self_attn.k_proj"), nkv), pos, inv)
        v = split_heads(linear(x, sd, p + "self_attn.v_proj"), nkv)
        k = np.repeat(k, n // nkv, axis=1)
        v = np.repeat(v, n // nkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + add
        h = h + linear(merge_heads(softmax(scores) @ v), sd, p + "self_attn.o_proj")
        x = rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        mlp = act(linear(x, sd, p + "mlp.gate_proj")) * linear(x, sd, p + "mlp.up_proj")
        h = h + linear(mlp, sd, p + "mlp.down_proj")
    return rms_norm(h, sd["model.norm.weight"], eps)
