"""LoRA-Pro's closed form against brute-force least squares and NumPy (pure functions, no model)."""

import numpy as np
import jax.numpy as jnp
import pytest

from lorapro_jax import equivalent_gradient, lora_pro_gradients
from _np_ref import best_equivalent_gradient_lstsq, lora_pro_np, proj, sylvester_kron

M, N, R, S = 7, 6, 2, 1.7


def _problem(seed, zero_b=False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((R, N))
    B = np.zeros((M, R)) if zero_b else rng.standard_normal((M, R))
    g = rng.standard_normal((M, N))
    return A, B, g, S * B.T @ g, S * g @ A.T


def _ours(A, B, gA, gB, **kw):
    ga, gb = lora_pro_gradients(*(jnp.asarray(x) for x in (A, B, gA, gB)), S, **kw)
    return np.asarray(ga), np.asarray(gb)


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetry"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equivalent_gradient_is_least_squares_optimum(x64, seed, x_mode):
    A, B, g, gA, gB = _problem(seed)
    ga, gb = _ours(A, B, gA, gB, x_mode=x_mode)
    e = np.asarray(equivalent_gradient(A, B, ga, gb, S))
    want = best_equivalent_gradient_lstsq(A, B, g, S)
    np.testing.assert_allclose(e, want, atol=1e-7)


def test_residual_is_doubly_projected_gradient(x64):
    A, B, g, gA, gB = _problem(4)
    ga, gb = _ours(A, B, gA, gB)
    e = S * (B @ ga + gb @ A)
    pb, pa = proj(B), proj(A.T)
    resid = (np.eye(M) - pb) @ g @ (np.eye(N) - pa)
    np.testing.assert_allclose(np.linalg.norm(e - g), np.linalg.norm(resid), rtol=1e-7)
    np.testing.assert_allclose(e, pb @ g + (np.eye(M) - pb) @ g @ pa, atol=1e-7)


def test_x_does_not_change_equivalent_gradient(x64):
    A, B, g, gA, gB = _problem(5)
    es = []
    for mode in ("sylvester", "zero", "symmetry"):
        ga, gb = _ours(A, B, gA, gB, x_mode=mode)
        es.append(S * (B @ ga + gb @ A))
    np.testing.assert_allclose(es[0], es[1], atol=1e-8)
    np.testing.assert_allclose(es[0], es[2], atol=1e-8)
    # ...but X does change the individual gradients.
    assert np.abs(_ours(A, B, gA, gB, x_mode="sylvester")[0] - _ours(A, B, gA, gB, x_mode="zero")[0]).max() > 1e-3


@pytest.mark.parametrize("x_mode", ["sylvester", "zero", "symmetry"])
def test_matches_independent_numpy_closed_form(x64, x_mode):
    A, B, g, gA, gB = _problem(6)
    ga, gb = _ours(A, B, gA, gB, x_mode=x_mode)
    wa, wb = lora_pro_np(A, B, gA, gB, S, x_mode=x_mode)
    np.testing.assert_allclose(ga, wa, atol=1e-8)
    np.testing.assert_allclose(gb, wb, atol=1e-8)


def test_sylvester_x_minimises_distance_to_raw_gradients(x64):
    A, B, g, gA, gB = _problem(7)
    Q = np.linalg.inv(B.T @ B)
    P = np.linalg.inv(A @ A.T)
    ga0 = Q @ gA / S**2
    gb0 = (np.eye(M) - B @ Q @ B.T) @ gB @ P / S**2

    def dist(X):
        return np.sum((ga0 + X @ A - gA) ** 2) + np.sum((gb0 - B @ X - gB) ** 2)

    ga, gb = _ours(A, B, gA, gB, x_mode="sylvester")
    X = np.linalg.lstsq(A.T, (ga - ga0).T, rcond=None)[0].T  # recover X from ĝ_A = ĝ_A0 + X A
    np.testing.assert_allclose(X @ A, ga - ga0, atol=1e-8)
    # X satisfies the Sylvester equation stated in the paper ...
    np.testing.assert_allclose(B.T @ B @ X + X @ A @ A.T, -Q @ gA @ A.T / S**2, atol=1e-7)
    # ... and is a minimiser: central differences of dist vanish, and random perturbations only increase it.
    rng = np.random.default_rng(0)
    f0 = dist(X)
    for _ in range(10):
        d = rng.standard_normal((R, R)) * 1e-3
        assert dist(X + d) > f0
    h = 1e-5
    grad = np.zeros((R, R))
    for i in range(R):
        for j in range(R):
            e = np.zeros((R, R))
            e[i, j] = h
            grad[i, j] = (dist(X + e) - dist(X - e)) / (2 * h)
    assert np.abs(grad).max() < 1e-5 * max(1.0, f0)
    assert f0 <= dist(np.zeros((R, R))) + 1e-12


def test_zero_b_init_uses_delta_as_specified(x64):
    # Standard init B = 0: (BᵀB + δI)⁻¹ = I/δ multiplies g_A = 0; the result is g P_A.
    A, B, g, gA, gB = _problem(8, zero_b=True)
    assert np.all(gA == 0)
    for mode in ("sylvester", "zero", "symmetry"):
        ga, gb = _ours(A, B, gA, gB, x_mode=mode, delta=1e-8)
        assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
        np.testing.assert_allclose(ga, 0.0, atol=1e-12)
        np.testing.assert_allclose(gb, gB @ np.linalg.inv(A @ A.T + 1e-8 * np.eye(R)) / S**2, rtol=1e-9)
        e = S * (B @ ga + gb @ A)
        np.testing.assert_allclose(e, g @ proj(A.T), atol=1e-7)


def test_zero_b_init_float32_is_finite():
    A, B, g, gA, gB = _problem(9, zero_b=True)
    ga, gb = lora_pro_gradients(*(jnp.asarray(x, jnp.float32) for x in (A, B, gA, gB)), S)
    assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gb)))
    e = S * (B @ np.asarray(ga, np.float64) + np.asarray(gb, np.float64) @ A)
    np.testing.assert_allclose(e, g @ proj(A.T), atol=1e-4)


def test_sylvester_kron_reference_is_right(x64):
    # Guard the test helper itself against a silent error.
    rng = np.random.default_rng(10)
    s1 = rng.standard_normal((3, 3)); s1 = s1 @ s1.T + np.eye(3)
    s2 = rng.standard_normal((2, 2)); s2 = s2 @ s2.T + np.eye(2)
    c = rng.standard_normal((3, 2))
    x = sylvester_kron(s1, s2, c)
    np.testing.assert_allclose(s1 @ x + x @ s2, c, atol=1e-10)
