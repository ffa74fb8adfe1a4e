"""The r x r linear algebra against NumPy."""

import numpy as np
import jax.numpy as jnp
import pytest

from lorapro_jax.optim.linalg import damped_pinv, solve_sylvester_psd


def _spd(rng, r, rank=None):
    m = rng.standard_normal((r, rank or r))
    return m @ m.T


@pytest.mark.parametrize("delta", [0.0, 1e-8, 1e-2])
def test_damped_pinv_matches_numpy(x64, delta):
    rng = np.random.default_rng(0)
    m = _spd(rng, 5)
    got = np.asarray(damped_pinv(jnp.asarray(m), delta))
    want = np.linalg.pinv(m + delta * np.eye(5))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_damped_pinv_of_zero_matrix_is_identity_over_delta(x64):
    got = np.asarray(damped_pinv(jnp.zeros((4, 4)), 1e-8))
    np.testing.assert_allclose(got, np.eye(4) / 1e-8, rtol=1e-12)


def test_damped_pinv_singular_drops_null_space(x64):
    rng = np.random.default_rng(1)
    m = _spd(rng, 5, rank=3)
    got = np.asarray(damped_pinv(jnp.asarray(m), 0.0))
    np.testing.assert_allclose(got, np.linalg.pinv(m, rcond=1e-10, hermitian=True), atol=1e-8)


def test_sylvester_satisfies_equation(x64):
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 4), _spd(rng, 3)
    s1, s2 = s1 + 0.1 * np.eye(4), s2 + 0.1 * np.eye(3)
    c = rng.standard_normal((4, 3))
    x = np.asarray(solve_sylvester_psd(jnp.asarray(s1), jnp.asarray(s2), jnp.asarray(c)))
    np.testing.assert_allclose(s1 @ x + x @ s2, c, atol=1e-10)


def test_sylvester_singular_gives_min_norm_least_squares(x64):
    # Both matrices singular: (I ⊗ s1 + s2ᵀ ⊗ I) vec(X) = vec(C) is rank deficient; compare with lstsq.
    rng = np.random.default_rng(3)
    s1, s2 = _spd(rng, 4, rank=2), _spd(rng, 3, rank=1)
    c = rng.standard_normal((4, 3))
    x = np.asarray(solve_sylvester_psd(jnp.asarray(s1), jnp.asarray(s2), jnp.asarray(c)))
    k = np.kron(np.eye(3), s1) + np.kron(s2.T, np.eye(4))
    want = np.linalg.lstsq(k, c.reshape(-1, order="F"), rcond=1e-10)[0].reshape(4, 3, order="F")
    np.testing.assert_allclose(x, want, atol=1e-8)
