"""GLUE tasks through Hugging Face ``datasets``, from the Hub or from local files.

:func:`load_glue` returns a :class:`datasets.Dataset` with the same columns as the Hub's
``nyu-mll/glue`` configs (e.g. ``sentence``/``label`` for SST-2, ``premise``/``hypothesis``/
``label`` for MNLI). With ``data_files=`` the split is read from local csv / tsv / jsonl / json /
parquet files instead, which is the way to use GLUE on a machine without Hub access.

Offline behaviour: when the Hub is disabled (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or
``TRANSFORMERS_OFFLINE`` set, or ``huggingface_hub.constants.HF_HUB_OFFLINE``) and the task is
not in the ``datasets`` cache, :func:`load_glue` raises :class:`GlueUnavailableError` at once,
without network retries, and the message says how to pass local files.

:data:`GLUE_TASKS` holds per-task metadata and :func:`compute_glue_metrics` the task's metrics.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorapro_jax.data.metrics import (
    accuracy,
    f1_score,
    matthews_corrcoef,
    pearson_corr,
    spearman_corr,
)

__all__ = [
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "GlueTask",
    "GlueUnavailableError",
    "compute_glue_metrics",
    "get_glue_task",
    "hub_offline",
    "load_glue",
    "load_local_files",
]

GLUE_HUB_ID = "nyu-mll/glue"
"""Hub repository of the GLUE benchmark used by :func:`load_glue`."""

_STD_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = (
    "train",
    "validation_matched",
    "validation_mismatched",
    "test_matched",
    "test_mismatched",
)


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name: Config name on the Hub (``"sst2"``, ``"mnli"``, ...).
        sentence_keys: One column name (single-sentence task) or two (sentence-pair task).
        num_labels: Number of classes; ``1`` for the regression task STS-B.
        label_names: Class names indexed by label id; empty for STS-B.
        metrics: Metric names reported by :func:`compute_glue_metrics`.
        primary_metric: The metric usually quoted for the task.
        splits: Split names available on the Hub.
    """

    name: str
    sentence_keys: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    splits: tuple[str, ...] = _STD_SPLITS

    @property
    def is_regression(self) -> bool:
        """True for STS-B (float similarity score in ``[0, 5]``)."""
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        """True when examples are sentence pairs."""
        return len(self.sentence_keys) == 2

    @property
    def text_column(self) -> str:
        """Column of the first sentence."""
        return self.sentence_keys[0]

    @property
    def text_pair_column(self) -> str | None:
        """Column of the second sentence, or ``None`` for single-sentence tasks."""
        return self.sentence_keys[1] if self.is_pair else None


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        "cola", ("sentence",), 2, ("unacceptable", "acceptable"),
        ("matthews_corrcoef", "accuracy"), "matthews_corrcoef",
    ),
    "sst2": GlueTask(
        "sst2", ("sentence",), 2, ("negative", "positive"), ("accuracy",), "accuracy",
    ),
    "mrpc": GlueTask(
        "mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"),
        ("accuracy", "f1", "combined_score"), "f1",
    ),
    "qqp": GlueTask(
        "qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"),
        ("accuracy", "f1", "combined_score"), "f1",
    ),
    "stsb": GlueTask(
        "stsb", ("sentence1", "sentence2"), 1, (),
        ("pearson", "spearman", "combined_score"), "pearson",
    ),
    "mnli": GlueTask(
        "mnli", ("premise", "hypothesis"), 3, ("entailment", "neutral", "contradiction"),
        ("accuracy",), "accuracy", _MNLI_SPLITS,
    ),
    "qnli": GlueTask(
        "qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"),
        ("accuracy",), "accuracy",
    ),
    "rte": GlueTask(
        "rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"),
        ("accuracy",), "accuracy",
    ),
}
"""Metadata of the supported GLUE tasks, keyed by Hub config name."""

_SPLIT_ALIASES = {"mnli": {"validation": "validation_matched", "test": "test_matched"}}

_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


class GlueUnavailableError(RuntimeError):
    """A GLUE split can be neither loaded from the Hub/cache nor from given local files."""


