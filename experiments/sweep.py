"""Learning-rate sweeps: ``python -m experiments.sweep`` (method x lr grid x seeds, tuned on validation).

For every method it trains the lr grid (``--lrs``; ``--full-lrs`` for full fine-tuning) on the tuning seeds
(``--tune-seeds``, default all ``--seeds``) with the single-run machinery of ``experiments.finetune``
(:func:`experiments.runner.run_single`), picks each method's lr on the validation split (never on test; see
:mod:`experiments.sweep_stats`), runs the remaining seeds at that lr only, and reports on the final split
(test) the mean ± std over seeds and a 95 % bootstrap interval over seeds and test examples::

    python -m experiments.sweep --task local --data-files train=a.csv,validation=b.csv,test=c.csv \\
        --method lora,lora-pro,full --lrs 3e-4,1e-3,3e-3,1e-2 --full-lrs 3e-5,1e-4,3e-4 \\
        --seeds 0,1,2 --tune-seeds 0 --jobs 2 --sweep-name mytask

All single-run options (``--task``, ``--data-files``, ``--rank``, ``--epochs``, ...) work as in
``experiments.finetune``. Output in ``<out-dir>/<sweep-name>/``: ``runs/<method>-lr<lr>-s<seed>/`` (one run
each; a run is finished when its ``summary.json`` — or ``failed.json`` for a run that raised, e.g. diverged
— exists, and is skipped when the sweep is started again), ``results.json``, ``results.md``,
``accuracy_vs_lr.png`` and ``loss_at_chosen_lr.png`` (tables: :func:`experiments.report.format_sweep_markdown`,
plots: :func:`experiments.plot.plot_sweep`). A method whose chosen lr is the smallest or largest of its grid
is reported with a warning (the best lr may lie outside the grid).

Runs of one method share one compiled train step (the peak lr is a traced value); ``--jobs N`` runs N worker
processes (each loads the model and data once), which also share compilations through JAX's persistent
compilation cache (``--compile-cache``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import sweep_stats
from .cli import HelpFormatter, add_run_arguments, csv_list, parse_args
from .plot import plot_sweep
from .records import read_jsonl
from .report import format_sweep_markdown

__all__ = ["RunSpec", "build_parser", "edge_warnings", "main", "plan_runs", "run_dir_name", "summarize"]


class RunSpec(NamedTuple):
    """One run of a sweep: a method at a peak learning rate with a seed (its directory: :func:`run_dir_name`)."""

    method: str
    lr: float
    seed: int

DEFAULT_LRS = "1e-4,3e-4,1e-3,3e-3,1e-2"
DEFAULT_FULL_LRS = "1e-5,3e-5,1e-4,3e-4"

_DESCRIPTION = """Learning-rate sweep: trains every method (--method) at every peak learning rate of its grid on the
tuning seeds, picks each method's lr on the validation split, trains the other seeds at that lr, and reports
the final (test) split."""

_EPILOG = """how the lr is picked:
  per method, the lr with the highest mean validation metric over --tune-seeds (ties: lower mean last-epoch
  train loss, then the smaller lr); the test split is never used for the choice. A chosen lr at the edge of
  its grid is reported with a warning: extend --lrs / --full-lrs / --method-lrs past it.

what it writes, in <out-dir>/<sweep-name>/:
  runs/<method>-lr<lr>-s<seed>/  one directory per run (summary.json, metrics.jsonl, predictions.npz;
                                 failed.json for a run that raised, e.g. diverged)
  results.json, results.md       chosen lrs, test mean +- std and 95% bootstrap intervals, differences to
                                 --baselines, the validation grid
  accuracy_vs_lr.png, loss_at_chosen_lr.png
  settings.json                  the options of the runs (a later call with other options is refused)

