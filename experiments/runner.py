"""One training run of ``experiments.finetune``: the loop, evaluation, checkpoints, logs and summary.

The runner API, shared by ``python -m experiments.finetune`` and ``python -m experiments.sweep``::

    session = open_session(args, "bbc")                 # tokenise the task, load the model once
    summary = run_single(session, "lora", seed=0, lr=3e-3)

A :class:`Session` holds what every run of one task shares: the data, the pretrained model (each run
starts from a fresh copy) and one optimizer object per method whose peak learning rate is a traced value
(:func:`experiments.methods.with_traced_peak_lr`), so that seeds and learning rates reuse one compiled
train step.

Each run writes ``<out-dir>/<run-name>/``:

* ``metrics.jsonl``: one JSON object per line; ``{"type": "train", "step", "epoch", "loss", "lr",
  "grad_norm", "step_time_s", "compiled"}`` per step, ``{"type": "eval", "step", "epoch", "split",
  <metrics>}`` per evaluation, ``{"type": "event", ...}`` for PRILoRA pruning / ALoRA reallocation.
* ``predictions.npz``: the final split's per-example ``scores`` ``(N, C)``, ``labels`` ``(N,)`` and dataset
  ``index`` ``(N,)`` (what ``experiments.sweep`` bootstraps over; for causal-LM tasks ``scores`` is ``(N, 1)``,
  1.0 where the generated answer is an exact match, and ``labels`` are ones).
* ``samples.jsonl`` (causal-LM tasks): every evaluation's generations, one line per example
  (``step``, ``split``, ``prompt``, ``reference``, ``generation``, extracted answers, ``correct``).
* ``summary.json`` (written last: a run is finished when it exists): final metrics, train loss (mean over
  the last epoch, and the last step's), trainable parameters, wall time, settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.data import BucketedBatcher

from . import alignment
from .cli import resolve_method
from .exporting import export_run
from .records import read_jsonl
from .methods import (
    MethodState,
    PeakLr,
    _require,
    count_trainable,
    lr_shape,
    make_tx,
    optimizer_steps,
    peak_lr,
    setup_method,
    warmup_steps,
)
from .lm_tasks import is_llm_task
from .modeling import (
    arch_of,
    fresh_copy,
    load_base_model,
    load_model_tokenizer,
    lora_targets,
    model_dir,
    model_type_of,
)
from .steps import batch_loss, device_batch, evaluate, train_step
from .tasks import TaskData, TaskSpec, build_spec, load_task

__all__ = ["Session", "open_session", "run_name", "run_single"]


@dataclasses.dataclass
class Session:
    """What every run of one task shares (see the module docstring)."""

    args: argparse.Namespace
    task: TaskData
    spec: TaskSpec
    base: nnx.Module
    model_type: str
    tx_cache: dict = dataclasses.field(default_factory=dict)  # (method, total) -> (shape, tx, PeakLr)
    compiled: set = dataclasses.field(default_factory=set)  # (method, total, batch shape) already compiled
    task_name: str | None = None  # the --task name (selects the tuned default lrs of methods.TUNED_LRS)

    @property
    def model_dir(self) -> Path:
        return model_dir(self.args)


def open_session(args: argparse.Namespace, task_name: str, tokenizer: Any = None) -> Session:
    """Tokenise ``task_name`` and load the pretrained model (with a fresh head) once for all its runs."""
    path = model_dir(args)
    model_type = model_type_of(path)
    if is_llm_task(task_name):
        if model_type != "llama":
            raise SystemExit(f"--task {task_name} fine-tunes a causal LM: --model must be a Llama-family checkpoint "
                             f"(safetensors folder or GGUF file), got model_type {model_type!r} at {path}")
        arch = "llama-lm"
    else:
        head = args.head if args.head != "auto" else ("seq2seq" if model_type == "t5" else "classifier")
        arch = arch_of(model_type, head)
    tokenizer = tokenizer if tokenizer is not None else load_model_tokenizer(path)
    task = load_task(args, task_name, tokenizer, seq2seq=(arch == "t5-seq2seq"))
    spec = build_spec(args, task, arch, tokenizer, path)
    print(f"[{task_name}] train {len(task.train)} examples, "
          + ", ".join(f"{k} {len(v)}" for k, v in task.evals.items())
          + f"; model {path} ({arch})", file=sys.stderr)
    base = load_base_model(path, arch, task.num_labels, args)
    return Session(args, task, spec, base, model_type, task_name=task_name)


def run_name(args: argparse.Namespace, task_name: str, method: str, seed: int) -> str:
    """``<--run-name or task>-<method>-s<seed>`` (``:`` of ``glue:<task>`` replaced by ``-``)."""
    prefix = args.run_name or task_name.replace(":", "-")
    return f"{prefix}-{method}-s{seed}"


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


@dataclasses.dataclass
class _Run:
    """The mutable state of one run while it trains."""

    session: Session
    method: str
    seed: int
    name: str
    run_dir: Path
    peak: float
    total: int
    steps_per_epoch: int
    batcher: BucketedBatcher
    model: nnx.Module
    mstate: MethodState
    opt: nnx.Optimizer
    shape: Any  # unit learning-rate schedule
    t_start: float
    ckpt: Any = None
    log: Any = None
    progress: Any = None
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    resumed: bool = False
    last_saved: int = -1
    epoch_losses: dict = dataclasses.field(default_factory=dict)
    step_times: list = dataclasses.field(default_factory=list)
    last_eval: dict = dataclasses.field(default_factory=dict)
    last_eval_predictions: dict = dataclasses.field(default_factory=dict)
    last_loss: float | None = None
    align_paths: Any = None  # --log-alignment-every: the measured kernels (the layers the LoRA methods adapt)
    base: str = ""  # the base method of a METHOD_VARIANTS name (else the method itself)
    run_args: Any = None  # the session's options with the variant's values (cli.resolve_method)

    @property
    def args(self) -> argparse.Namespace:
        return self.run_args if self.run_args is not None else self.session.args

    @property
    def task(self) -> TaskData:
        return self.session.task

    @property
    def accum(self) -> int:
        """Batches per optimizer update (``--grad-accum``)."""
        return max(1, int(getattr(self.args, "grad_accum", 1) or 1))

    def lr_at(self, count: int) -> float:
        """The learning rate of batch ``count`` (0-based): that of its optimizer update."""
        return self.peak * float(self.shape(count // self.accum))


def _optimizer(s: Session, method: str, total: int, peak: float) -> tuple[Any, Any]:
    """``(lr shape, tx)`` of ``method``; one tx object per (method, total) so the compiled step is shared."""
    key = (method, total)
    if key not in s.tx_cache:
        holder = PeakLr()
        base, margs = resolve_method(method, s.args)
        updates = optimizer_steps(total, getattr(margs, "grad_accum", 1))
        s.tx_cache[key] = (lr_shape(margs.schedule, margs.warmup_ratio, updates),
                           make_tx(margs, base, total=total, peak=holder), holder)
    shape, tx, holder = s.tx_cache[key]
    holder.value = peak  # read by tx.init when the optimizer is created
    return shape, tx


def _build(s: Session, method: str, seed: int, lr: float | None, name: str, out_dir: Path, t_start: float) -> _Run:
    base, args = resolve_method(method, s.args)
    batcher = BucketedBatcher(s.task.train, args.batch_size, shuffle=True, seed=seed)
    steps_per_epoch = batcher.num_batches()
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    model = fresh_copy(s.base, s.spec.arch, seed)
    mstate = setup_method(model, args, base, s.spec, s.task, s.model_type, seed, total)
    model.train()
    peak = float(lr) if lr is not None else peak_lr(args, method, s.task_name)
    shape, tx = _optimizer(s, method, total, peak)
    opt = lp.LoraOptimizer(model, tx, wrt=mstate.wrt)  # keeps LoraPair-valued Adam moments
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    r = _Run(s, method, seed, name, run_dir, peak, total, steps_per_epoch, batcher, model, mstate, opt, shape, t_start,
             base=base, run_args=args)
    if args.log_alignment_every:  # full fine-tuning is measured on the layers the LoRA methods adapt
        matches = lp.LoraConfig(rank=1, targets=lora_targets(args, s.model_type)).matches
        r.align_paths = alignment.kernel_paths(model, matches)
    return r


def _restore(r: _Run) -> None:
    """Open the run's checkpointer (``--checkpoint-dir``) and, with ``--resume``, restore the latest step."""
    args = r.args
    if not args.checkpoint_dir:
        return
    ck_mod = _require("lorapro_jax.checkpoint", ["TrainCheckpointer"], "--checkpoint-dir")
    r.ckpt = ck_mod.TrainCheckpointer(
        Path(args.checkpoint_dir) / r.name, max_to_keep=2, async_save=False,
        also_save=nnx.Param if r.base == "lora-ga" else None,  # LoRA-GA changed the base weights
    )
    if args.resume and r.ckpt.latest_step() is not None:
        info = r.ckpt.restore(r.model, r.opt, skip_corrupt=True)
        r.start_epoch, r.start_batch, r.step = info.data_state["epoch"], info.data_state["batch"], info.step
        r.resumed = True
        r.last_saved = r.step
        dropped = _rewind_log(r.run_dir / "metrics.jsonl", r.step)
        print(f"{r.name}: resuming from the checkpoint of step {r.step}"
              + (f"; dropped {dropped} log records written after it" if dropped else ""), file=sys.stderr)
        for rec in read_jsonl(r.run_dir / "metrics.jsonl", missing_ok=True):
            if rec.get("type") == "train":
                r.epoch_losses.setdefault(rec["epoch"], []).append(rec["loss"])
                r.last_loss = rec["loss"]


