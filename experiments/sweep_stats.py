"""The statistics of ``experiments.sweep``: learning-rate selection on validation, bootstrap intervals.

Pure NumPy on run records; no JAX, no files. A run record is a dict with ``method``, ``lr``, ``seed``,
``val`` (the primary metric on the validation split at the end of training), ``train_loss`` (mean over the
last epoch), ``failed`` (bool) and, for finished runs, the final split's per-example ``scores`` / ``labels``.

Selection (:func:`select_lr`): for each method, the lr with the highest mean validation metric over the
tuning seeds; a failed (diverged) run counts as the worst value; ties go to the lower mean train loss, then the
smaller lr. The test split is never read.

Interval (:func:`bootstrap_interval`): a two-level percentile bootstrap over seeds and test examples. With
``S`` seeds and ``n`` test examples, ``rng = np.random.default_rng(seed)`` draws the seed indices
``rng.integers(0, S, (B, S))`` and then the example indices ``rng.integers(0, n, (B, n))``; replicate ``b``
is ``mean_{j} metric(run s_bj on examples e_b)`` (the same resampled test set for every seed of the
replicate, since all runs are scored on the same test set); the interval is the
``(1 - level)/2`` and ``(1 + level)/2`` percentiles (``np.percentile``, linear) of the ``B`` replicates. It
covers both the seed-to-seed variation and the finite test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "accuracy_metric",
    "exact_match_metric",
    "bootstrap_difference",
    "bootstrap_interval",
    "mean_std",
    "select_lr",
    "validation_table",
]

Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy_metric(scores: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``argmax(scores, -1)`` ``(n, C)`` against ``labels`` ``(n,)``."""
    return float(np.mean(np.argmax(scores, -1) == labels))


