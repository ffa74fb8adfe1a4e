"""Local labelled text: formats, column mapping and a stable label vocabulary."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lorapro_jax.data import label_names, load_text_dataset


def _csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_string_labels_sorted_vocabulary_shared_across_splits(tmp_path):
    train = _csv(tmp_path / "train.csv", ["review", "sentiment", "extra"],
                 [["good", "pos", 1], ["bad", "neg", 2], ["so-so", "neutral", 3], ["ok", "pos", 4]])
    # Validation sees only some labels and in another order; ids must not change.
    val = _csv(tmp_path / "val.csv", ["review", "sentiment", "extra"],
               [["fine", "pos", 5], ["awful", "neg", 6]])
    dd = load_text_dataset({"train": train, "validation": val}, text_column="review",
                           label_column="sentiment", cache_dir=tmp_path / "c")
    assert label_names(dd) == ["neg", "neutral", "pos"]
    assert dd["train"].column_names == ["text", "label"]
    assert dd["train"]["label"] == [2, 0, 1, 2]
    assert dd["validation"]["label"] == [2, 0]
    assert dd["validation"].features["label"].names == ["neg", "neutral", "pos"]
    one = load_text_dataset({"train": train, "validation": val}, text_column="review",
                            label_column="sentiment", split="validation",
                            cache_dir=tmp_path / "c")
    assert one["label"] == [2, 0]


def test_jsonl_pairs_and_fixed_label_names(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as fh:
        for a, b, lab in [("a", "b", "yes"), ("c", "d", "no")]:
            fh.write(json.dumps({"s1": a, "s2": b, "y": lab}) + "\n")
    ds = load_text_dataset(str(path), text_column="s1", text_pair_column="s2", label_column="y",
                           label_names=["yes", "no"], cache_dir=tmp_path / "c")
    assert ds.column_names == ["text", "text_pair", "label"]
    assert ds["label"] == [0, 1]
    assert ds["text_pair"] == ["b", "d"]
    with pytest.raises(ValueError, match="not in label_names"):
        load_text_dataset(str(path), text_column="s1", label_column="y",
                          label_names=["yes"], cache_dir=tmp_path / "c")


def test_parquet_int_and_float_labels(tmp_path):
    import datasets

    p_int = tmp_path / "i.parquet"
    datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [2, 0, 1]}).to_parquet(str(p_int))
    ds = load_text_dataset(str(p_int), cache_dir=tmp_path / "c")
    assert ds["label"] == [2, 0, 1]
    assert label_names(ds) == ["0", "1", "2"]

    p_f = tmp_path / "f.parquet"
    datasets.Dataset.from_dict({"text": ["x", "y"], "score": [0.5, 2.0]}).to_parquet(str(p_f))
    ds = load_text_dataset(str(p_f), label_column="score", cache_dir=tmp_path / "c")
    assert ds.features["label"].dtype == "float32"
    np.testing.assert_allclose(ds["label"], [0.5, 2.0])
    assert label_names(ds) == []


def test_missing_column_is_reported(tmp_path):
    path = _csv(tmp_path / "a.csv", ["body", "label"], [["x", "a"]])
    with pytest.raises(ValueError, match=r"\['text'\] not found"):
        load_text_dataset(path, cache_dir=tmp_path / "c")
