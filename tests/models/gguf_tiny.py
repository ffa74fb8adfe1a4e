"""Write a tiny Llama as a GGUF file the way llama.cpp's converter does, for the GGUF loader tests.

The llama.cpp names and the q/k row permutation are written out here by hand from llama.cpp's
``convert_hf_to_gguf.py`` conventions (not derived from :mod:`lorapro_jax.models.gguf`), so a mapping
mistake in the loader shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows ``[half0 | half1]`` become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.<module>.weight
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{i}.{_PARTS[module]}.{leaf}"


def write_gguf(path: Path, cfg, sd: dict[str, np.ndarray], *, embed_q8: bool = False) -> Path:
    """Write ``sd`` (HF names, torch layout) as a llama-architecture GGUF file at ``path``.

    ``embed_q8``: store the token embedding as ``Q8_0`` (everything else is F32).
    """
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for hf, arr in sd.items():
        name = gguf_name(hf)
        arr = np.ascontiguousarray(arr, np.float32)
        if ".attn_q." in name:
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif ".attn_k." in name:
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if embed_q8 and name == "token_embd.weight":
            w.add_tensor(name, quantize(arr, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