resuming: the sweep resumes by itself. Started again with the same --sweep-name, it skips every run whose
  summary.json or failed.json exists and trains the rest. --checkpoint-dir DIR (with --resume on the next
  call) also keeps orbax checkpoints in DIR/<method>-lr<lr>-s<seed>/, so an interrupted run continues from
  its last checkpoint instead of restarting; both may be added or dropped between calls. Run directories
  are always named <method>-lr<lr>-s<seed> (finetune's --run-name does not apply).

example:
  python -m experiments.sweep --method lora,lora-pro,full --lrs 3e-4,1e-3,3e-3 --full-lrs 3e-5,1e-4 \\
      --seeds 0,1,2 --tune-seeds 0 --jobs 2 --sweep-name bbc-sweep
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.sweep``: every single-run option (minus ``--lr``) + the sweep's."""
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=HelpFormatter)
    add_run_arguments(p, with_lr=False)
    for action in p._actions:  # the single-run options whose meaning differs inside a sweep
        if action.dest == "out_dir":
            action.help = "the sweep writes <out-dir>/<sweep-name>/"
        elif action.dest == "run_name":
            action.help = argparse.SUPPRESS  # run directories are named <method>-lr<lr>-s<seed>
        elif action.dest == "checkpoint_dir":
            action.help = ("also save orbax checkpoints of each run in <dir>/<method>-lr<lr>-s<seed>/ (for --resume; "
                           "finished runs are skipped without them; default: no checkpoints)")
        elif action.dest == "resume":
            action.help = "continue an interrupted run from its latest checkpoint in --checkpoint-dir"
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep-name", default=None, help="output directory <out-dir>/<sweep-name>/ (default: <task>-sweep)")
    g.add_argument("--lrs", default=DEFAULT_LRS, help="peak learning rates tried for the LoRA methods")
    g.add_argument("--full-lrs", default=DEFAULT_FULL_LRS, help="peak learning rates tried for full fine-tuning")
    g.add_argument("--method-lrs", action="append", default=[], metavar="METHOD=LR,LR,...",
                   help="the grid of one method instead of --lrs / --full-lrs (repeatable), e.g. "
                        "--method-lrs lora-pro-sgd=0.3,1,3 (SGD needs far larger learning rates than Adam)")
    g.add_argument("--tune-seeds", default=None,
                   help="seeds trained at every lr of the grid (default: all --seeds); the other --seeds run only "
                        "at each method's chosen lr")
    g.add_argument("--jobs", type=int, default=1, help="worker processes running the pending runs in parallel")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the 95%% intervals")
    g.add_argument("--baselines", default="full,lora",
                   help="methods every other method is compared with (test difference with a bootstrap interval "
                        "paired over test examples); names not in --method are ignored")
    g.add_argument("--compile-cache", default="auto",
                   help="JAX persistent compilation cache directory; 'auto': <out-dir>/.jax_cache, 'none': off")
    g.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _floats(text: Any, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in (text if isinstance(text, list) else csv_list(text))]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise SystemExit(f"{flag}: expected positive learning rates, got {text!r}")
    return sorted(set(vals))


def _resolve(argv: Sequence[str] | None) -> argparse.Namespace:
    args = parse_args(argv, parser=build_parser())
    if len(args.tasks) != 1:
        raise SystemExit(f"--task: a sweep runs one task, got {args.tasks}")
    args.lr_grid = {m: _floats(args.full_lrs if m == "full" else args.lrs, "--full-lrs" if m == "full" else "--lrs")
                    for m in args.methods}
    for item in args.method_lrs:
        method, sep, lrs = item.partition("=")
        if not sep or method.strip() not in args.methods:
            raise SystemExit(f"--method-lrs {item!r}: expected METHOD=LR,LR,... with METHOD one of --method "
                             f"{args.methods}")
        args.lr_grid[method.strip()] = _floats(lrs, f"--method-lrs {method.strip()}")
    tune = args.seed_list if args.tune_seeds is None else [int(s) for s in csv_list(args.tune_seeds)]
    if not tune or not set(tune) <= set(args.seed_list):
        raise SystemExit(f"--tune-seeds {tune} must be a non-empty subset of --seeds {args.seed_list}")
    args.tune_list = tune
    args.baseline_list = [b for b in csv_list(args.baselines) if b in args.methods]
    args.sweep_dir = Path(args.out_dir) / (args.sweep_name or f"{args.tasks[0].replace(':', '-')}-sweep")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    return args


