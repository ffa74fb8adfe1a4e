"""GLUE metadata, fast offline failure, and loading from local files."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from lorapro_jax.data import GLUE_TASKS, GlueUnavailableError, get_glue_task, load_glue


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def test_task_metadata():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert get_glue_task("SST-2") is GLUE_TASKS["sst2"]
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.is_pair
    assert stsb.metrics[:2] == ("pearson", "spearman")
    mnli = GLUE_TASKS["mnli"]
    assert mnli.num_labels == 3 and mnli.sentence_keys == ("premise", "hypothesis")
    assert GLUE_TASKS["cola"].primary_metric == "matthews_corrcoef"
    assert GLUE_TASKS["qqp"].text_pair_column == "question2"
    assert GLUE_TASKS["sst2"].text_pair_column is None
    for info in GLUE_TASKS.values():
        assert len(info.label_names) == (0 if info.is_regression else info.num_labels)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        get_glue_task("wnli2")


def test_offline_without_local_files_fails_fast_with_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(GlueUnavailableError) as exc:
        load_glue("sst2", "train", cache_dir=tmp_path / "empty_cache")
    assert time.perf_counter() - t0 < 10.0
    msg = str(exc.value)
    assert "data_files" in msg and "HF_HUB_OFFLINE" in msg
    assert "sentence, label" in msg


def test_offline_env_set_after_import_still_fails_fast(monkeypatch, tmp_path):
    """datasets/huggingface_hub read the env at import; load_glue must honour it at call time."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(GlueUnavailableError, match="Pass local files"):
        load_glue("mnli", "validation", cache_dir=tmp_path / "empty_cache")
    assert time.perf_counter() - t0 < 10.0
    # Module flags are restored afterwards.
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


def test_bad_split_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no split"):
        load_glue("sst2", "dev", data_files=str(tmp_path / "x.csv"))


def test_local_csv_dict_of_splits(tmp_path):
    train = _write_csv(tmp_path / "train.csv", ["sentence", "label"],
                       [["a fine film, really", 1], ["dull", 0], ["great", 1]])
    val = _write_csv(tmp_path / "val.csv", ["sentence", "label"], [["meh", 0]])
    files = {"train": str(train), "validation": str(val)}
    ds = load_glue("sst2", "train", cache_dir=tmp_path / "c", data_files=files)
    assert len(ds) == 3
    assert ds["sentence"][0] == "a fine film, really"
    assert ds["label"] == [1, 0, 1]
    assert ds.features["label"].dtype == "int64"
    ds = load_glue("sst2", "validation", cache_dir=tmp_path / "c", data_files=files)
    assert ds["label"] == [0]
    ds = load_glue("sst2", "train[:2]", cache_dir=tmp_path / "c", data_files=files)
    assert len(ds) == 2


def test_local_jsonl_pair_task_with_string_labels(tmp_path):
    recs = [
        {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": "entailment"},
        {"premise": "A man sleeps.", "hypothesis": "A man runs.", "label": "contradiction"},
        {"premise": "A cat.", "hypothesis": "A black cat.", "label": "neutral"},
    ]
    path = _write_jsonl(tmp_path / "dev.jsonl", recs)
    # MNLI "validation" means validation_matched; the dict key may use either name.
    ds = load_glue("mnli", "validation", cache_dir=tmp_path / "c",
                   data_files={"validation": str(path)})
    assert ds["label"] == [0, 2, 1]
    assert ds.column_names[:2] == ["premise", "hypothesis"]
    ds = load_glue("mnli", "validation", cache_dir=tmp_path / "c",
                   data_files={"validation_matched": str(path)})
    assert len(ds) == 3


def test_local_parquet_stsb_float_labels(tmp_path):
    import datasets

    path = tmp_path / "stsb.parquet"
    datasets.Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 1.0]}
    ).to_parquet(str(path))
    ds = load_glue("stsb", "train", cache_dir=tmp_path / "c", data_files=str(path))
    assert ds.features["label"].dtype == "float32"
    np.testing.assert_allclose(ds["label"], [4.5, 1.0])


def test_local_tsv_without_labels_and_column_map(tmp_path):
    path = _write_csv(tmp_path / "test.tsv", ["q", "s"],
                      [["Who?", "Him \"quoted\"."], ["Why?", "Because."]], delimiter="\t")
    ds = load_glue("qnli", "test", cache_dir=tmp_path / "c", data_files=[str(path)],
                   column_map={"q": "question", "s": "sentence"})
    assert ds["label"] == [-1, -1]
    assert ds["question"] == ["Who?", "Why?"]


def test_local_files_validation_errors(tmp_path):
    bad_cols = _write_csv(tmp_path / "a.csv", ["text", "label"], [["x", 0]])
    with pytest.raises(ValueError, match="lack column"):
        load_glue("cola", "train", cache_dir=tmp_path / "c", data_files=str(bad_cols))
    bad_label = _write_csv(tmp_path / "b.csv", ["sentence", "label"], [["x", 7]])
    with pytest.raises(ValueError, match="labels of 'cola'"):
        load_glue("cola", "train", cache_dir=tmp_path / "c", data_files=str(bad_label))
    with pytest.raises(FileNotFoundError):
        load_glue("cola", "train", data_files=str(tmp_path / "missing.csv"))
    txt = tmp_path / "a.txt"
    txt.write_text("sentence,label\nx,0\n")
    with pytest.raises(ValueError, match="infer the format"):
        load_glue("cola", "train", data_files=str(txt))
    with pytest.raises(KeyError):
        load_glue("cola", "validation", data_files={"train": str(bad_cols)})
