"""Local labelled text data (csv / tsv / jsonl / json / parquet) through ``datasets``.

:func:`load_text_dataset` reads one or several splits with
``datasets.load_dataset("csv" | "json" | "parquet", data_files=...)``, renames the configured
columns to the canonical ``text`` / ``text_pair`` / ``label`` and turns string labels into class
ids with a stable vocabulary (the sorted set of label strings over *all* loaded splits, so the
same string gets the same id in train and validation). The resulting ``label`` column is a
:class:`datasets.ClassLabel`, so the names are available as ``ds.features["label"].names``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lorapro_jax.data.glue import load_local_files

__all__ = ["label_names", "load_text_dataset"]


def label_names(dataset: Any) -> list[str]:
    """Class names of a dataset's ``label`` column (``ClassLabel``), indexed by id.

    Args:
        dataset: A :class:`datasets.Dataset` or :class:`datasets.DatasetDict`.

    Returns:
        The list of names, or ``[]`` when ``label`` is not a ``ClassLabel`` (e.g. regression).
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        dataset = next(iter(dataset.values()))
    feature = dataset.features.get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def _check_rows(ds: Any, files: Any, columns: list[str]) -> None:
    """Ragged csv rows and empty text / label fields are errors naming the file, not silent data."""
    from lorapro_jax.errors import CorruptFileError

    where = os.fspath(files) if isinstance(files, (str, os.PathLike)) else ", ".join(map(os.fspath, files))
    expected = f"one example per row with the columns {columns}"
    if any(c.startswith("__index_level_") for c in ds.column_names):
        raise CorruptFileError(where, expected, "some rows have more fields than the header")
    for c in columns:
        bad = [i for i, v in enumerate(ds[c]) if v is None or (isinstance(v, str) and not v.strip() and c != "text_pair")]
        if bad:
            raise CorruptFileError(where, expected, f"rows {bad[:5]} (0-based, header excluded) have no {c!r} value")


def _is_string_feature(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def load_text_dataset(
    data_files: str | os.PathLike | Sequence[str] | Mapping[str, Any],
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
    split: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Load labelled text from local files.

    The format is inferred from the file extension: ``.csv`` / ``.tsv`` (csv builder),
    ``.json`` / ``.jsonl`` (json builder, one object per line for jsonl) or ``.parquet``.

    Label handling:
        * string labels -> ids ``0..K-1`` in sorted order of the label strings seen in all
          loaded splits (or in the order of ``label_names`` if given);
        * integer labels -> kept; names are ``label_names`` or ``"0".."K-1"``;
        * float labels -> kept as a float32 regression target (no ``ClassLabel``).

    Args:
        data_files: A path or list of paths (one split, named ``"train"`` unless ``split``
            says otherwise), or a mapping ``{split_name: path(s)}``.
        text_column: Column holding the text; renamed to ``text``.
        label_column: Column holding the label; renamed to ``label``.
        text_pair_column: Optional second text column (sentence pairs); renamed to
            ``text_pair``.
        label_names: Optional fixed vocabulary of class names (defines the id order).
        split: With a mapping, return only this split as a :class:`datasets.Dataset`
            (the vocabulary is still built over the whole mapping).
        cache_dir: ``datasets`` cache directory.

    Returns:
        A :class:`datasets.DatasetDict` (mapping input, ``split=None``) or a
        :class:`datasets.Dataset`, with columns ``text``, optional ``text_pair`` and ``label``
        (``ClassLabel`` ids, int64 storage; float32 for regression). Other columns are dropped.

    Raises:
        ValueError: If a configured column is missing or a label is not in ``label_names``.
    """
    import datasets

    single = not isinstance(data_files, Mapping)
    files_by_split = {(split or "train"): data_files} if single else dict(data_files)
    if not single and split is not None and split not in files_by_split:
        raise KeyError(f"split {split!r} not in data_files ({sorted(files_by_split)})")

    rename = {text_column: "text"}
    if text_pair_column is not None:
        rename[text_pair_column] = "text_pair"
    rename[label_column] = "label"

    loaded: dict[str, Any] = {}
    for name, files in files_by_split.items():
        ds = load_local_files({name: files}, split=name, cache_dir=cache_dir)
        missing = [c for c in rename if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"split {name!r}: column(s) {missing} not found; available: {ds.column_names}"
            )
        _check_rows(ds, files, list(rename))
        ds = ds.select_columns(list(rename)).rename_columns(
            {k: v for k, v in rename.items() if k != v}
        )
        loaded[name] = ds

    features = [d.features["label"] for d in loaded.values()]
    if any(_is_string_feature(f) for f in features):
        seen = sorted({str(v) for d in loaded.values() for v in d["label"]})
        names = list(label_names) if label_names is not None else seen
        unknown = sorted(set(seen) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not in label_names {names}")
        class_label = datasets.ClassLabel(names=names)
        to_id = {n: i for i, n in enumerate(names)}
        for name, d in loaded.items():
            d = d.map(
                lambda b: {"label": [to_id[str(v)] for v in b["label"]]},
                batched=True,
                features=datasets.Features({**d.features, "label": class_label}),
            )
            loaded[name] = d
    elif all(getattr(f, "dtype", "").startswith(("int", "uint")) or
             isinstance(f, datasets.ClassLabel) for f in features):
        max_id = max((max(d["label"], default=-1) for d in loaded.values()), default=-1)
        names = list(label_names) if label_names is not None else [
            str(i) for i in range(max_id + 1)
        ]
        if max_id >= len(names):
            raise ValueError(f"label id {max_id} out of range for {len(names)} label_names")
        class_label = datasets.ClassLabel(names=names)
        loaded = {n: d.cast_column("label", class_label) for n, d in loaded.items()}
    else:  # float labels: regression
        loaded = {n: d.cast_column("label", datasets.Value("float32")) for n, d in loaded.items()}

    if single:
        return next(iter(loaded.values()))
    if split is not None:
        return loaded[split]
    return datasets.DatasetDict(loaded)
