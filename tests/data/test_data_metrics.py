"""Metrics against hand-worked examples and independent brute-force formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorapro_jax.data import (
    accuracy,
    compute_glue_metrics,
    f1_score,
    matthews_corrcoef,
    pearson_corr,
    rankdata,
    spearman_corr,
)


def _brute_f1(p, y):
    tp = sum(1 for a, b in zip(p, y) if a == 1 and b == 1)
    fp = sum(1 for a, b in zip(p, y) if a == 1 and b != 1)
    fn = sum(1 for a, b in zip(p, y) if a != 1 and b == 1)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec else 0.0


def _brute_mcc_binary(p, y):
    tp = sum(1 for a, b in zip(p, y) if a == 1 and b == 1)
    tn = sum(1 for a, b in zip(p, y) if a == 0 and b == 0)
    fp = sum(1 for a, b in zip(p, y) if a == 1 and b == 0)
    fn = sum(1 for a, b in zip(p, y) if a == 0 and b == 1)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def _mcc_via_onehot_covariance(p, y, k):
    """MCC as the correlation of one-hot indicator matrices (Gorodkin 2004, eq. 2)."""
    x = np.eye(k)[y]
    z = np.eye(k)[p]
    xc, zc = x - x.mean(0), z - z.mean(0)
    return float((xc * zc).sum() / math.sqrt((xc * xc).sum() * (zc * zc).sum()))


def _brute_pearson(a, b):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def _brute_ranks(a):
    # rank = (# strictly smaller) + (# equal + 1) / 2   (average rank of a tie group)
    return [sum(1 for y in a if y < x) + (sum(1 for y in a if y == x) + 1) / 2 for x in a]


def test_accuracy_small():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    assert accuracy(np.array([1]), np.array([0])) == 0.0


def test_f1_hand_example_and_edge_cases():
    # TP=2 (idx 0, 4), FP=1 (idx 1), FN=1 (idx 3): F1 = 4 / 6.
    assert f1_score([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert f1_score([0, 0], [0, 0]) == 0.0
    assert f1_score([1, 1], [1, 1]) == 1.0
    assert f1_score([0, 1], [1, 0], pos_label=0) == 0.0


def test_f1_random_against_bruteforce():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, y = rng.integers(0, 2, 37), rng.integers(0, 2, 37)
        assert f1_score(p, y) == pytest.approx(_brute_f1(p.tolist(), y.tolist()))


def test_mcc_known_values():
    # Classic 4-sample example: TP=2, TN=0, FP=1, FN=1 -> (0 - 1) / sqrt(3*3*1*1) = -1/3.
    assert matthews_corrcoef([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(-1 / 3)
    assert matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction


def test_mcc_random_against_independent_formulas():
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert matthews_corrcoef(p, y) == pytest.approx(_brute_mcc_binary(p.tolist(), y.tolist()))
    for _ in range(20):
        p, y = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
        assert matthews_corrcoef(p, y) == pytest.approx(_mcc_via_onehot_covariance(p, y, 4))


def test_pearson_against_bruteforce_and_edges():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert pearson_corr(a, b) == pytest.approx(_brute_pearson(a.tolist(), b.tolist()))
    assert pearson_corr([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson_corr([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson_corr([1, 1, 1], [1, 2, 3]))


def test_rankdata_ties():
    x = [10, 20, 20, 5, 20, 10]
    np.testing.assert_allclose(rankdata(x), _brute_ranks(x))
    np.testing.assert_allclose(rankdata([3.0, 1.0, 2.0]), [3, 1, 2])


def test_spearman_against_closed_form_and_bruteforce():
    rng = np.random.default_rng(3)
    a, b = rng.permutation(25).astype(float), rng.permutation(25).astype(float)
    n = 25
    d2 = float(np.sum((a - b) ** 2))  # both are already ranks 0..n-1 without ties
    assert spearman_corr(a, b) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    # With ties: Pearson of brute-force average ranks.
    c, e = rng.integers(0, 5, 40).tolist(), rng.integers(0, 5, 40).tolist()
    expected = _brute_pearson(_brute_ranks(c), _brute_ranks(e))
    assert spearman_corr(c, e) == pytest.approx(expected)
    # Invariant under strictly increasing transforms.
    x = rng.normal(size=20)
    y = rng.normal(size=20)
    assert spearman_corr(np.exp(x), y**3) == pytest.approx(spearman_corr(x, y))


def test_against_scipy_if_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 6, 80).astype(float), rng.normal(size=80)
    assert pearson_corr(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert spearman_corr(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


def test_shape_checks():
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        f1_score(np.zeros((2, 2)), np.zeros((2, 2)))


def test_compute_glue_metrics_per_task():
    logits = np.array([[2.0, 0.1], [0.0, 1.0], [0.3, 0.2], [0.0, 5.0]])
    labels = np.array([0, 1, 1, 1])
    m = compute_glue_metrics("mrpc", logits, labels)
    assert set(m) == {"accuracy", "f1", "combined_score"}
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(_brute_f1([0, 1, 0, 1], labels.tolist()))
    assert m["combined_score"] == pytest.approx((m["accuracy"] + m["f1"]) / 2)

    m = compute_glue_metrics("cola", [0, 1, 1, 1], labels)
    assert set(m) == {"matthews_corrcoef", "accuracy"}
    assert m["matthews_corrcoef"] == pytest.approx(1.0)

    m = compute_glue_metrics("mnli", np.eye(3)[[0, 1, 2, 2]], [0, 1, 2, 0])
    assert m == {"accuracy": pytest.approx(0.75)}

    scores = np.array([[0.5], [1.5], [3.0], [4.0]])
    m = compute_glue_metrics("stsb", scores, [0.0, 2.0, 2.5, 5.0])
    assert m["pearson"] == pytest.approx(_brute_pearson([0.5, 1.5, 3, 4], [0, 2, 2.5, 5]))
    assert m["spearman"] == pytest.approx(1.0)


def test_compute_glue_metrics_drops_zero_weight_rows():
    preds = [1, 1, 0, 0]
    labels = [1, 1, 1, 1]
    m = compute_glue_metrics("sst2", preds, labels, weights=[1.0, 1.0, 0.0, 0.0])
    assert m["accuracy"] == 1.0
