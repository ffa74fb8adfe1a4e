"""Result tables for ``experiments.finetune`` runs and ``experiments.sweep`` results.

Every run writes ``<out-dir>/<run-name>/summary.json``; this module turns a list of such summaries
into a per-run table and a per-(task, method) table of mean ± std over seeds, and a sweep's
``results.json`` content into its ``results.md`` (:func:`format_sweep_markdown`).

Usage::

    python -m experiments.report                 # all runs under ./runs
    python -m experiments.report --runs runs --markdown
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "aggregate",
    "format_mean_table",
    "format_runs_table",
    "format_sweep_markdown",
    "load_summaries",
    "main",
    "primary_metric",
]


def load_summaries(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Read every ``<runs_dir>/*/summary.json`` (sorted by run name).

    Raises:
        FileNotFoundError: ``runs_dir`` does not exist.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    out = []
    for path in sorted(root.glob("*/summary.json")):
        with open(path) as f:
            out.append(json.load(f))
    return out


def primary_metric(summary: dict[str, Any]) -> tuple[str, float | None]:
    """``(name, value)`` of the metric a run is judged by (``summary["primary_metric"]`` on the final split)."""
    name = summary.get("primary_metric", "accuracy")
    final = summary.get("final_metrics") or {}
    value = final.get(name)
    return name, (None if value is None else float(value))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    # sample standard deviation (ddof=1), 0 for a single seed
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def method_order(method: str) -> tuple[int, str]:
    """Sort key of a method: the order of ``experiments.cli.METHODS`` (lora, lora-pro, ..., full), others after."""
    from .cli import METHODS

    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def _ordered(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs by task (first-seen order), then method (:func:`method_order`), then seed."""
    tasks: dict[str, int] = {}
    for s in summaries:
        tasks.setdefault(s["task"], len(tasks))
    return sorted(summaries, key=lambda s: (tasks[s["task"]], method_order(s["method"]), str(s.get("peak_lr", "")),
                                            s.get("seed", 0)))