def _open_outputs(r: _Run) -> None:
    r.log = _Jsonl(r.run_dir / "metrics.jsonl", append=r.resumed)
    if not r.resumed and (r.run_dir / "samples.jsonl").is_file():
        (r.run_dir / "samples.jsonl").unlink()  # a fresh run: the generations of an earlier one are stale
    if not r.resumed:
        r.log.write({"type": "config", "task": r.task.name, "method": r.method, "seed": r.seed, "steps": r.total,
                     "steps_per_epoch": r.steps_per_epoch, "peak_lr": r.peak, "max_length": r.task.max_length,
                     "warmup_steps": warmup_steps(r.args.warmup_ratio, optimizer_steps(r.total, r.accum)),
                     "grad_accum": r.accum, **r.mstate.info})
    if not r.args.no_progress:
        from tqdm.auto import tqdm

        r.progress = tqdm(total=r.total, initial=r.step, desc=r.name, leave=True, dynamic_ncols=True)


def _say(r: _Run, text: str) -> None:
    """Show what a pause is (compiling, evaluating) in the progress bar."""
    if r.progress is not None:
        r.progress.set_postfix_str(text, refresh=True)


def _write_samples(r: _Run, epoch: int, split: str, samples: list[dict]) -> None:
    """Append one evaluation's generations to ``samples.jsonl`` (one line per example)."""
    with open(r.run_dir / "samples.jsonl", "a") as f:
        for rec in samples:
            f.write(json.dumps({"step": r.step, "epoch": epoch, "split": split, **rec}) + "\n")