def run_dir_name(method: str, lr: float, seed: int) -> str:
    """``<method>-lr<lr>-s<seed>`` (lr in ``%g`` form)."""
    return f"{method}-lr{lr:g}-s{seed}"


def plan_runs(methods: Sequence[str], grid: dict[str, list[float]], tune_seeds: Sequence[int],
              seeds: Sequence[int], chosen: dict[str, float] | None = None) -> list[RunSpec]:
    """The runs to do: the grid on the tuning seeds, or (``chosen`` given) the other seeds at the chosen lr."""
    if chosen is None:
        return [RunSpec(m, lr, s) for m in methods for lr in grid[m] for s in tune_seeds]
    return [RunSpec(m, chosen[m], s) for m in methods for s in seeds if s not in tune_seeds]


def _finished(runs_dir: Path, spec: RunSpec) -> bool:
    d = runs_dir / run_dir_name(*spec)
    return (d / "summary.json").is_file() or (d / "failed.json").is_file()


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------


def _enable_compile_cache(args: argparse.Namespace) -> None:
    if args.compile_cache == "none":
        return
    import jax

    path = Path(args.out_dir) / ".jax_cache" if args.compile_cache == "auto" else Path(args.compile_cache)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path.resolve()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _run_specs(args: argparse.Namespace, specs: Sequence[RunSpec], runs_dir: Path) -> None:
    """Run ``specs`` in this process (one session: the data and model load once); failures -> failed.json.

    The session and its compiled programs are released on return, so the second stage of a ``--jobs 1`` sweep
    (the other seeds) does not hold two loaded models and two sets of programs at once.
    """
    from .runner import open_session

    _enable_compile_cache(args)
    session = open_session(args, args.tasks[0])
    previous = None
    try:
        for spec in sorted(specs):  # grouped by method: one compiled step per method
            if previous is not None and spec.method != previous:
                _release_compiled()
            previous = spec.method
            _run_one(session, spec, runs_dir)
    finally:
        del session
        _release_compiled()