def exact_match_metric(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact match of generated answers: ``scores`` ``(n, 1)`` is 1.0 where the answer is right (labels unused;
    causal-LM runs write ones)."""
    return float(np.mean(np.asarray(scores)[:, 0] > 0.5))


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; ``None`` for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _score(run: dict[str, Any]) -> float:
    v = run.get("val")
    return -math.inf if run.get("failed") or v is None or not math.isfinite(v) else float(v)


def validation_table(runs: Sequence[dict[str, Any]], tune_seeds: Sequence[int]) -> dict[str, dict[float, dict]]:
    """``{method: {lr: {"val_mean", "val_std", "train_loss_mean", "n", "failed"}}}`` over the tuning seeds."""
    table: dict[str, dict[float, dict]] = {}
    for r in runs:
        if r["seed"] not in tune_seeds:
            continue
        cell = table.setdefault(r["method"], {}).setdefault(float(r["lr"]), {"vals": [], "losses": [], "failed": 0})
        cell["vals"].append(_score(r))
        cell["failed"] += bool(r.get("failed"))
        if not r.get("failed") and r.get("train_loss") is not None:
            cell["losses"].append(float(r["train_loss"]))
    out: dict[str, dict[float, dict]] = {}
    for method, by_lr in table.items():
        out[method] = {}
        for lr, c in sorted(by_lr.items()):
            vals = np.asarray(c["vals"])
            finite = vals[np.isfinite(vals)]
            mean = float(vals.mean()) if np.all(np.isfinite(vals)) else -math.inf
            out[method][lr] = {
                "val_mean": mean,
                "val_std": mean_std(finite)[1] if finite.size == vals.size and vals.size > 1 else None,
                "train_loss_mean": float(np.mean(c["losses"])) if c["losses"] else math.inf,
                "n": int(vals.size),
                "failed": c["failed"],
            }
    return out


def select_lr(runs: Sequence[dict[str, Any]], tune_seeds: Sequence[int]) -> dict[str, float]:
    """Each method's learning rate, chosen on the validation metric of the tuning seeds only.

    Returns:
        ``{method: lr}``: the highest mean validation metric (a failed run makes its lr's mean ``-inf``);
        ties broken by the lower mean train loss, then the smaller lr.

    Raises:
        ValueError: every lr of a method failed.
    """
    chosen = {}
    for method, by_lr in validation_table(runs, tune_seeds).items():
        best = min(by_lr, key=lambda lr: (-by_lr[lr]["val_mean"], by_lr[lr]["train_loss_mean"], lr))
        if not math.isfinite(by_lr[best]["val_mean"]):
            raise ValueError(f"{method}: every learning rate of the grid failed {sorted(by_lr)}")
        chosen[method] = best
    return chosen


def _check_aligned(labels: Sequence[np.ndarray]) -> np.ndarray:
    first = np.asarray(labels[0])
    for y in labels[1:]:
        if np.asarray(y).shape != first.shape or not np.array_equal(np.asarray(y), first):
            raise ValueError("runs were scored on different test sets (labels differ); one task and data seed only")
    return first


def _replicates(
    scores: Sequence[np.ndarray], labels: np.ndarray, metric: Metric, s_idx: np.ndarray, e_idx: np.ndarray
) -> np.ndarray:
    """Replicate statistics ``(B,)`` for given seed indices ``(B, S)`` and example indices ``(B, n)``."""
    n_rep = e_idx.shape[0]
    if metric is accuracy_metric:  # vectorised: per-seed correctness (S, n) -> per (seed, replicate) accuracy
        correct = np.stack([np.argmax(s, -1) == labels for s in scores]).astype(np.float64)  # (S, n)
        acc = correct[:, e_idx].mean(-1)  # (S, B)
    else:
        acc = np.array([[metric(s[e], labels[e]) for e in e_idx] for s in scores])  # (S, B)
    return acc[s_idx, np.arange(n_rep)[:, None]].mean(-1)


def bootstrap_interval(
    scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, metric: Metric = accuracy_metric,
    replicates: int = 2000, level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap over seeds and test examples (module docstring: the exact protocol).

    Args:
        scores: per seed, the final split's class scores ``(n, C)``.
        labels: per seed, the labels ``(n,)`` (must be equal: one test set).
        metric: ``metric(scores, labels) -> float``.
        replicates: ``B``.
        level: coverage of the interval.
        seed: seed of the bootstrap's generator.

    Returns:
        ``{"mean", "std" (over seeds, ddof 1; None for one seed), "low", "high", "per_seed", "replicates",
        "level"}``.
    """
    y = _check_aligned(labels)
    per_seed = [metric(np.asarray(s), y) for s in scores]
    rng = np.random.default_rng(seed)
    n_seeds, n = len(scores), y.shape[0]
    s_idx = rng.integers(0, n_seeds, (replicates, n_seeds))
    e_idx = rng.integers(0, n, (replicates, n))
    stats = _replicates([np.asarray(s) for s in scores], y, metric, s_idx, e_idx)
    low, high = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    mean, std = mean_std(per_seed)
    return {"mean": mean, "std": std, "low": float(low), "high": float(high), "per_seed": per_seed,
            "replicates": replicates, "level": level}


def bootstrap_difference(
    scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
    metric: Metric = accuracy_metric, replicates: int = 2000, level: float = 0.95, seed: int = 0,
) -> dict[str, Any]:
    """Interval of ``mean(a) - mean(b)``: the same resampled test set for both methods in each replicate
    (paired over examples), seeds resampled independently per method (seed indices of ``a``, then of ``b``,
    then the example indices)."""
    y = _check_aligned(labels)
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    sa = rng.integers(0, len(scores_a), (replicates, len(scores_a)))
    sb = rng.integers(0, len(scores_b), (replicates, len(scores_b)))
    e_idx = rng.integers(0, n, (replicates, n))
    diff = (_replicates([np.asarray(s) for s in scores_a], y, metric, sa, e_idx)
            - _replicates([np.asarray(s) for s in scores_b], y, metric, sb, e_idx))
    low, high = np.percentile(diff, [50 * (1 - level), 50 * (1 + level)])
    point = np.mean([metric(np.asarray(s), y) for s in scores_a]) - np.mean([metric(np.asarray(s), y) for s in scores_b])
    return {"diff": float(point), "low": float(low), "high": float(high), "excludes_zero": bool(low > 0 or high < 0)}