def _evaluate(r: _Run, epoch: int, split: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    data = r.task.evals[split]
    _say(r, f"evaluating on {split} ({len(data)} examples)...")
    preds: dict[str, Any] = {}
    samples: list[dict] | None = [] if r.session.spec.kind == "causal-lm" else None
    lm = {"samples": samples, "progress": not r.args.no_progress} if samples is not None else {}
    m = evaluate(r.model, data, r.session.spec, r.task, r.args.eval_batch_size, predictions=preds, **lm)
    if samples is not None:
        _write_samples(r, epoch, split, samples)
    r.log.write({"type": "eval", "step": r.step, "epoch": epoch, "split": split, **m})
    value = m.get(r.task.primary_metric)
    _say(r, f"{split} {r.task.primary_metric} {float(value):.4f}" if value is not None else f"{split} evaluated")
    if split == r.task.eval_split:
        r.last_eval, r.last_eval_predictions = m, preds
    return m, preds


def _save(r: _Run, epoch: int, batch_index: int) -> None:
    if r.ckpt is not None and r.step != r.last_saved:
        r.ckpt.save(r.step, r.model, r.opt, data_state={"epoch": epoch, "batch": batch_index}, force=True)
        r.last_saved = r.step


def _alignment_before(r: _Run, batch: dict) -> tuple[Any, Any] | None:
    """``--log-alignment-every``: kernels and full gradients before this step (at step 1 and every N steps)."""
    every = r.args.log_alignment_every
    if not every or not (r.step == 0 or (r.step + 1) % every == 0):
        return None
    loss = functools.partial(batch_loss, spec=r.session.spec)
    return (alignment.effective_kernels(r.model, r.align_paths),
            alignment.kernel_grads(r.model, loss, r.align_paths, batch))


def _log_alignment(r: _Run, before: tuple[Any, Any], epoch: int) -> None:
    res = alignment.update_alignment(before[0], alignment.effective_kernels(r.model, r.align_paths), before[1])
    r.log.write({"type": "alignment", "step": r.step, "epoch": epoch, "cos_overall": res.overall,
                 "cos_mean": res.mean, "update_norm": res.update_norm, "full_grad_norm": res.grad_norm,
                 "per_layer": res.per_layer})


def _one_step(r: _Run, batch: dict, epoch: int) -> None:
    shape = batch["input_ids"].shape
    key = (r.method, r.total, shape)
    compiled = key not in r.session.compiled
    r.session.compiled.add(key)
    if compiled:
        _say(r, f"compiling the train step for batches of shape {tuple(shape)}...")
    t0 = time.perf_counter()
    dev_batch = device_batch(batch)
    measured = _alignment_before(r, dev_batch)
    try:
        with lp.unwrap_nonfinite_errors():
            loss, gnorm = train_step(r.model, r.opt, dev_batch, r.session.spec)
            loss = float(loss)
    except lp.NonFiniteError as e:  # one line: the run, the step, the parameter paths
        raise SystemExit(f"{r.name}: non-finite step {r.step + 1}: {e}") from None
    dt = time.perf_counter() - t0
    if not compiled:
        r.step_times.append(dt)
    skipped = not math.isfinite(loss)
    if skipped and r.args.on_nonfinite != "skip":
        raise SystemExit(f"{r.name}: non-finite loss {loss} at step {r.step + 1}")
    lr = r.lr_at(r.step)
    r.step += 1
    if skipped:  # --on-nonfinite skip: params and optimizer state were kept; not a loss to average
        r.log.write({"type": "event", "step": r.step, "epoch": epoch, "event": "nonfinite_skip",
                     "skipped_total": int(lp.nonfinite_skips(r.opt))})
    else:
        r.last_loss = loss
        r.epoch_losses.setdefault(epoch, []).append(loss)
    if measured is not None:
        _log_alignment(r, measured, epoch)
    if not skipped:
        r.log.write({"type": "train", "step": r.step, "epoch": epoch, "loss": loss, "lr": lr,
                     "grad_norm": float(gnorm), "step_time_s": dt, "compiled": compiled})
    for hook in r.mstate.hooks:
        for ev in hook(r.step):
            r.log.write({"type": "event", "step": r.step, "epoch": epoch, **ev})
    if r.progress is not None:
        r.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        r.progress.update(1)


def _train_epoch(r: _Run, epoch: int) -> tuple[bool, tuple[int, int]]:
    """Train one epoch; returns (done, where a resumed run continues)."""
    args = r.args
    for i, batch in enumerate(r.batcher.epoch(epoch)):
        if epoch == r.start_epoch and i < r.start_batch:
            continue  # already trained before the checkpoint
        _one_step(r, batch, epoch)
        if args.eval_every and r.step % args.eval_every == 0:
            _evaluate(r, epoch, r.task.eval_split)
        if args.checkpoint_every and r.step % args.checkpoint_every == 0:
            _save(r, epoch, i + 1)
        if r.step >= r.total:
            return True, ((epoch, i + 1) if i + 1 < r.steps_per_epoch else (epoch + 1, 0))
    return False, (epoch + 1, 0)


def _train(r: _Run) -> None:
    done = r.step >= r.total
    for epoch in range(r.start_epoch, r.args.epochs):
        if done:
            break
        done, position = _train_epoch(r, epoch)
        if not r.args.eval_every:
            _evaluate(r, epoch, r.task.eval_split)
        _save(r, *position)


def _final_eval(r: _Run) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics and predictions on the final split (reusing the last evaluation when it is the same split)."""
    if r.task.final_split != r.task.eval_split or not r.last_eval:
        return _evaluate(r, r.args.epochs - 1, r.task.final_split)
    return r.last_eval, r.last_eval_predictions


def _summary(r: _Run, final: dict[str, float], exports: dict[str, str]) -> dict[str, Any]:
    args, task = r.args, r.task
    last_epoch = max(r.epoch_losses) if r.epoch_losses else None
    return {
        "run": r.name, "task": task.name, "method": r.method, "seed": r.seed, "model": str(model_dir(args)),
        "steps": r.step, "epochs": args.epochs, "train_examples": len(task.train), "max_length": task.max_length,
        "peak_lr": r.peak, "lr_schedule": args.schedule,
        "warmup_steps": warmup_steps(args.warmup_ratio, optimizer_steps(r.total, r.accum)),
        "grad_accum": r.accum, "optimizer_updates": optimizer_steps(r.step, r.accum),
        "base_method": r.base, "rank": None if r.base == "full" else args.rank,
        "trainable_params": count_trainable(r.model, r.mstate.wrt),
        "final_split": task.final_split, "final_metrics": final, "primary_metric": task.primary_metric,
        "eval_split": task.eval_split, "last_eval_metrics": r.last_eval,
        # mean of the per-step losses of the last epoch (the model changes during it); the last step's below
        "final_train_loss": float(np.mean(r.epoch_losses[last_epoch])) if last_epoch is not None else None,
        "final_train_loss_is": "mean over the last epoch's steps",
        "last_step_train_loss": r.last_loss,
        "wall_time_s": time.perf_counter() - r.t_start,
        "mean_step_time_s": float(np.mean(r.step_times)) if r.step_times else None,
        "resumed": r.resumed, "nonfinite_skips": int(lp.nonfinite_skips(r.opt)), "exports": exports, "device": str(jax.devices()[0].platform),
        **{k: v for k, v in r.mstate.info.items() if not isinstance(v, dict)},
    }


def run(
    args: argparse.Namespace, task: TaskData, spec: TaskSpec, base: nnx.Module, model_type: str, method: str,
    seed: int, tx_cache: dict,
) -> dict[str, Any]:
    """Train and evaluate one ``(task, method, seed)`` (the 0.1 signature of ``experiments.finetune.run``)."""
    return run_single(Session(args, task, spec, base, model_type, tx_cache=tx_cache), method, seed)


def run_single(
    session: Session, method: str, seed: int, lr: float | None = None, *,
    name: str | None = None, out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate one ``(task, method, seed)`` at peak learning rate ``lr``; the runner API.

    Args:
        session: from :func:`open_session` (the task, the model, the shared optimizers).
        method: one of :data:`experiments.cli.METHODS`.
        seed: head initialisation, adapter initialisation, dropout and data order.
        lr: peak learning rate (default ``--lr`` / ``--full-lr`` of ``session.args``).
        name: run directory name (default :func:`run_name`).
        out_dir: parent of the run directory (default ``--out-dir``).

    Returns:
        The summary, also written to ``<out_dir>/<name>/summary.json`` (last, once everything else is written).
    """
    t_start = time.perf_counter()
    name = name or run_name(session.args, session.task.name, method, seed)
    r = _build(session, method, seed, lr, name, Path(out_dir or session.args.out_dir), t_start)
    _restore(r)
    _open_outputs(r)
    _train(r)
    final, preds = _final_eval(r)
    if r.progress is not None:  # closed after the final evaluation, so the bar ends on its result
        r.progress.close()
    r.log.close()
    if r.ckpt is not None:
        r.ckpt.wait_until_finished()
        r.ckpt.close()
    if preds:
        np.savez(r.run_dir / "predictions.npz", **preds)
    summary = _summary(r, final, export_run(r.args, r.model, r.base, name, r.mstate, session.spec.arch))
    if summary["nonfinite_skips"]:
        print(f"[{name}] skipped {summary['nonfinite_skips']} non-finite steps (--on-nonfinite skip)", file=sys.stderr)
    tmp = r.run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(r.run_dir / "summary.json")
    return summary
