"""Classification, regression and generation metrics in plain NumPy / Python.

These are the metrics used by the GLUE benchmark (accuracy, binary F1, Matthews correlation,
Pearson and Spearman correlation). They take host arrays (NumPy or anything ``np.asarray``
accepts, including JAX arrays) and return Python floats, so they can be called on gathered
predictions at the end of an evaluation loop without any extra dependency (no scikit-learn or
SciPy needed).

Generation metrics (:func:`extract_answer`, :func:`exact_match`, :func:`perplexity`) score generated text
the GSM8K way: the answer is the number after the last ``####`` (the GSM8K reference format), else the last
number in the text; numbers are compared after :func:`normalize_number` (thousands commas, ``$``, a leading
``+`` and trailing decimal zeros removed: ``"1,000.50"`` -> ``"1000.5"``, ``"42.0"`` -> ``"42"``).

Conventions follow scikit-learn / SciPy where a quantity is undefined: F1 and Matthews
correlation return ``0.0`` when their denominator is zero; Pearson and Spearman return
``nan`` when either input is constant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "exact_match",
    "extract_answer",
    "normalize_number",
    "perplexity",
    "f1_score",
    "matthews_corrcoef",
    "pearson_corr",
    "spearman_corr",
    "rankdata",
]


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_1d(predictions, "predictions")
    y = _as_1d(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} differ in shape")
    if p.size == 0:
        raise ValueError("metrics need at least one example")
    return p, y


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to the labels.

    Args:
        predictions: Predicted class ids, shape ``(N,)``.
        labels: True class ids, shape ``(N,)``.

    Returns:
        ``mean(predictions == labels)`` in ``[0, 1]``.
    """
    p, y = _check_pair(predictions, labels)
    return float(np.mean(p == y))


def f1_score(predictions: Any, labels: Any, pos_label: int = 1) -> float:
    """Binary F1 score of the positive class.

    ``F1 = 2 TP / (2 TP + FP + FN)``; defined as ``0.0`` when there are no positive
    predictions and no positive labels.

    Args:
        predictions: Predicted class ids, shape ``(N,)``.
        labels: True class ids, shape ``(N,)``.
        pos_label: The class id treated as positive.

    Returns:
        The F1 score in ``[0, 1]``.
    """
    p, y = _check_pair(predictions, labels)
    pp = p == pos_label
    yp = y == pos_label
    tp = float(np.sum(pp & yp))
    fp = float(np.sum(pp & ~yp))
    fn = float(np.sum(~pp & yp))
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0.0 else 2.0 * tp / denom


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin's R_K statistic).

    With confusion matrix ``C`` (rows = true class, columns = predicted class), ``t_k`` the
    true-class counts, ``p_k`` the predicted-class counts, ``c = trace(C)`` and ``s = N``:
    ``MCC = (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``. For two classes this is the usual
    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.

    Args:
        predictions: Predicted class ids, shape ``(N,)``.
        labels: True class ids, shape ``(N,)``.

    Returns:
        MCC in ``[-1, 1]``; ``0.0`` when the denominator is zero (e.g. constant predictions).
    """
    p, y = _check_pair(predictions, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inv[: y.size], inv[y.size :]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t = conf.sum(axis=1)
    pk = conf.sum(axis=0)
    c = np.trace(conf)
    s = conf.sum()
    cov_yp = c * s - t @ pk
    cov_pp = s * s - pk @ pk
    cov_yy = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return 0.0 if denom == 0.0 else float(cov_yp / denom)


def pearson_corr(predictions: Any, labels: Any) -> float:
    """Pearson product-moment correlation.

    Args:
        predictions: Real-valued predictions, shape ``(N,)``.
        labels: Real-valued targets, shape ``(N,)``.

    Returns:
        The correlation in ``[-1, 1]``, or ``nan`` if either input is constant.
    """
    p, y = _check_pair(predictions, labels)
    p = p.astype(np.float64) - np.mean(p, dtype=np.float64)
    y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
    denom = np.sqrt(np.sum(p * p) * np.sum(y * y))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.sum(p * y) / denom, -1.0, 1.0))


def rankdata(x: Any) -> np.ndarray:
    """Ranks ``1..N`` of a 1-D array, ties receiving the average of their ranks.

    Args:
        x: Values, shape ``(N,)``.

    Returns:
        float64 ranks, shape ``(N,)``.
    """
    a = _as_1d(x, "x")
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values in the sorted array.
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [a.size]])
    avg_rank = (starts + ends - 1) / 2.0 + 1.0  # ranks are 1-based
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def spearman_corr(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks).

    Args:
        predictions: Real-valued predictions, shape ``(N,)``.
        labels: Real-valued targets, shape ``(N,)``.

    Returns:
        The rank correlation in ``[-1, 1]``, or ``nan`` if either input is constant.
    """
    p, y = _check_pair(predictions, labels)
    return pearson_corr(rankdata(p), rankdata(y))


# ----------------------------------------------------------------------------------------------
# Generation metrics
# ----------------------------------------------------------------------------------------------

# a sign only where it cannot be a binary operator ("5-3" holds 5 and 3; "x = -3" holds -3)
_NUMBER = re.compile(r"(?:(?<![\w.)])[-+])?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number written in ``text`` (``None`` if it is not one).

    Removes ``$``, spaces, thousands commas and a leading ``+``; drops trailing decimal zeros and a trailing
    ``.``; ``-0`` is ``0``. Examples: ``"1,234"`` -> ``"1234"``, ``"$5.50"`` -> ``"5.5"``, ``"42.0"`` -> ``"42"``.
    """
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    s = s[1:] if s.startswith("+") else s
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    out = format(d.normalize(), "f")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return "0" if out in ("-0", "") else out


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a generated or reference solution, normalised (``None`` if there is none).

    The first number after the last ``####`` when the text has one (GSM8K), else the last number in the text.
    """
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Per-example exact match of generated texts against reference solutions.

    Where the reference holds a number, the extracted answers (:func:`extract_answer`) must be equal; a
    prediction without a number is wrong. Where it holds none, the stripped texts must be equal.

    Returns:
        One bool per example (``mean`` of it is the exact-match score).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = []
    for p, r in zip(predictions, references):
        ref = extract_answer(r)
        out.append(p.strip() == r.strip() if ref is None else extract_answer(p) == ref)
    return out


def perplexity(nll_sum: float, tokens: float) -> float:
    """``exp(nll_sum / tokens)``: the perplexity of a masked next-token loss summed over ``tokens`` targets.

    Returns:
        ``inf`` when the mean loss overflows ``exp``; raises for ``tokens <= 0``.
    """
    if tokens <= 0:
        raise ValueError("perplexity needs at least one target token")
    mean = float(nll_sum) / float(tokens)
    return math.exp(mean) if mean < 709.0 else math.inf
