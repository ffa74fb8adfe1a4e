"""Debian ``fortunes``: a many-class short-text classification benchmark that ships in a package.

The Debian packages ``fortunes`` and ``fortunes-min`` (source ``fortune-mod``, BSD licence, see
``docs/results.md``) hold about 15k short texts ("fortune cookies": quips, quotations, jokes) in
about 40 category files under ``usr/share/games/fortunes/``. Each file is a list of entries
separated by lines holding a single ``%``; the file name is the category. The task is to predict
the category from the text: many classes, short inputs, overlapping topics (``people`` vs
``wisdom`` vs ``platitudes``), so it is far from saturated, unlike BBC News.

Nothing here downloads anything. Get the files without installing the package::

    apt-get download fortunes fortunes-min && for f in fortunes*.deb; do dpkg-deb -x "$f" fortunes-x; done
    python -m experiments.prepare_fortunes data/fortunes --source fortunes-x

:func:`read_fortune_file` parses one file, :func:`load_fortunes` reads, cleans, filters and
deduplicates a whole folder, :func:`split_fortunes` makes a seeded stratified split and
:func:`prepare_fortunes` writes ``train`` / ``validation`` / ``test`` files (csv or jsonl, columns
``text`` and ``label``, string labels) that ``python -m experiments.finetune --task local`` reads.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORTUNES_SUBDIR",
    "find_fortunes_dir",
    "fortunes_package_version",
    "load_fortunes",
    "prepare_fortunes",
    "read_fortune_file",
    "split_fortunes",
]

FORTUNES_SUBDIR = Path("usr/share/games/fortunes")
"""Where the category files lie inside an extracted (or installed) Debian package."""

_SPLITS = ("train", "validation", "test")
_OVERSTRIKE = re.compile(r".\x08")  # "X\bX" (bold) and "_\bX" (underline) in old nroff-style text
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def find_fortunes_dir(source: str | os.PathLike | None = None) -> Path:
    """The folder holding the fortune category files.

    Args:
        source: The category folder itself, or the root of an extracted package
            (``dpkg-deb -x fortunes.deb ROOT``: the files are under ``ROOT/usr/share/games/fortunes``).
            ``None`` looks in ``/usr/share/games/fortunes`` (an installed package).

    Returns:
        The category folder.

    Raises:
        FileNotFoundError: No such folder, or it holds no category file; the message says how to
            get the package without installing it.
    """
    candidates = [Path("/") / FORTUNES_SUBDIR] if source is None else [Path(source), Path(source) / FORTUNES_SUBDIR]
    for path in candidates:
        if path.is_dir() and _category_files(path):
            return path
    raise FileNotFoundError(
        f"no fortune category files in {[str(c) for c in candidates]}; get them without installing: "
        "`apt-get download fortunes fortunes-min && dpkg-deb -x fortunes_*.deb ROOT && "
        "dpkg-deb -x fortunes-min_*.deb ROOT`, then pass ROOT"
    )


def _category_files(folder: Path) -> list[Path]:
    """Plain category files: no ``.dat`` index, no ``.u8`` / other symlinks, no hidden files."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix in (".dat", ".u8") or p.is_symlink() or not p.is_file():
            continue
        out.append(p)
    return out


def clean_text(text: str) -> str:
    """One entry as a single line: overstrikes and control characters removed, whitespace collapsed."""
    text = _OVERSTRIKE.sub("", text)
    text = _CONTROL.sub(" ", text)
    return " ".join(text.split())


def read_fortune_file(path: str | os.PathLike) -> list[str]:
    """The entries of one fortune file, cleaned (:func:`clean_text`), empty ones dropped.

    Entries are separated by lines that hold only ``%`` (trailing whitespace allowed). The file is
    read as UTF-8; undecodable bytes are replaced.
    """
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    entries, current = [], []
    for line in raw.splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [t for t in (clean_text(e) for e in entries) if t]


