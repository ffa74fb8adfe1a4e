"""Randomised SVD (the LoRA-GA reference's q = min(4r, min(m, n)) sketch) against NumPy's exact SVD."""

import jax
import numpy as np
import pytest

from lorapro_jax.init import randomized_svd, truncated_svd


def _matrix(m, n, spectrum, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, len(spectrum))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(spectrum))))
    return (u * np.asarray(spectrum)) @ v.T


def _proj(basis):
    return basis @ basis.T


def test_randomized_top_subspace_matches_exact_with_spectral_gap():
    m, n, r = 60, 40, 3
    k = 2 * r
    q = min(4 * r, min(m, n))
    # Top 2r values well separated from the tail (gap 10 -> 0.3).
    spectrum = np.concatenate([np.linspace(10.0, 5.0, k), 0.3 * 0.9 ** np.arange(n - k)])
    g = _matrix(m, n, spectrum).astype(np.float32)
    u_np, s_np, vt_np = np.linalg.svd(g.astype(np.float64))
    u, s, vt = truncated_svd(g, k, method="randomized", q=q, key=jax.random.key(0), n_iter=4)
    assert u.shape == (m, k) and s.shape == (k,) and vt.shape == (k, n)
    u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(vt @ vt.T, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(s, s_np[:k], rtol=1e-4)
    # Subspace distance ||P - P_exact||_2 of the top-2r left/right singular subspaces.
    assert np.linalg.norm(_proj(u) - _proj(u_np[:, :k]), 2) < 1e-3
    assert np.linalg.norm(_proj(vt.T) - _proj(vt_np[:k].T), 2) < 1e-3
    # Individual well-separated vectors agree up to sign.
    np.testing.assert_allclose(np.abs(np.sum(u * u_np[:, :k], axis=0)), 1.0, atol=1e-4)


def test_power_iterations_matter_without_a_gap_and_full_is_exact():
    m, n, k = 50, 45, 4
    spectrum = 1.0 / (1.0 + np.arange(min(m, n))) ** 0.3  # slow decay, no gap
    g = _matrix(m, n, spectrum, seed=1).astype(np.float32)
    _, s_np, _ = np.linalg.svd(g.astype(np.float64))
    best = np.sum(s_np[k:] ** 2)

    def resid(n_iter):
        u, s, vt = randomized_svd(g, 2 * k, key=jax.random.key(2), n_iter=n_iter)
        approx = (np.asarray(u[:, :k]) * np.asarray(s[:k])) @ np.asarray(vt[:k])
        return np.sum((g - approx) ** 2)

    assert resid(0) > resid(4) >= best * (1 - 1e-4)
    assert resid(4) < best * 1.05  # near-optimal rank-k residual
    _, s, _ = truncated_svd(g, k, method="full")
    np.testing.assert_allclose(np.asarray(s), s_np[:k], rtol=1e-5)


def test_errors():
    g = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"q must be in \[1, min\(m, n\)\] = \[1, 4\]"):
        randomized_svd(g, 5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        truncated_svd(g, 2, method="randomized")
    with pytest.raises(ValueError, match="smaller than the number of triplets"):
        truncated_svd(g, 3, q=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="'full' or 'randomized'"):
        truncated_svd(g, 2, method="lanczos")
