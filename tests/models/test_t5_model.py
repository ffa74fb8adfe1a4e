"""T5 port vs. an independent NumPy forward on tiny random HF-layout checkpoints."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx
from hf_tiny import t5_state_dict, tiny_t5_config, write_checkpoint

from lorapro_jax.models import (
    DEFAULT_LORA_TARGETS,
    T5EncoderForSequenceClassification,
    T5ForConditionalGeneration,
    load_pretrained,
    relative_position_bucket,
    shift_right,
    to_hf_state_dict,
)


def _inputs(seed=1, vocab=61):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (2, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    dec = rng.integers(2, vocab, (2, 11))
    dec_mask = np.ones_like(dec)
    dec_mask[0, 7:] = 0
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize(("ff", "tied"), [("relu", True), ("gated-gelu", False)])
def test_t5_conditional_generation_matches_numpy(tmp_path, ff, tied):
    cfg = tiny_t5_config(feed_forward_proj=ff, tied=tied)
    sd = t5_state_dict(cfg, seed=0, tied=tied)
    if tied:  # old-style checkpoints also carry the tied copies; they must be accepted
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"].copy()
        sd["decoder.embed_tokens.weight"] = sd["shared.weight"].copy()
        sd["lm_head.weight"] = sd["shared.weight"].copy()
    path = write_checkpoint(tmp_path / "t5", cfg, sd)
    model = load_pretrained("t5", path)
    assert isinstance(model, T5ForConditionalGeneration)
    assert model.tie_word_embeddings == tied and (model.lm_head is None) == tied
    assert len(model.encoder.block) == 2 and len(model.decoder.block) == 3

    ids, mask, dec, dec_mask = _inputs()
    logits = nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(a) for a in (ids, dec, mask, dec_mask)))
    ref, _, _ = R.t5_forward(sd, model.config, ids, mask, dec, dec_mask, tied=tied)
    assert logits.shape == (2, 11, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)

    # Export: HF names, (out, in) layout, bit-exact, tied copies not duplicated.
    exported = to_hf_state_dict(model)
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} | ({"lm_head.weight"} if tied else set())
    assert set(exported) == set(sd) - aliases
    for k, v in exported.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
        np.testing.assert_array_equal(v, sd[k])


def test_t5_linear_paths_and_lora_targets(tmp_path):
    cfg = tiny_t5_config(feed_forward_proj="gated-gelu", tied=False)
    model = nnx.eval_shape(lambda: T5ForConditionalGeneration(cfg))
    linears = {".".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
    sd = t5_state_dict(cfg, tied=False)
    assert {n + ".weight" for n in linears} == {k for k in sd if not re.search(r"(layer_norm|shared|relative)", k)}
    # PEFT / LoraConfig use re.fullmatch; the regex must select the same layers either way.
    assert {n for n in linears if re.fullmatch(DEFAULT_LORA_TARGETS["t5"], n)} == {
        n for n in linears if re.search(DEFAULT_LORA_TARGETS["t5"], n)
    }
    targets = {n for n in linears if re.search(DEFAULT_LORA_TARGETS["t5"], n)}
    expected = {f"encoder.block.{i}.layer.0.SelfAttention.{m}" for i in range(2) for m in "qv"}
    expected |= {f"decoder.block.{i}.layer.{j}.{a}.{m}" for i in range(3) for j, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qv"}
    assert targets == expected


def test_t5_encoder_classifier_loads_full_checkpoint(tmp_path):
    cfg = tiny_t5_config(feed_forward_proj="relu", tied=True)
    sd = t5_state_dict(cfg, seed=3, tied=True)
    path = write_checkpoint(tmp_path / "t5", cfg, sd)
    model = load_pretrained(T5EncoderForSequenceClassification, path, rngs=nnx.Rngs(params=2))
    assert not hasattr(model, "decoder")
    ids, mask, dec, dec_mask = _inputs(seed=4)
    logits = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    _, _, enc = R.t5_forward(sd, model.config, ids, mask, dec, dec_mask, tied=True)
    head = to_hf_state_dict(model)
    ref = R.masked_mean(enc, mask) @ head["classifier.weight"].T.astype(np.float64) + head["classifier.bias"]
    assert logits.shape == (2, cfg.num_labels)
    np.testing.assert_allclose(logits, ref, atol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_scalar_rule(bidirectional):
    nb, md = 32, 128
    rel = np.arange(-300, 301)
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md))
    # Skip the handful of distances that sit exactly on a bucket boundary, where float32 vs
    # float64 rounding of log() legitimately differs.
    n_b = nb // 2 if bidirectional else nb
    checked = 0
    for r, g in zip(rel, got):
        n = abs(r) if bidirectional else max(-r, 0)
        if n >= n_b // 2:
            x = math.log(n / (n_b // 2)) / math.log(md / (n_b // 2)) * (n_b - n_b // 2)
            if abs(x - round(x)) < 1e-4:
                continue
        assert g == R.t5_bucket(int(r), bidirectional, nb, md), r
        checked += 1
    assert checked > 550
    assert got.min() == 0 and got.max() == nb - 1


def test_shift_right():
    labels = jnp.array([[5, 6, -100, -100], [7, 8, 9, 1]])
    np.testing.assert_array_equal(np.asarray(shift_right(labels, 0, 0)), [[0, 5, 6, 0], [0, 7, 8, 9]])
