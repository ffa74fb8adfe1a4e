"""Plot the training-loss and evaluation curves of ``experiments.finetune`` runs, and a sweep's results.

Reads ``<runs>/*/metrics.jsonl`` and writes one PNG with, per task, the training loss against the
step (mean over seeds per method, min-max band over seeds, optional moving average) and the
per-epoch evaluation metric.

Usage::

    python -m experiments.plot                           # runs/*/metrics.jsonl -> runs/loss_curves.png
    python -m experiments.plot --runs runs --out curves.png --smooth 5

:func:`plot_sweep` draws an ``experiments.sweep`` result: the validation metric against the lr per method
and the train loss at each method's chosen lr.

Needs matplotlib (``pip install 'lorapro_jax[plot]'``); uses the non-interactive Agg backend.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_curves", "main", "plot_curves", "plot_sweep"]


def load_curves(runs_dir: str | Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{task: {method: [run, ...]}}`` with each run ``{"seed", "steps", "loss", "eval_steps",
    "eval", "metric"}`` read from ``<runs_dir>/*/metrics.jsonl``.

    The first ``config`` record of a file names the task, method and seed; ``eval`` is the primary
    metric of the per-epoch evaluations on the evaluation split (``accuracy`` when present, else
    the first metric).
    """
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(Path(runs_dir).glob("*/metrics.jsonl")):
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        cfg = next((r for r in recs if r.get("type") == "config"), None)
        if cfg is None:
            continue
        train = [r for r in recs if r.get("type") == "train"]
        evals = [r for r in recs if r.get("type") == "eval"]
        split = evals[0]["split"] if evals else None
        evals = [r for r in evals if r["split"] == split]
        metric = None
        if evals:
            keys = [k for k in evals[0] if k not in ("type", "step", "epoch", "split")]
            metric = "accuracy" if "accuracy" in keys else keys[0]
        out.setdefault(cfg["task"], {}).setdefault(cfg["method"], []).append(
            {
                "seed": cfg["seed"],
                "steps": np.array([r["step"] for r in train]),
                "loss": np.array([r["loss"] for r in train], dtype=np.float64),
                "eval_steps": np.array([r["step"] for r in evals]),
                "eval": np.array([r[metric] for r in evals], dtype=np.float64) if metric else np.array([]),
                "metric": metric,
                "split": split,
            }
        )
    return out


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or y.size < 2:
        return y
    k = min(k, y.size)
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)  # growing window at the start
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def _stack(runs: list[dict[str, Any]], xkey: str, ykey: str) -> tuple[np.ndarray, np.ndarray]:
    """Common x (the shortest run's) and the ``(seeds, x)`` matrix of y."""
    n = min(r[xkey].size for r in runs)
    return runs[0][xkey][:n], np.stack([r[ykey][:n] for r in runs])


def plot_curves(curves: dict[str, dict[str, list[dict[str, Any]]]], out: str | Path, *, smooth: int = 1) -> Path:
    """Write the figure of :func:`load_curves` data to ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no runs to plot")
    tasks = sorted(curves)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        ax_loss, ax_eval = row
        for method, runs in curves[task].items():
            runs = [r for r in runs if r["steps"].size]
            if not runs:
                continue
            x, ys = _stack(runs, "steps", "loss")
            ys = np.stack([_smooth(y, smooth) for y in ys])
            label = f"{method} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            (line,) = ax_loss.plot(x, ys.mean(0), label=label)
            if len(runs) > 1:
                ax_loss.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
            ev = [r for r in runs if r["eval"].size]
            if ev:
                ex, eys = _stack(ev, "eval_steps", "eval")
                ax_eval.plot(ex, eys.mean(0), marker="o", color=line.get_color(), label=label)
                if len(ev) > 1:
                    ax_eval.fill_between(ex, eys.min(0), eys.max(0), color=line.get_color(), alpha=0.2)
        ax_loss.set(title=f"{task}: training loss" + (f" (moving average {smooth})" if smooth > 1 else ""),
                    xlabel="step", ylabel="loss")
        any_run = next(r for runs in curves[task].values() for r in runs)
        ax_eval.set(title=f"{task}: {any_run['split']} {any_run['metric']}", xlabel="step",
                    ylabel=any_run["metric"] or "")
        for ax in row:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One distinct colour (tab20: up to 20 methods) and marker per method, the same in both plots."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(methods) > 10 else "tab10"]
    return {m: {"color": cmap(i % cmap.N), "marker": "osD^v<>ph*"[i % 10]} for i, m in enumerate(methods)}


def plot_sweep(res: dict[str, Any], out_dir: Path, smooth: int = 5) -> list[Path]:
    """``accuracy_vs_lr.png`` (validation metric vs lr per method) and ``loss_at_chosen_lr.png`` (train loss,
    mean over seeds, trailing moving average of ``smooth`` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = _styles(list(res["methods"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, by in res["validation_by_lr"].items():
        lrs = [float(lr) for lr in by]
        vals = [100 * c["val_mean"] if np.isfinite(c["val_mean"]) else np.nan for c in by.values()]
        ax.plot(lrs, vals, "-", label=m, **style[m])
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"{res['selection_split']} {res['metric']} (%)")
    ax.set_title(f"{res['task']}: {res['metric']} vs lr (mean over tuning seeds)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths = [out_dir / "accuracy_vs_lr.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m, r in res["methods"].items():
        if r["seeds"]:
            curve = _smooth(np.asarray(r["loss_curve_mean"]), max(1, smooth))
            ax.plot(np.arange(1, curve.size + 1), curve, label=f"{m} (lr {r['chosen_lr']:g})",
                    color=style[m]["color"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean over seeds)")
    avg = f", moving average of {smooth} steps" if smooth > 1 else ""
    ax.set_title(f"{res['task']}: train loss at each method's chosen lr{avg}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths.append(out_dir / "loss_at_chosen_lr.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs", help="directory of <run-name>/metrics.jsonl (default: runs)")
    p.add_argument("--out", default=None, help="output PNG (default: <runs>/loss_curves.png)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window of the loss (steps)")
    a = p.parse_args(argv)
    out = plot_curves(load_curves(a.runs), a.out or Path(a.runs) / "loss_curves.png", smooth=a.smooth)
    print(out)
    return out


if __name__ == "__main__":
    main()