def get_glue_task(task: str) -> GlueTask:
    """Return the :class:`GlueTask` for ``task`` (case-insensitive; ``"sst-2"`` is accepted).

    Raises:
        ValueError: If the task is not one of :data:`GLUE_TASKS`.
    """
    key = task.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether Hugging Face Hub access is disabled for this process.

    True if any of ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE`` is set
    to a true value now, or ``huggingface_hub``/``datasets`` were imported in offline mode.
    """
    if any(_truthy(os.environ.get(k)) for k in
           ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants as hub_constants

        if bool(getattr(hub_constants, "HF_HUB_OFFLINE", False)):
            return True
    except ImportError:  # pragma: no cover - huggingface_hub is a datasets dependency
        pass
    try:
        import datasets.config as ds_config

        return bool(getattr(ds_config, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover
        return False


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` honour offline mode for the enclosed call.

    Both libraries read the environment once, at import; if the variable was set later (for
    example by a test or a notebook cell) they would still try the network and wait for
    timeouts. This sets their module flags for the duration of the call and restores them.
    """
    if not enabled:
        yield
        return
    import datasets.config as ds_config
    from huggingface_hub import constants as hub_constants

    saved = [
        (ds_config, name, getattr(ds_config, name))
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if hasattr(ds_config, name)
    ]
    if hasattr(hub_constants, "HF_HUB_OFFLINE"):
        saved.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
    try:
        for module, name, _ in saved:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _resolve_split(info: GlueTask, split: str) -> str:
    base, bracket, rest = split.partition("[")
    base = _SPLIT_ALIASES.get(info.name, {}).get(base, base)
    if base not in info.splits:
        raise ValueError(
            f"GLUE task {info.name!r} has no split {split!r}; expected one of {list(info.splits)}"
        )
    return base + bracket + rest


def _local_files_hint(info: GlueTask, split: str) -> str:
    cols = ", ".join([*info.sentence_keys, "label"])
    return (
        f"Pass local files instead, e.g. load_glue({info.name!r}, {split!r}, "
        f"data_files='path/to/{split.partition('[')[0]}.csv') (csv, tsv, jsonl/json or parquet) "
        f"with columns: {cols}; or data_files={{'train': ..., 'validation': ...}}."
    )


def _normalise_files(files: Any) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        return [os.fspath(files)]
    if isinstance(files, Sequence):
        out = [os.fspath(f) for f in files]
        if out:
            return out
    raise ValueError(
        f"data_files must be a path, a list of paths or a dict of those; got {files!r}"
    )


def _infer_format(files: Sequence[str]) -> tuple[str, dict[str, Any]]:
    kinds = set()
    for f in files:
        name = f[:-3] if f.endswith(".gz") else f
        ext = os.path.splitext(name)[1].lower()
        if ext not in _FORMATS:
            raise ValueError(
                f"cannot infer the format of {f!r}: expected one of {sorted(_FORMATS)}"
            )
        kinds.add(ext if ext == ".tsv" else _FORMATS[ext])
    if len(kinds) != 1:
        raise ValueError(f"data_files mix formats {sorted(kinds)}; use one format per split")
    kind = kinds.pop()
    if kind == ".tsv":
        return "csv", {"delimiter": "\t", "quoting": 3}  # csv.QUOTE_NONE, as in GLUE's TSVs
    return kind, {}


