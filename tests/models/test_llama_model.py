"""Llama port vs. an independent NumPy forward on tiny random HF-layout checkpoints (GQA)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint

from lorapro_jax.models import (
    DEFAULT_LORA_TARGETS,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    load_pretrained,
    rope_inv_freq,
    to_hf_state_dict,
)


def _inputs(seed=2, vocab=53):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (3, 9))  # no real token equals pad_token_id=0
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


_fwd = nnx.jit(lambda m, ids, mask: m(ids, mask))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    cfg = tiny_llama_config(tied=False)
    sd = llama_state_dict(cfg, seed=0, tied=False)
    return cfg, sd, write_checkpoint(tmp_path_factory.mktemp("llama"), cfg, sd)


def test_llama_causal_lm_matches_numpy(untied):
    cfg, sd, path = untied
    model = load_pretrained("auto", path)  # config.architectures -> LlamaForCausalLM
    assert isinstance(model, LlamaForCausalLM) and model.lm_head is not None
    attn = model.model.layers[0].self_attn
    assert (attn.n_heads, attn.n_kv, attn.head_dim) == (4, 2, 8)  # grouped-query attention
    ids, mask = _inputs()
    logits = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    h = R.llama_forward(sd, model.config, ids, mask)
    ref = h @ sd["lm_head.weight"].T.astype(np.float64)
    assert logits.shape == (3, 9, cfg.vocab_size)
    real = mask.astype(bool)  # padded query rows are unspecified; compare real tokens
    np.testing.assert_allclose(logits[real], ref[real], atol=1e-4, rtol=1e-4)
    # Causality: changing a future token does not change earlier logits.
    ids2 = ids.copy()
    ids2[1, 5] = (ids2[1, 5] % 50) + 1
    logits2 = np.asarray(_fwd(model, jnp.asarray(ids2), jnp.asarray(mask)))
    np.testing.assert_allclose(logits2[1, :5], logits[1, :5], atol=1e-6)
    assert not np.allclose(logits2[1, 5:], logits[1, 5:])


def test_llama_paths_targets_and_export(untied):
    cfg, sd, path = untied
    model = load_pretrained(LlamaForCausalLM, path)
    linears = {".".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
    assert {n + ".weight" for n in linears} == {k for k in sd if not re.search(r"(norm|embed_tokens)", k)}
    # PEFT / LoraConfig use re.fullmatch; the regex must select the same layers either way.
    assert {n for n in linears if re.fullmatch(DEFAULT_LORA_TARGETS["llama"], n)} == {
        n for n in linears if re.search(DEFAULT_LORA_TARGETS["llama"], n)
    }
    targets = {n for n in linears if re.search(DEFAULT_LORA_TARGETS["llama"], n)}
    assert targets == linears - {"lm_head"} and len(targets) == 7 * cfg.num_hidden_layers
    exported = to_hf_state_dict(model)
    assert set(exported) == set(sd)
    for k, v in exported.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
        np.testing.assert_array_equal(v, sd[k])


def test_llama_tied_embeddings(tmp_path):
    cfg = tiny_llama_config(tied=True, rope_theta=500.0)
    sd = llama_state_dict(cfg, seed=5, tied=True)
    ids, mask = _inputs(seed=6)
    h = R.llama_forward(sd, cfg, ids, mask)
    real = mask.astype(bool)

    tied = load_pretrained("LlamaForCausalLM", write_checkpoint(tmp_path / "a", cfg, sd))
    assert tied.lm_head is None and "lm_head.weight" not in to_hf_state_dict(tied)
    ref = h @ sd["model.embed_tokens.weight"].T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(_fwd(tied, jnp.asarray(ids), jnp.asarray(mask)))[real], ref[real], atol=1e-4)

    # A config that says "tied" but ships a different lm_head is untied on load (HF behaviour).
    sd2 = dict(sd, **{"lm_head.weight": np.ones_like(sd["model.embed_tokens.weight"]) * 0.01})
    untied = load_pretrained("LlamaForCausalLM", write_checkpoint(tmp_path / "b", cfg, sd2))
    assert untied.lm_head is not None
    ref2 = h @ sd2["lm_head.weight"].T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(_fwd(untied, jnp.asarray(ids), jnp.asarray(mask)))[real], ref2[real], atol=1e-4)


def test_llama_sequence_classification_last_token(untied):
    cfg, sd, path = untied
    # Base checkpoint of a causal LM: lm_head is ignored, the ``score`` head is new.
    model = load_pretrained(LlamaForSequenceClassification, path, rngs=nnx.Rngs(params=3))
    assert model.score.kernel.shape == (cfg.hidden_size, cfg.num_labels)
    ids, mask = _inputs()
    score = to_hf_state_dict(model)["score.weight"].astype(np.float64)
    h = R.llama_forward(sd, model.config, ids, mask)
    last = mask.sum(1) - 1  # right padding
    ref = h[np.arange(3), last] @ score.T
    np.testing.assert_allclose(np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask))), ref, atol=1e-4)
    # Without a mask, HF's rule applies: right-most token that is not pad_token_id.
    no_mask = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(no_mask), ref, atol=1e-4)


def test_rope_inv_freq_variants():
    cfg = tiny_llama_config(rope_theta=1000.0)
    np.testing.assert_allclose(rope_inv_freq(cfg), 1000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    lin = tiny_llama_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0})
    np.testing.assert_allclose(rope_inv_freq(lin), rope_inv_freq(cfg) / 4.0, rtol=1e-6)
    with pytest.raises(NotImplementedError, match="rope_type"):
        rope_inv_freq(tiny_llama_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}))
