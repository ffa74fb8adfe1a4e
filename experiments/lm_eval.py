"""Evaluation of causal-LM tasks: masked next-token loss / perplexity and greedy-generation exact match.

:func:`evaluate_lm` (called by :func:`experiments.steps.evaluate` for ``spec.kind == "causal-lm"``):

* ``loss`` / ``perplexity``: the masked next-token loss over every response token of the split (prompt
  tokens excluded, EOS included), i.e. ``sum NLL / tokens`` and ``exp`` of it; the batches are the
  length-bucketed training shapes (:class:`~lorapro_jax.data.BucketedBatcher`).
* ``exact_match``: the prompts, left-padded in prompt-length buckets
  (:func:`~lorapro_jax.data.sft.iterate_prompt_batches`), are continued by batched greedy decoding
  (``lorapro_jax.models.generate``, ``max_new_tokens`` per answer, stopping at EOS); the decoded answers are
  compared with the references by :func:`~lorapro_jax.data.metrics.exact_match` (GSM8K ``####`` convention,
  else the last number).

``predictions`` receives ``scores`` ``(N, 1)`` (1.0 where the answer is right), ``labels`` ``(N,)`` (ones) and
``index`` ``(N,)``, so ``experiments.sweep`` bootstraps the exact match over examples like an accuracy;
``samples`` receives one ``{"index", "row", "prompt", "reference", "generation", "correct", ...}`` per example.

``python -m experiments.lm_eval --task arith`` scores the base model (no fine-tuning) with the same
options as ``experiments.finetune`` and writes ``<out-dir>/<run-name or task>-base/`` (``summary.json``,
``samples.jsonl``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorapro_jax.data import BucketedBatcher
from lorapro_jax.data.metrics import exact_match, extract_answer, perplexity
from lorapro_jax.data.sft import SftDataset, iterate_prompt_batches

from .tasks import TaskData, TaskSpec

__all__ = ["evaluate_base", "evaluate_lm", "generate_answers", "lm_loss_sums", "main", "validation_loss"]


@nnx.jit(static_argnames=("spec",))
def lm_loss_sums(model: nnx.Module, batch: dict, spec: TaskSpec) -> tuple[Any, Any]:
    """``(sum of the masked next-token NLL, number of target tokens)`` of one batch (float32 scalars)."""
    from .steps import causal_lm_nll

    nll, w = causal_lm_nll(model, batch, spec)
    return jnp.sum(nll * w), jnp.sum(w)


def validation_loss(model: nnx.Module, data: SftDataset, spec: TaskSpec, batch_size: int) -> dict[str, float]:
    """``{"loss", "perplexity", "target_tokens"}`` of the masked next-token loss over ``data``."""
    from .steps import device_batch

    total, tokens = 0.0, 0.0
    for batch in BucketedBatcher(data, batch_size, shuffle=False).epoch(0):
        s, n = lm_loss_sums(model, device_batch(batch), spec)
        total += float(s)
        tokens += float(n)
    return {"loss": total / max(tokens, 1.0), "perplexity": perplexity(total, tokens), "target_tokens": int(tokens)}


def _default_generate() -> Callable[..., Any]:
    from lorapro_jax.models import generate

    return generate


def _cut(tokens: np.ndarray, length: int, eos: int) -> np.ndarray:
    """The generated tokens of one row up to (without) the first EOS."""
    t = tokens[: int(length)]
    stop = np.flatnonzero(t == eos)
    return t[: stop[0]] if stop.size else t


def generate_answers(
    model: nnx.Module, data: SftDataset, tokenizer: Any, *, batch_size: int, max_new_tokens: int,
    generate_fn: Callable[..., Any] | None = None, progress: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Greedy answers to every prompt of ``data``, in dataset order.

    Returns:
        ``(texts, generated token counts (N,), stopped at EOS (N,) bool)``.
    """
    gen = generate_fn or _default_generate()
    eos = data.eos_token_id
    texts: list[str] = [""] * len(data)
    counts = np.zeros(len(data), np.int64)
    stopped = np.zeros(len(data), bool)
    batches = list(iterate_prompt_batches(data, batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc=f"generating ({len(data)} prompts)", leave=False, dynamic_ncols=True)
    for batch in batches:
        out = gen(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                  max_new_tokens=max_new_tokens, eos_token_id=eos)
        tokens, lengths = np.asarray(out[0]), np.asarray(out[1])  # (B, max_new_tokens), (B,) EOS included
        for r, i in enumerate(batch["index"]):
            if i < 0:
                continue
            kept = _cut(tokens[r], lengths[r], eos)
            texts[i] = tokenizer.decode(kept.tolist(), skip_special_tokens=True)
            counts[i] = kept.size
            stopped[i] = int(lengths[r]) > 0 and int(tokens[r, int(lengths[r]) - 1]) == eos
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return texts, counts, stopped


def evaluate_lm(
    model: nnx.Module, data: SftDataset, spec: TaskSpec, task: TaskData, batch_size: int,
    predictions: dict[str, Any] | None = None, *, samples: list | None = None,
    generate_fn: Callable[..., Any] | None = None, progress: bool = False,
) -> dict[str, float]:
    """Exact match of greedy answers, masked next-token loss and perplexity of ``model`` on ``data``.

    The model is switched to ``eval()`` and back to ``train()``.
    """
    model.eval()
    try:
        metrics = validation_loss(model, data, spec, batch_size)
        texts, counts, stopped = generate_answers(model, data, task.tokenizer, batch_size=batch_size,
                                                  max_new_tokens=task.max_new_tokens, generate_fn=generate_fn,
                                                  progress=progress)
    finally:
        model.train()
    correct = np.asarray(exact_match(texts, data.references), bool)
    metrics = {"exact_match": float(correct.mean()), **metrics, "examples": len(data),
               "mean_generated_tokens": float(counts.mean()), "stopped_at_eos": float(stopped.mean())}
    if predictions is not None:
        predictions.update(scores=correct.astype(np.float32)[:, None], labels=np.ones(len(data), np.float32),
                           index=np.arange(len(data)))
    if samples is not None:
        for i, text in enumerate(texts):
            samples.append({
                "index": i, "row": data.rows[i], "prompt": task.tokenizer.decode(data.prompt_ids(i).tolist()),
                "reference": data.references[i], "generation": text, "answer": extract_answer(text),
                "reference_answer": extract_answer(data.references[i]), "correct": bool(correct[i]),
            })
    return metrics


def evaluate_base(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Score the pretrained model itself on the evaluation and final splits of a causal-LM task.

    Returns:
        The summary (also written to ``<out-dir>/<prefix>-base/summary.json``; the generations to
        ``samples.jsonl`` there).
    """
    from .cli import parse_args
    from .lm_tasks import is_llm_task
    from .runner import open_session

    args = parse_args(argv)
    task_name = args.tasks[0]
    if len(args.tasks) != 1 or not is_llm_task(task_name):
        raise SystemExit(f"experiments.lm_eval scores one causal-LM task (sft, arith), got {args.tasks}")
    t0 = time.perf_counter()
    session = open_session(args, task_name)
    out = Path(args.out_dir) / f"{args.run_name or task_name}-base"
    out.mkdir(parents=True, exist_ok=True)
    metrics, timings = {}, {}
    with open(out / "samples.jsonl", "w") as f:
        for split in dict.fromkeys([session.task.eval_split, session.task.final_split]):
            samples: list[dict] = []
            t = time.perf_counter()
            metrics[split] = evaluate_lm(session.base, session.task.evals[split], session.spec, session.task,
                                         args.eval_batch_size, samples=samples, progress=not args.no_progress)
            timings[split] = time.perf_counter() - t
            for rec in samples:
                f.write(json.dumps({"split": split, **rec}) + "\n")
            print(f"[{task_name} base] {split}: exact match {metrics[split]['exact_match']:.4f}, loss "
                  f"{metrics[split]['loss']:.4f}, perplexity {metrics[split]['perplexity']:.3f} "
                  f"({timings[split]:.1f} s)", file=sys.stderr)
    summary = {"task": task_name, "model": str(session.model_dir), "method": "base (no fine-tuning)",
               "primary_metric": "exact_match", "metrics": metrics, "eval_time_s": timings,
               "max_new_tokens": session.task.max_new_tokens, "max_length": session.task.max_length,
               "wall_time_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.lm_eval``: :func:`evaluate_base`."""
    return evaluate_base(argv)


if __name__ == "__main__":
    main()
