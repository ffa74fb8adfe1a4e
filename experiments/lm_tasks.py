"""Causal-LM (instruction-tuning) tasks of ``experiments.finetune``: ``sft`` (your files) and ``arith`` (embedded).

* ``sft``: ``--data-files train=PATH,validation=PATH[,test=PATH]`` (jsonl / csv / tsv / parquet) with
  ``--prompt-column`` / ``--response-column`` fields (comma-separated names: the first a record has, e.g.
  ``query,question`` and ``response,answer`` read MetaMathQA and GSM8K files alike) or a ``--messages-column``
  in chat form
  (:mod:`lorapro_jax.data.sft`); the chat template of the model's tokenizer is applied unless
  ``--no-chat-template``.
* ``arith``: the generated multi-step arithmetic word problems of :mod:`lorapro_jax.data.arith` (seed
  ``--data-seed``; 2000 train / 100 validation / 200 test).

Both train the masked next-token loss on the response tokens only and are scored by greedy generation:
``exact_match`` (the validation metric ``experiments.sweep`` tunes the lr on), plus the loss and perplexity of
the masked next-token loss. ``--max-train-examples`` / ``--max-eval-examples`` take the first N examples.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lorapro_jax.data.sft import InstructionDataError, SftDataset, encode_instructions, read_instruction_file

from .cli import LLM_TASKS, csv_list, max_length_for

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "LLM_TASKS", "is_llm_task", "load_lm_task", "max_new_tokens_for"]

#: Generated tokens per answer when ``--max-new-tokens`` is not given.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"arith": 40, "sft": 256}


def is_llm_task(task: str) -> bool:
    """True for the causal-LM tasks (:data:`LLM_TASKS`)."""
    return task in LLM_TASKS


def max_new_tokens_for(args: argparse.Namespace, task: str) -> int:
    """``--max-new-tokens`` if given, else the task's default."""
    n = getattr(args, "max_new_tokens", None)
    return int(n) if n is not None else DEFAULT_MAX_NEW_TOKENS[task]


def _sft_examples(args: argparse.Namespace, task: str) -> tuple[dict[str, list], dict[str, str]]:
    from .tasks import _local_files  # the same split=PATH checks as --task local

    files = _local_files(args, task)
    out = {}
    for split, path in files.items():
        try:
            out[split] = read_instruction_file(path, prompt_column=csv_list(args.prompt_column),
                                               response_column=csv_list(args.response_column),
                                               messages_column=args.messages_column)
        except InstructionDataError as e:
            raise SystemExit(f"--data-files {split}={path}: {e}") from None
    return out, files


def _arith_examples(args: argparse.Namespace) -> tuple[dict[str, list], dict[str, str]]:
    from lorapro_jax.data.arith import arith_splits

    return arith_splits(seed=args.data_seed), {}


def _first(examples: list, n: int | None) -> list:
    return examples if n is None else examples[:n]


def _encode(args: argparse.Namespace, split: str, examples: list, tokenizer: Any, max_length: int,
            source: str) -> SftDataset:
    try:
        ds = encode_instructions(examples, tokenizer, max_length=max_length,
                                 chat_template=False if args.no_chat_template else None,
                                 prompt_template=args.prompt_template,
                                 on_overflow=args.on_overflow, source=source)
    except ValueError as e:
        raise SystemExit(f"{source}: {e} (raise --max-length, or --on-overflow drop)") from None
    if ds.overflow_message:
        print(f"[{split}] {ds.overflow_message}", file=sys.stderr)
    return ds


def load_lm_task(args: argparse.Namespace, task: str, tokenizer: Any) -> Any:
    """The :class:`~experiments.tasks.TaskData` of a causal-LM task (splits encoded as :class:`SftDataset`)."""
    from .tasks import TaskData

    if tokenizer.eos_token_id is None:
        raise SystemExit(f"{task}: the tokenizer has no EOS token (needed to end every response)")
    raw, files = _sft_examples(args, task) if task == "sft" else _arith_examples(args)
    max_length = max_length_for(args, task)
    enc = {}
    for split, examples in raw.items():
        cap = args.max_train_examples if split == "train" else args.max_eval_examples
        source = files.get(split) or f"{task} {split}"
        enc[split] = _encode(args, split, _first(examples, cap), tokenizer, max_length, source)
    train = enc.pop("train")
    final = "test" if "test" in enc else "validation"
    return TaskData(
        name=task, train=train, evals=enc, eval_split="validation", final_split=final, num_labels=0,
        label_names=(), is_regression=False, primary_metric="exact_match", max_length=max_length,
        tokenizer=tokenizer, max_new_tokens=max_new_tokens_for(args, task),
    )
