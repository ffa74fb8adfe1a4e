"""Debian fortunes preparation, on a small synthetic '%'-separated tree (CI never needs the package)."""

import csv
import gzip
import json

import pytest

from lorapro_jax.data.fortunes import (
    find_fortunes_dir,
    fortunes_package_version,
    load_fortunes,
    prepare_fortunes,
    read_fortune_file,
    split_fortunes,
)


def _entries(prefix: str, n: int) -> list[str]:
    return [f"{prefix} number {i} is a fine short fortune text." for i in range(n)]


@pytest.fixture()
def root(tmp_path):
    """An extracted-package layout: ROOT/usr/share/games/fortunes/<category> + .dat + .u8 links."""
    folder = tmp_path / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    shared = "This exact text sits in two categories and must go."
    alpha = _entries("alpha", 12) + [shared, "alpha number 0 is a fine short fortune text.", "x" * 500, "short"]
    beta = _entries("beta", 10) + [shared]
    gamma = _entries("gamma", 3)
    for name, entries in {"alpha": alpha, "beta": beta, "gamma": gamma}.items():
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n")
        (folder / f"{name}.dat").write_bytes(b"\x00\x00\x00\x02junk")
        (folder / f"{name}.u8").symlink_to(name)
    doc = tmp_path / "usr/share/doc/fortunes"
    doc.mkdir(parents=True)
    with gzip.open(doc / "changelog.Debian.gz", "wt") as f:
        f.write("fortune-mod (1:9.9-1) unstable; urgency=low\n\n  * test\n")
    return tmp_path


def test_read_fortune_file_splits_on_percent_lines_and_cleans(tmp_path):
    path = tmp_path / "cat"
    path.write_text("First line\n  continued\t here.\n%\n\n%\nB\x08Bo\x08ol\x08ld\n\t\t-- Someone\n%  \nlast, no trailing %")
    assert read_fortune_file(path) == ["First line continued here.", "Bold -- Someone", "last, no trailing %"]


def test_find_fortunes_dir_accepts_root_or_folder_and_explains_missing(root, tmp_path):
    folder = root / "usr/share/games/fortunes"
    assert find_fortunes_dir(root) == folder
    assert find_fortunes_dir(folder) == folder
    with pytest.raises(FileNotFoundError, match="apt-get download fortunes"):
        find_fortunes_dir(tmp_path / "nowhere")


def test_load_fortunes_filters_dedups_and_drops_small_categories(root):
    data = load_fortunes(root, min_chars=10, max_chars=100, min_per_class=5)
    assert sorted(data) == ["alpha", "beta"]  # gamma has 3 < 5; .dat / .u8 are not categories
    assert data["alpha"] == sorted(_entries("alpha", 12))  # duplicate kept once; long, short, shared dropped
    assert data["beta"] == sorted(_entries("beta", 10))
    assert all("two categories" not in t for texts in data.values() for t in texts)
    capped = load_fortunes(root, min_chars=10, max_chars=100, min_per_class=5, max_per_class=6, seed=3)
    assert [len(v) for v in capped.values()] == [6, 6]
    assert set(capped["alpha"]) <= set(data["alpha"])
    assert capped == load_fortunes(root, min_chars=10, max_chars=100, min_per_class=5, max_per_class=6, seed=3)
    with pytest.raises(ValueError, match="'nope'"):
        load_fortunes(root, categories=["alpha", "nope"])
    with pytest.raises(ValueError, match="no category"):
        load_fortunes(root, min_per_class=1000)


def test_split_is_stratified_disjoint_and_seeded():
    data = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(11)]}
    rows = split_fortunes(data, fractions=(0.6, 0.2, 0.2), seed=0)
    counts = {s: {c: sum(r["label"] == c for r in rows[s]) for c in data} for s in rows}
    assert counts == {"train": {"a": 12, "b": 7}, "validation": {"a": 4, "b": 2}, "test": {"a": 4, "b": 2}}
    texts = [r["text"] for s in rows for r in rows[s]]
    assert sorted(texts) == sorted(data["a"] + data["b"])  # a partition: nothing lost, nothing shared
    assert all(r["text"][0] == r["label"] for s in rows for r in rows[s])
    assert rows == split_fortunes(data, fractions=(0.6, 0.2, 0.2), seed=0)
    assert rows != split_fortunes(data, fractions=(0.6, 0.2, 0.2), seed=1)
    with pytest.raises(ValueError, match="fractions"):
        split_fortunes(data, fractions=(0.5, 0.5, 0.0))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_prepare_writes_files_that_load_text_dataset_reads(root, tmp_path, fmt):
    from lorapro_jax.data import label_names, load_text_dataset

    out = tmp_path / f"out-{fmt}"
    meta = prepare_fortunes(out, root, fmt=fmt, seed=0, min_chars=10, max_chars=100, min_per_class=5)
    assert meta["debian_packages"] == {"fortunes": "1:9.9-1"}
    assert meta["classes"] == ["alpha", "beta"] and meta["sizes"] == {"train": 13, "validation": 5, "test": 4}
    assert json.loads((out / "meta.json").read_text()) == meta
    ds = load_text_dataset({s: str(out / f"{s}.{fmt}") for s in ("train", "validation", "test")})
    assert label_names(ds) == ["alpha", "beta"]
    assert {s: len(ds[s]) for s in ds} == meta["sizes"]
    names = label_names(ds)
    assert all(names[y].startswith(t[:4]) or t.startswith(names[y]) for y, t in zip(ds["test"]["label"], ds["test"]["text"]))
    if fmt == "csv":
        with open(out / "train.csv", newline="") as f:
            assert next(csv.reader(f)) == ["text", "label"]


def test_cli_main(root, tmp_path, capsys):
    from experiments.prepare_fortunes import main

    meta = main([str(tmp_path / "cli"), "--source", str(root), "--min-chars", "10", "--max-chars", "100",
                 "--min-per-class", "5", "--categories", "beta"])
    assert meta["classes"] == ["beta"] and (tmp_path / "cli" / "test.csv").is_file()
    assert '"num_classes": 1' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no fortune category files"):
        main([str(tmp_path / "cli2"), "--source", str(tmp_path / "missing")])


def test_package_version_empty_without_changelog(root):
    assert fortunes_package_version(root / "usr/share/games/fortunes") == {"fortunes": "1:9.9-1"}
    (root / "usr/share/doc/fortunes/changelog.Debian.gz").unlink()
    assert fortunes_package_version(root) == {}