def load_local_files(
    data_files: Any,
    *,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Load one split from local csv / tsv / jsonl / json / parquet files with ``datasets``.

    Args:
        data_files: A path, a list of paths (all of the split), or a mapping from split name to
            path(s); with a mapping, ``split`` (without any ``[...]`` slice) selects the entry.
        split: Split name; a slice suffix such as ``"train[:100]"`` is applied to the files.
        cache_dir: ``datasets`` cache directory for the converted Arrow files.

    Returns:
        A :class:`datasets.Dataset`.

    Raises:
        FileNotFoundError: If a file does not exist.
        KeyError: If ``data_files`` is a mapping without ``split``.
        ValueError: If the format cannot be inferred from the file names.
    """
    import datasets

    base, bracket, rest = split.partition("[")
    if isinstance(data_files, Mapping):
        if base not in data_files:
            raise KeyError(
                f"data_files has no entry for split {base!r}; it has {sorted(data_files)}"
            )
        data_files = data_files[base]
    files = _normalise_files(data_files)
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"data file not found: {f}")
    builder, kwargs = _infer_format(files)
    import pyarrow

    with _offline_mode(hub_offline()):
        try:
            return datasets.load_dataset(
                builder,
                data_files={"data": files},
                split="data" + bracket + rest,
                cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                **kwargs,
            )
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, UnicodeDecodeError) as e:
            from lorapro_jax.errors import CorruptFileError

            cause = e.__cause__ or e.__context__ or e
            where = files[0] if len(files) == 1 else ", ".join(files)
            expected = f"a readable {'tsv' if kwargs else builder} file of labelled examples"
            raise CorruptFileError(where, expected, f"{type(cause).__name__}: {str(cause)[:300]}") from e


def _conform_local(ds: Any, info: GlueTask, column_map: Mapping[str, str] | None) -> Any:
    """Rename columns and normalise the label column of a local GLUE split."""
    import datasets

    if column_map:
        ds = ds.rename_columns({k: v for k, v in column_map.items() if k != v})
    missing = [k for k in info.sentence_keys if k not in ds.column_names]
    if missing:
        raise ValueError(
            f"local files for GLUE task {info.name!r} lack column(s) {missing}; they have "
            f"{ds.column_names}. Expected {[*info.sentence_keys, 'label']} "
            "(use column_map={'your_name': 'glue_name'} to rename)."
        )
    if "label" not in ds.column_names:  # unlabelled (test) split, as on the Hub
        fill = -1.0 if info.is_regression else -1
        ds = ds.add_column("label", [fill] * len(ds))
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        ds = ds.cast_column("label", datasets.Value("int64"))
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        if info.is_regression:
            ds = ds.map(lambda b: {"label": [float(v) for v in b["label"]]}, batched=True)
        else:
            name_to_id = {n: i for i, n in enumerate(info.label_names)}

            def to_id(v: str) -> int:
                v = v.strip()
                if v in name_to_id:
                    return name_to_id[v]
                try:
                    return int(v)
                except ValueError:
                    raise ValueError(
                        f"label {v!r} is neither a class name of {info.name!r} "
                        f"{list(info.label_names)} nor an integer id"
                    ) from None

            ds = ds.map(lambda b: {"label": [to_id(v) for v in b["label"]]}, batched=True)
    target = datasets.Value("float32" if info.is_regression else "int64")
    if ds.features["label"] != target:
        ds = ds.cast_column("label", target)
    if not info.is_regression:
        labels = np.asarray(ds["label"])
        bad = (labels != -1) & ((labels < 0) | (labels >= info.num_labels))
        if bad.any():
            raise ValueError(
                f"labels of {info.name!r} must be in [0, {info.num_labels}) or -1; found "
                f"{sorted(set(labels[bad].tolist()))[:5]}"
            )
    return ds


def load_glue(
    task: str,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    data_files: Any = None,
    *,
    column_map: Mapping[str, str] | None = None,
) -> Any:
    """Load one split of a GLUE task.

    Without ``data_files`` the split comes from the Hub dataset ``nyu-mll/glue`` (or the
    ``datasets`` cache). With ``data_files`` it is read from local files whose columns are the
    task's ``sentence_keys`` plus ``label`` (ids, or class names such as ``"entailment"``; may be
    absent for unlabelled test files, in which case it is filled with ``-1``).

    Args:
        task: One of ``cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte``.
        split: ``train``, ``validation`` or ``test`` (for MNLI also ``validation_matched``,
            ``validation_mismatched``, ``test_matched``, ``test_mismatched``; ``validation`` and
            ``test`` mean the matched ones). Slices like ``"train[:1000]"`` are accepted.
        cache_dir: ``datasets`` cache directory.
        data_files: Local csv / tsv / jsonl / json / parquet file(s) for this split: a path, a
            list of paths, or a mapping ``{split: path(s)}``.
        column_map: Optional renaming ``{column_in_files: glue_column}`` for local files.

    Returns:
        A :class:`datasets.Dataset` with the task's sentence columns and ``label``
        (int64 class id, or float32 score for STS-B). Hub splits also carry ``idx``.

    Raises:
        ValueError: Unknown task or split, or local files with missing columns / bad labels.
        GlueUnavailableError: The Hub is unreachable or disabled and the split is not cached.
    """
    import datasets

    info = get_glue_task(task)
    requested = split
    split = _resolve_split(info, split)
    if data_files is not None:
        # With a {split: files} mapping, accept the key as the user wrote it ("validation") or
        # as resolved ("validation_matched" for MNLI).
        local_split = split
        if isinstance(data_files, Mapping) and requested.partition("[")[0] in data_files:
            local_split = requested
        ds = load_local_files(data_files, split=local_split, cache_dir=cache_dir)
        return _conform_local(ds, info, column_map)

    offline = hub_offline()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(
                GLUE_HUB_ID,
                info.name,
                split=split,
                cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            )
    except OSError as err:
        # ConnectionError, OfflineModeIsEnabled, FileNotFoundError (not cached) and timeouts
        # are all OSError subclasses; anything else (bad split, ...) propagates unchanged.
        if offline:
            reason = (
                "Hugging Face Hub access is disabled (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
                "and the split is not in the local datasets cache"
            )
        else:
            reason = "it could not be fetched from the Hugging Face Hub or the local cache"
        raise GlueUnavailableError(
            f"cannot load GLUE task {info.name!r} split {split!r} from {GLUE_HUB_ID!r}: "
            f"{reason} ({type(err).__name__}: {err}). {_local_files_hint(info, split)}"
        ) from err


def compute_glue_metrics(
    task: str,
    predictions: Any,
    labels: Any,
    weights: Any | None = None,
) -> dict[str, float]:
    """Compute the GLUE metrics of ``task``.

    Args:
        task: GLUE task name.
        predictions: Class ids ``(N,)`` or logits ``(N, C)`` (arg-maxed) for classification
            tasks; scores ``(N,)`` or ``(N, 1)`` for STS-B.
        labels: Targets, shape ``(N,)``.
        weights: Optional ``(N,)`` example weights as produced by the batcher; rows with weight
            ``0`` (batch padding) are dropped before computing the metrics.

    Returns:
        A dict with the entries of ``GLUE_TASKS[task].metrics``. ``combined_score`` is the mean
        of F1 and accuracy (MRPC, QQP) or of Pearson and Spearman (STS-B).
    """
    info = get_glue_task(task)
    preds = np.asarray(predictions)
    y = np.asarray(labels).reshape(-1)
    if info.is_regression:
        preds = preds.reshape(preds.shape[0], -1)
        if preds.shape[1] != 1:
            raise ValueError(f"STS-B predictions must be (N,) or (N, 1); got {preds.shape}")
        preds = preds[:, 0].astype(np.float64)
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    elif preds.ndim != 1:
        raise ValueError(f"predictions must be (N,) or (N, C); got {preds.shape}")
    if weights is not None:
        keep = np.asarray(weights).reshape(-1) > 0
        preds, y = preds[keep], y[keep]

    out: dict[str, float] = {}
    if info.is_regression:
        out["pearson"] = pearson_corr(preds, y)
        out["spearman"] = spearman_corr(preds, y)
        out["combined_score"] = (out["pearson"] + out["spearman"]) / 2.0
        return out
    if "matthews_corrcoef" in info.metrics:
        out["matthews_corrcoef"] = matthews_corrcoef(preds, y)
    out["accuracy"] = accuracy(preds, y)
    if "f1" in info.metrics:
        out["f1"] = f1_score(preds, y)
        out["combined_score"] = (out["f1"] + out["accuracy"]) / 2.0
    return out