def aggregate(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by ``(task, method)`` (tasks in first-seen order, methods as in ``--method``'s list) and
    average over seeds.

    Returns:
        One dict per group: ``task``, ``method``, ``seeds``, ``metric`` (name), ``metric_mean``,
        ``metric_std`` (sample std, 0 for one seed; in the metric's own units, e.g. accuracy in
        [0, 1]), ``loss_mean``, ``loss_std``, ``trainable_params``, ``wall_mean``,
        ``step_time_mean``.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in _ordered(summaries):
        groups.setdefault((s["task"], s["method"]), []).append(s)
    rows = []
    for (task, method), runs in groups.items():
        name = primary_metric(runs[0])[0]
        vals = [v for v in (primary_metric(r)[1] for r in runs) if v is not None]
        losses = [float(r["final_train_loss"]) for r in runs if r.get("final_train_loss") is not None]
        steps = [float(r["mean_step_time_s"]) for r in runs if r.get("mean_step_time_s") is not None]
        m, sd = _mean_std(vals) if vals else (float("nan"), float("nan"))
        lm, lsd = _mean_std(losses) if losses else (float("nan"), float("nan"))
        rows.append(
            {
                "task": task,
                "method": method,
                "seeds": sorted(r["seed"] for r in runs),
                "metric": name,
                "metric_mean": m,
                "metric_std": sd,
                "loss_mean": lm,
                "loss_std": lsd,
                "trainable_params": runs[0].get("trainable_params"),
                "wall_mean": _mean_std([float(r["wall_time_s"]) for r in runs])[0],
                "step_time_mean": _mean_std(steps)[0] if steps else float("nan"),
            }
        )
    return rows


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    """A fraction in percent with two decimals; ``n/a`` for a missing or non-finite value."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _pm(mean: float, std: float, n: int, fmt) -> str:
    """``mean ± std``, or just ``mean`` for a single seed (a std of one value is not 0, it is unknown)."""
    return fmt(mean) if n < 2 else f"{fmt(mean)} ± {fmt(std)}"


def format_runs_table(summaries: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per run: task, method, seed, peak lr, final metric (in %), train loss (mean over the
    last epoch), trainable parameters, wall time and mean step time (compile steps excluded)."""
    header = ["task", "method", "seed", "lr", "metric", "value (%)", "train loss (last-epoch mean)", "trainable",
              "wall (s)", "step (s)"]
    rows = []
    for s in _ordered(summaries):
        name, value = primary_metric(s)
        loss = s.get("final_train_loss")
        step = s.get("mean_step_time_s")
        rows.append(
            [
                s["task"],
                s["method"],
                str(s["seed"]),
                "n/a" if s.get("peak_lr") is None else f"{s['peak_lr']:g}",
                f"{s.get('final_split', '?')} {name}",
                _pct(value),
                "n/a" if loss is None else f"{loss:.4f}",
                f"{s.get('trainable_params', 0):,}",
                f"{s['wall_time_s']:.1f}",
                "n/a" if step is None else f"{step:.3f}",
            ]
        )
    return _table(header, rows, markdown)


def format_mean_table(summaries: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """One row per ``(task, method)``: metric mean ± std over seeds (in %; the mean alone for one seed),
    train loss (mean over each run's last epoch) mean ± std, trainable parameters, mean wall time."""
    header = ["task", "method", "seeds", "metric", "mean ± std (%)", "train loss (last-epoch mean)", "trainable",
              "wall (s)"]
    rows = []
    for r in aggregate(summaries):
        rows.append(
            [
                r["task"],
                r["method"],
                str(len(r["seeds"])),
                r["metric"],
                _pm(r["metric_mean"], r["metric_std"], len(r["seeds"]), _pct),
                _pm(r["loss_mean"], r["loss_std"], len(r["seeds"]), lambda x: f"{x:.4f}"),
                f"{r['trainable_params'] or 0:,}",
                f"{r['wall_mean']:.1f}",
            ]
        )
    return _table(header, rows, markdown)


def format_sweep_markdown(res: dict[str, Any]) -> str:
    """``results.md``: the tuned comparison, the validation grid and the differences to full fine-tuning."""
    metric, final = res["metric"], res["final_split"]
    lines = [f"# Sweep `{res['sweep']}`: {res['task']}", "",
             (f"lr chosen per method on {res['selection_split']} {metric} (tuning seeds {res['tune_seeds']}); "
              f"{final} {metric} over seeds {res['seeds']}: mean ± std (sample std; one seed: no std) and "
              f"{res['interval']}."), ""]
    if res["selection_split"] == final:
        lines += [f"**No test split: the {final} numbers are on the split the lr was chosen on (optimistic).**", ""]
    lines += [(f"| method | lr | seeds | {res['selection_split']} (%) | {final} mean ± std (%) | 95% interval (%) | "
               "train loss (last epoch / last step) | cos(ΔW, −g) | trainable | wall per run (s) |"), "|" + "---|" * 10]
    for m, r in res["methods"].items():
        if not r["seeds"]:
            lines.append(f"| {m} | {r['chosen_lr']:g} | 0 | failed | | | | | | |")
            continue
        std = "" if r["test_std"] is None else f" ± {_pct(r['test_std'])}"
        cos = "n/a" if r.get("alignment_cos_mean") is None else f"{r['alignment_cos_mean']:.3f}"
        lines.append(f"| {m} | {r['chosen_lr']:g} | {len(r['seeds'])} | {_pct(r['val_mean'])} | "
                     f"{_pct(r['test_mean'])}{std} | {_pct(r['ci_low'])} – {_pct(r['ci_high'])} | "
                     f"{r['train_loss_last_epoch_mean']:.4f} / {r['last_step_train_loss_mean']:.4f} | {cos} | "
                     f"{r['trainable_params']:,} | {r['wall_time_per_run_s']:.1f} |")
    for line in res.get("lr_edge_warnings", []):
        lines += ["", f"**Warning: {line}.**"]
    failed = {m: r["failed_seeds"] for m, r in res["methods"].items() if r["failed_seeds"]}
    if failed:
        lines += ["", f"Runs that failed at the chosen lr (left out of the mean and interval): {failed}"]
    for base, diffs in res.get("differences", {}).items():
        if not diffs:
            continue
        lines += ["", f"Difference to {base} ({final} {metric}, points; interval paired over test examples):", "",
                  f"| method - {base} | difference | 95% interval | interval excludes 0 |", "|---|---|---|---|"]
        for k, d in diffs.items():
            lines.append(f"| {k} | {100 * d['diff']:+.2f} | {100 * d['low']:+.2f} – {100 * d['high']:+.2f} | "
                         f"{'yes' if d['excludes_zero'] else 'no (within the interval)'} |")
    lines += ["", f"Validation {metric} (%) by lr (mean over the tuning seeds; * chosen; failed runs: x):", ""]
    for m, by in res["validation_by_lr"].items():
        chosen = res["methods"][m]["chosen_lr"]
        cells = [f"{lr}: " + ("x" if c["failed"] else _pct(c["val_mean"])) + ("*" if float(lr) == chosen else "")
                 for lr, c in by.items()]
        lines.append(f"- {m}: " + ", ".join(cells))
    if any(r.get("alignment_cos_mean") is not None for r in res["methods"].values()):
        lines += ["", ("cos(ΔW, −g): cosine between a step's update of the adapted kernels (for LoRA methods "
                       "s·(B'A' − BA)) and the negative full fine-tuning gradient on the same batch "
                       "(--log-alignment-every), mean over the measured steps and seeds at the chosen lr. By step "
                       "(mean over seeds):"), ""]
        for m, r in res["methods"].items():
            if r.get("alignment_cos_by_step"):
                lines.append(f"- {m}: " + ", ".join(f"step {k}: {v:.3f}" for k, v in r["alignment_cos_by_step"].items()))
    cost = ", ".join(f"{m} {c['runs']} runs {c['run_wall_time_s'] / 60:.1f} min" for m, c in res["compute"].items())
    lines += ["", f"Run time per method (sum of the runs' wall times, all invocations): {cost}.",
              f"Sweep wall time {res['sweep_wall_time_s'] / 60:.1f} min (this invocation)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """CLI entry point; prints (and returns) the per-run and mean ± std tables."""
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="directory holding <run-name>/summary.json (default: runs)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    a = p.parse_args(argv)
    summaries = load_summaries(a.runs)
    if not summaries:
        raise SystemExit(f"no */summary.json under {a.runs}")
    text = (
        format_runs_table(summaries, markdown=a.markdown)
        + "\n\n"
        + format_mean_table(summaries, markdown=a.markdown)
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