def _run_one(session: Any, spec: RunSpec, runs_dir: Path) -> None:
    from .runner import run_single

    method, lr, seed = spec
    name = run_dir_name(method, lr, seed)
    t0 = time.perf_counter()
    try:
        s = run_single(session, method, seed, lr, name=name, out_dir=runs_dir)
        val = s["last_eval_metrics"].get(s["primary_metric"])
        print(f"[sweep] {name}: validation {s['primary_metric']} {val:.4f}, {s['wall_time_s']:.1f} s", flush=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a diverged lr is a result of the sweep, not its end
        (runs_dir / name).mkdir(parents=True, exist_ok=True)
        (runs_dir / name / "failed.json").write_text(json.dumps(
            {"method": method, "lr": lr, "seed": seed, "error": f"{type(e).__name__}: {e}",
             "wall_time_s": time.perf_counter() - t0}, indent=2))
        print(f"[sweep] {name}: FAILED ({type(e).__name__}: {e})", flush=True)


def _release_compiled() -> None:
    """Drop the previous method's compiled executables before the next method compiles its own.

    A worker otherwise keeps every method's compiled programs alive until it exits; on an unrolled 30-layer LLM
    a worker runs at about 10-12 GB of host memory already, so it holds one method's programs at a time. The
    evaluation programs shared by all methods come back from the persistent compilation cache.
    """
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def _worker_main(path: str) -> None:
    job = json.loads(Path(path).read_text())
    args = _resolve(job["argv"])
    args.no_progress = True
    _run_specs(args, [RunSpec(*s) for s in job["specs"]], Path(job["runs_dir"]))


def _chunks(specs: list[RunSpec], n: int) -> list[list[RunSpec]]:
    """Split sorted specs into ``n`` contiguous chunks of near-equal size (workers mostly see one method)."""
    specs = sorted(specs)
    bounds = np.linspace(0, len(specs), n + 1).round().astype(int)
    return [specs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def execute(args: argparse.Namespace, argv: Sequence[str], specs: Sequence[RunSpec]) -> None:
    """Run the unfinished ``specs``: in-process for ``--jobs 1``, else in ``--jobs`` worker processes."""
    runs_dir = args.sweep_dir / "runs"
    todo = [s for s in specs if not _finished(runs_dir, s)]
    skipped = len(specs) - len(todo)
    print(f"[sweep] {len(todo)} runs to do, {skipped} already finished (skipped)", file=sys.stderr, flush=True)
    if not todo:
        return
    if args.jobs == 1:
        _run_specs(args, todo, runs_dir)
        return
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, chunk in enumerate(_chunks(todo, args.jobs)):
            job = Path(tmp) / f"job{i}.json"
            job.write_text(json.dumps({"argv": list(argv), "specs": chunk, "runs_dir": str(runs_dir)}))
            procs.append(subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--worker", str(job)], env=env))
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"[sweep] worker exit codes {codes}: see the messages above")


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


def load_run(runs_dir: Path, spec: RunSpec) -> dict[str, Any]:
    """The record of one finished run (``sweep_stats`` format) with its loss curve and predictions."""
    method, lr, seed = spec
    d = runs_dir / run_dir_name(*spec)
    if (d / "failed.json").is_file():
        info = json.loads((d / "failed.json").read_text())
        return {"method": method, "lr": lr, "seed": seed, "failed": True, "error": info["error"], "val": None,
                "wall_time_s": info.get("wall_time_s")}
    s = json.loads((d / "summary.json").read_text())
    metric = s["primary_metric"]
    records = read_jsonl(d / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    # --log-alignment-every: cos(update, -full gradient) per measured step; step 1 of a warm-up is included
    align = [(r["step"], r["cos_overall"]) for r in records
             if r.get("type") == "alignment" and r.get("cos_overall") is not None]
    preds = np.load(d / "predictions.npz")
    return {
        "method": method, "lr": lr, "seed": seed, "failed": False, "run": str(d),
        "metric": metric, "val": s["last_eval_metrics"].get(metric), "final": s["final_metrics"].get(metric),
        "final_split": s["final_split"], "eval_split": s.get("eval_split", "validation"),
        "train_loss": s["final_train_loss"], "last_step_train_loss": s.get("last_step_train_loss"),
        "steps": s["steps"], "wall_time_s": s["wall_time_s"], "mean_step_time_s": s.get("mean_step_time_s"),
        "trainable_params": s["trainable_params"],
        "loss_curve": [r["loss"] for r in train], "alignment": align,
        "scores": preds["scores"], "labels": preds["labels"],
    }


def _metric_fn(task: str, metric: str) -> sweep_stats.Metric:
    if metric == "accuracy":
        return sweep_stats.accuracy_metric
    if metric == "exact_match":  # causal-LM tasks: per-example correctness in scores[:, 0]
        return sweep_stats.exact_match_metric
    if task.startswith("glue:"):
        from lorapro_jax.data import compute_glue_metrics

        name = task.split(":", 1)[1]
        return lambda s, y: float(compute_glue_metrics(name, s, y, np.ones(len(y), np.float32))[metric])
    raise SystemExit(f"no bootstrap for metric {metric!r} of task {task!r}")


def _chosen_runs(runs: list[dict], method: str, lr: float) -> list[dict]:
    """The finished (not failed) runs of ``method`` at ``lr``, by seed."""
    return sorted((r for r in runs if r["method"] == method and r["lr"] == lr and not r["failed"]),
                  key=lambda r: r["seed"])


def _method_result(args: argparse.Namespace, method: str, lr: float, runs: list[dict]) -> dict[str, Any]:
    ok = _chosen_runs(runs, method, lr)
    failed = [r for r in runs if r["method"] == method and r["lr"] == lr and r["failed"]]
    if not ok:
        return {"chosen_lr": lr, "seeds": [], "failed_seeds": [r["seed"] for r in failed]}
    metric = _metric_fn(args.tasks[0], ok[0]["metric"])
    ci = sweep_stats.bootstrap_interval([r["scores"] for r in ok], [r["labels"] for r in ok], metric=metric,
                                        replicates=args.bootstrap)
    steps = min(len(r["loss_curve"]) for r in ok)
    cos = [(step, c) for r in ok for step, c in r["alignment"] if np.isfinite(c)]
    by_step = {step: float(np.mean([c for t, c in cos if t == step])) for step in sorted({t for t, _ in cos})}
    curve = np.mean([r["loss_curve"][:steps] for r in ok], axis=0)
    return {
        "chosen_lr": lr, "seeds": [r["seed"] for r in ok], "failed_seeds": [r["seed"] for r in failed],
        "val_mean": float(np.mean([r["val"] for r in ok])),
        "test_mean": ci["mean"], "test_std": ci["std"], "test_per_seed": ci["per_seed"],
        "ci_low": ci["low"], "ci_high": ci["high"],
        "train_loss_last_epoch_mean": float(np.mean([r["train_loss"] for r in ok])),
        "last_step_train_loss_mean": float(np.mean([r["last_step_train_loss"] for r in ok])),
        "steps": steps, "loss_curve_mean": curve.tolist(),
        "wall_time_per_run_s": float(np.mean([r["wall_time_s"] for r in ok])),
        "trainable_params": ok[0]["trainable_params"],
        "alignment_cos_mean": float(np.mean([c for _, c in cos])) if cos else None, "alignment_points": len(cos),
        "alignment_cos_by_step": {str(k): v for k, v in by_step.items()},
    }


def _differences(args: argparse.Namespace, chosen: dict[str, float], runs: list[dict],
                 baseline: str) -> dict[str, Any]:
    """Each method minus ``baseline`` (at their chosen lrs), bootstrap interval paired over test examples."""
    pick = {m: _chosen_runs(runs, m, lr) for m, lr in chosen.items()}
    if not pick.get(baseline):
        return {}
    base = pick[baseline]
    metric = _metric_fn(args.tasks[0], base[0]["metric"])
    out = {}
    for m, rs in pick.items():
        if m != baseline and rs:
            out[f"{m} - {baseline}"] = sweep_stats.bootstrap_difference(
                [r["scores"] for r in rs], [r["scores"] for r in base], [r["labels"] for r in rs + base],
                metric=metric, replicates=args.bootstrap)
    return out


def _compute(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per method: the runs of the sweep (grid and extra seeds, every invocation) and their summed wall time."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        c = out.setdefault(r["method"], {"runs": 0, "run_wall_time_s": 0.0})
        c["runs"] += 1
        c["run_wall_time_s"] += float(r.get("wall_time_s") or 0.0)
    return out


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def edge_warnings(grid: dict[str, list[float]], chosen: dict[str, float]) -> list[str]:
    """One sentence per method whose chosen lr is the smallest or the largest of its grid (of 2 or more lrs):
    the best lr may lie outside the grid."""
    out = []
    for m, lr in chosen.items():
        lrs = sorted(grid.get(m, []))
        if len(lrs) < 2 or lr not in (lrs[0], lrs[-1]):
            continue
        side, flag = ("smallest", "smaller") if lr == lrs[0] else ("largest", "larger")
        opt = "--full-lrs" if m == "full" else "--lrs"
        out.append(f"{m}: the chosen lr {lr:g} is the {side} of its grid {[f'{x:g}' for x in lrs]}; the best lr may be "
                   f"{flag}: extend the grid ({opt} or --method-lrs {m}=...) and run the sweep again (finished runs "
                   "are kept)")
    return out


def summarize(args: argparse.Namespace, runs: list[dict], chosen: dict[str, float], wall_s: float) -> dict[str, Any]:
    """The content of ``results.json`` (see the README's sweep section)."""
    ok = [r for r in runs if not r["failed"]]
    table = sweep_stats.validation_table(runs, args.tune_list)
    diffs = {b: _differences(args, chosen, runs, b) for b in args.baseline_list}  # bootstraps: computed once
    return {
        "sweep": args.sweep_dir.name, "task": args.tasks[0], "metric": ok[0]["metric"] if ok else None,
        "selection_split": ok[0]["eval_split"] if ok else None, "final_split": ok[0]["final_split"] if ok else None,
        "selection": "per method, the lr with the highest mean validation metric over the tuning seeds "
                     "(ties: lower mean last-epoch train loss, then smaller lr); test is never used",
        "interval": f"{100 * 0.95:.0f}% percentile bootstrap over seeds and test examples, {args.bootstrap} replicates "
                    "(experiments/sweep_stats.py)",
        "seeds": args.seed_list, "tune_seeds": args.tune_list, "grid": args.lr_grid,
        "lr_edge_warnings": edge_warnings(args.lr_grid, chosen),
        "validation_by_lr": {m: {f"{lr:g}": c for lr, c in by.items()} for m, by in table.items()},
        "methods": {m: _method_result(args, m, lr, runs) for m, lr in chosen.items()},
        "differences": diffs,
        "differences_vs_full": diffs["full"] if "full" in diffs else _differences(args, chosen, runs, "full"),
        "compute": _compute(runs),
        "runs": [{k: v for k, v in r.items() if k not in ("scores", "labels", "loss_curve", "alignment")} for r in runs],
        "sweep_wall_time_s": wall_s,
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
    }


def _check_settings(args: argparse.Namespace) -> None:
    """Refuse to mix runs of different settings in one sweep directory (``settings.json``)."""
    # options that do not change what a run computes (checkpointing and resuming included: see the epilog)
    ignore = {"jobs", "no_progress", "worker", "seeds", "seed_list", "tune_seeds", "tune_list", "lrs", "full_lrs",
              "bootstrap", "compile_cache", "method", "methods", "sweep_dir", "baselines", "resume", "checkpoint_dir",
              "checkpoint_every", "run_name"}
    mine = {k: v for k, v in vars(args).items() if k not in ignore and isinstance(v, (str, int, float, bool, type(None)))}
    path = args.sweep_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("lora_pro_form") == "full":  # the deprecated spelling of the same form
            old["lora_pro_form"] = "adamw"
        for k in ("resume", "checkpoint_dir", "checkpoint_every", "run_name"):  # recorded by earlier versions
            old.pop(k, None)
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{args.sweep_dir} holds runs made with other settings {diff} (old, new); "
                             "use another --sweep-name")
    args.sweep_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep, then write ``results.json``, ``results.md`` and the plots; returns the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = build_parser().parse_known_args(argv)
    if first.worker:
        _worker_main(first.worker)
        return {}
    args = _resolve(argv)
    _check_settings(args)
    t0 = time.perf_counter()
    runs_dir = args.sweep_dir / "runs"
    grid = plan_runs(args.methods, args.lr_grid, args.tune_list, args.seed_list)
    execute(args, argv, grid)
    runs = [load_run(runs_dir, s) for s in grid]
    chosen = sweep_stats.select_lr(runs, args.tune_list)
    rest = plan_runs(args.methods, args.lr_grid, args.tune_list, args.seed_list, chosen)
    execute(args, argv, rest)
    runs += [load_run(runs_dir, s) for s in rest]
    res = summarize(args, runs, chosen, time.perf_counter() - t0)
    (args.sweep_dir / "results.json").write_text(json.dumps(_finite(res), indent=2, allow_nan=False))
    text = format_sweep_markdown(res)
    (args.sweep_dir / "results.md").write_text(text)
    plot_sweep(res, args.sweep_dir)
    print(text)
    for line in res["lr_edge_warnings"]:
        print(f"[sweep] warning: {line}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