def load_fortunes(
    source: str | os.PathLike | None = None,
    *,
    min_chars: int = 20,
    max_chars: int = 300,
    min_per_class: int = 100,
    max_per_class: int | None = None,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Read, clean, deduplicate and filter the fortunes, grouped by category.

    Steps, in order: every category file is read (:func:`read_fortune_file`); entries shorter than
    ``min_chars`` or longer than ``max_chars`` characters are dropped; a text found in more than
    one category is dropped from all of them (its label would be ambiguous) and a text repeated
    inside one category is kept once; categories with fewer than ``min_per_class`` texts left are
    dropped; finally each category keeps at most ``max_per_class`` texts, chosen with
    ``numpy.random.default_rng([seed, class index])`` over the sorted texts.

    Args:
        source: See :func:`find_fortunes_dir`.
        min_chars: Shortest text kept (characters, after cleaning).
        max_chars: Longest text kept (characters, after cleaning): long entries (poems, ascii art,
            dialogues) are dropped rather than truncated.
        min_per_class: Categories with fewer texts (after the filters above) are dropped.
        max_per_class: Optional cap per category (balances the classes, bounds the run time).
        categories: Keep only these categories (file names); an unknown name is an error.
        seed: Seed of the ``max_per_class`` subsample.

    Returns:
        ``{category: [text, ...]}`` with categories in sorted order and texts in sorted order.

    Raises:
        FileNotFoundError: See :func:`find_fortunes_dir`.
        ValueError: Bad bounds, an unknown category, or nothing left after filtering.
    """
    if min_chars < 1 or max_chars < min_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    if min_per_class < 1 or (max_per_class is not None and max_per_class < min_per_class):
        raise ValueError(f"need 1 <= min_per_class <= max_per_class, got {min_per_class}, {max_per_class}")
    folder = find_fortunes_dir(source)
    files = {p.name: p for p in _category_files(folder)}
    if categories is not None:
        unknown = sorted(set(categories) - set(files))
        if unknown:
            raise ValueError(f"categories {unknown} not found in {folder}; available: {sorted(files)}")
        files = {k: files[k] for k in categories}
    by_cat = {
        name: {t for t in read_fortune_file(path) if min_chars <= len(t) <= max_chars} for name, path in files.items()
    }
    owners: dict[str, int] = {}
    for texts in by_cat.values():
        for t in texts:
            owners[t] = owners.get(t, 0) + 1
    out: dict[str, list[str]] = {}
    for i, name in enumerate(sorted(by_cat)):
        texts = sorted(t for t in by_cat[name] if owners[t] == 1)
        if len(texts) < min_per_class:
            continue
        if max_per_class is not None and len(texts) > max_per_class:
            keep = np.random.default_rng([seed, i]).permutation(len(texts))[:max_per_class]
            texts = [texts[j] for j in sorted(keep)]
        out[name] = texts
    if not out:
        raise ValueError(
            f"no category of {folder} keeps >= {min_per_class} texts of {min_chars}-{max_chars} characters"
        )
    return out


def split_fortunes(
    by_category: Mapping[str, Sequence[str]],
    *,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list[dict[str, str]]]:
    """A stratified, seeded train / validation / test split.

    Each category's texts (in the given order) are permuted with
    ``numpy.random.default_rng([seed, class index])`` and cut into consecutive pieces of sizes
    ``fractions`` (largest remainder rounding, every split at least one text); each split is then
    shuffled with ``default_rng(seed)``. The same input and seed always give the same split.

    Returns:
        ``{"train" | "validation" | "test": [{"text": ..., "label": category}, ...]}``.
    """
    from lorapro_jax.data.bbc import _split_counts

    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in _SPLITS}
    for i, name in enumerate(sorted(by_category)):
        texts = list(by_category[name])
        if len(texts) < 3:
            raise ValueError(f"category {name!r} has {len(texts)} texts; a 3-way split needs at least 3")
        order = np.random.default_rng([seed, i]).permutation(len(texts))
        start = 0
        for split, n in zip(_SPLITS, _split_counts(len(texts), fractions)):
            rows[split].extend({"text": texts[j], "label": name} for j in order[start : start + n])
            start += n
    for k, split in enumerate(_SPLITS):
        perm = np.random.default_rng([seed, 1_000_003, k]).permutation(len(rows[split]))
        rows[split] = [rows[split][j] for j in perm]
    return rows


def fortunes_package_version(source: str | os.PathLike | None = None) -> dict[str, str]:
    """Debian package versions found next to the files: ``{package: version}`` (may be empty).

    Read from the first line of ``usr/share/doc/<package>/changelog.Debian.gz`` under the package
    root (``source``; ``/`` when ``None``), e.g. ``fortune-mod (1:1.99.1-7.3) unstable; ...``.
    """
    folder = find_fortunes_dir(source)
    root = folder.parents[len(FORTUNES_SUBDIR.parts) - 1] if folder.as_posix().endswith(FORTUNES_SUBDIR.as_posix()) else None
    out: dict[str, str] = {}
    if root is None:
        return out
    for pkg in ("fortunes", "fortunes-min", "fortune-mod"):
        log = root / "usr/share/doc" / pkg / "changelog.Debian.gz"
        if log.is_file():
            with gzip.open(log, "rt", encoding="utf-8", errors="replace") as f:
                m = re.match(r"\S+ \(([^)]+)\)", f.readline())
            if m:
                out[pkg] = m.group(1)
    return out


def _write(rows: list[dict[str, str]], path: Path) -> None:
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: expected a .csv or .jsonl output")


def prepare_fortunes(
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    fmt: str = "csv",
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    **filters: Any,
) -> dict[str, Any]:
    """Write ``train`` / ``validation`` / ``test`` files and a ``meta.json`` describing them.

    Args:
        out_dir: Output folder (created).
        source: See :func:`find_fortunes_dir`.
        fmt: ``"csv"`` or ``"jsonl"``; columns ``text`` and ``label`` (the category name).
        fractions: Train / validation / test fractions.
        seed: Seed of the subsample and of the split.
        **filters: Passed to :func:`load_fortunes` (``min_chars``, ``max_chars``,
            ``min_per_class``, ``max_per_class``, ``categories``).

    Returns:
        The ``meta.json`` content: files, sizes per split and class, settings, package versions.
    """
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"fmt must be 'csv' or 'jsonl', got {fmt!r}")
    by_cat = load_fortunes(source, seed=seed, **filters)
    rows = split_fortunes(by_cat, fractions=fractions, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in _SPLITS:
        path = out / f"{split}.{fmt}"
        _write(rows[split], path)
        files[split] = str(path)
    counts = {s: {c: sum(r["label"] == c for r in rows[s]) for c in by_cat} for s in _SPLITS}
    meta = {
        "source": str(find_fortunes_dir(source)),
        "debian_packages": fortunes_package_version(source),
        "files": files,
        "num_classes": len(by_cat),
        "classes": sorted(by_cat),
        "sizes": {s: len(rows[s]) for s in _SPLITS},
        "per_class": counts,
        "settings": {"fractions": list(fractions), "seed": seed, **{k: v for k, v in filters.items()}},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
