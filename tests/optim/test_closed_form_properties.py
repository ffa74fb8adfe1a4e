"""Property-based tests (hypothesis) of LoRA-Pro's closed form over random shapes, ranks, magnitudes and dtypes.

References are computed independently in NumPy float64 from singular value decompositions, never from
lorapro_jax code:

* the equivalent gradient ``s (B ĝ_A + ĝ_B A)`` must equal the projection formula
  ``P_B g + (I − P_B) g P_A``. With the damping δ of ``(BᵀB + δI)⁻¹`` / ``(AAᵀ + δI)⁻¹`` the algebra gives
  exactly the same formula with *damped* projectors ``P̃_B = U diag(σ²/(σ² + δ)) Uᵀ`` (σ, U from the SVD of
  B; likewise ``P̃_A`` from A). That is what is checked for every input; where every non-zero singular value
  has ``σ² ≥ 1e4 δ`` it is also within ``δ/σ²_min`` of the undamped formula, which is checked too. δ changes
  the result legitimately only for singular values near ``√δ = 1e-4``; at ``B = 0`` exactly the expected
  result is ``ĝ_A = 0`` and ``ẽ = g P̃_A`` (``Q = I/δ`` multiplies ``g_A = 0``).
* the ``X`` of ``x_mode="sylvester"``, recovered from the difference to ``x_mode="zero"``
  (``ĝ_A^syl − ĝ_A^zero = X A``), satisfies ``(BᵀB) X + X (AAᵀ) = −Q g_A Aᵀ / s²``.

Inputs. ``A`` (r x n) and ``B`` (m x r) get ``k ≤ r`` active rank slots (the others exactly zero, as a pruned
or gated rank leaves them), whose singular values lie within a factor 3 of a magnitude ``10^e``, ``e`` in
[-4, 4] (f64: [-5, 5]); ``g`` has its own magnitude. ``r`` may exceed ``min(m, n)``. Rank deficiency is
exact zeros, not a generic low-rank product: rounding a generic low-rank product to float32 leaves "null"
singular values at ``eps·σ_max``, which the damped inverse weighs by ``1/δ`` — that amplifies float32 rounding
(measured: up to 1e-2 relative error of ẽ for σ_max(B) ≈ 0.1; the reference code's ``pinv`` behaves the same),
see the float64 test that covers generic rank deficiency.

Tolerances (relative to ``‖g‖``): float64 1e-9 (generic rank-deficient: conditioning-limited, see there),
float32 5e-6 (measured worst over 60 examples: 3.0e-7), bfloat16 inputs (computed in float32) 2e-2 (measured
worst 3.4e-3) — bf16 rounds ``g_A``, ``g_B`` independently of ``g`` (relative 4e-3), and the map from them to ẽ
has gain up to the condition number (≤ 3 here) on each side. Mutants checked by hand: δ = 1e-5 instead of
1e-8 fails the projection test; ``"symmetry"`` in place of ``"sylvester"`` fails the Sylvester test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorapro_jax as lp

DELTA = 1e-8
SETTINGS = dict(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TOL = {"float64": 1e-9, "float32": 5e-6, "bfloat16": 2e-2}


def _orth(rng, rows, cols):
    q, _ = np.linalg.qr(rng.standard_normal((rows, max(rows, cols))))
    return q[:, :cols] if cols <= rows else None


def _factor(rng, rows, r, active, magnitude):
    """An (rows x r) matrix with ``active`` non-zero columns (random slots), singular values in [1, 3]·magnitude."""
    out = np.zeros((rows, r))
    if active == 0:
        return out
    slots = rng.choice(r, size=active, replace=False)
    u = _orth(rng, rows, active)  # active <= rows
    w = _orth(rng, active, active)
    sv = rng.uniform(1.0, 3.0, active) * magnitude
    out[:, slots] = (u * sv) @ w.T
    return out


def _held(x, dtype):
    """``x`` as ``dtype`` holds it, back in float64."""
    if dtype == "float64":
        return x
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


@st.composite
def problems(draw, dtype):
    lo, hi = (-5, 5) if dtype == "float64" else (-4, 4)
    m = draw(st.integers(1, 6))
    n = draw(st.integers(1, 6))
    r = draw(st.integers(1, min(m, n) + 1))
    act_b = draw(st.integers(0, min(r, m)))
    act_a = draw(st.integers(0, min(r, n)))
    e_a, e_b, e_g = (draw(st.integers(lo, hi)) for _ in range(3))
    s = draw(st.sampled_from([0.5, 2.0, 16.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    B = _factor(rng, m, r, act_b, 10.0**e_b)  # paper layout (m, r)
    A = _factor(rng, n, r, act_a, 10.0**e_a).T  # (r, n)
    g = rng.standard_normal((m, n)) * 10.0**e_g
    # the inputs exactly as the dtype holds them; the LoRA gradients computed in float64 from those
    A, B, g = (_held(x, dtype) for x in (A, B, g))
    gA, gB = s * B.T @ g, s * g @ A.T
    return A, B, g, gA, gB, s


def _damped_projector(M, side):
    u, sv, vt = np.linalg.svd(M, full_matrices=False)
    w = sv**2 / (sv**2 + DELTA)
    return (u * w) @ u.T if side == "col" else (vt.T * w) @ vt


def _exact_projector(M, side):
    u, sv, vt = np.linalg.svd(M, full_matrices=False)
    keep = sv > 1e-12 * max(sv.max(initial=0.0), 1e-300)
    return (u[:, keep]) @ u[:, keep].T if side == "col" else vt[keep].T @ vt[keep]


def _ours(A, B, gA, gB, s, dtype, x_mode="sylvester"):
    args = (jnp.asarray(x, dtype) for x in (A, B, gA, gB))
    ga, gb = lp.lora_pro_gradients(*args, s, delta=DELTA, x_mode=x_mode)
    return np.asarray(ga, np.float64), np.asarray(gb, np.float64)


def _check_projection(A, B, g, gA, gB, s, dtype):
    ga, gb = _ours(A, B, gA, gB, s, dtype)
    assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
    e = s * (B @ ga + gb @ A)
    m = B.shape[0]
    gnorm = np.linalg.norm(g)
    pb, pa = _damped_projector(B, "col"), _damped_projector(A, "row")
    damped = pb @ g + (np.eye(m) - pb) @ g @ pa
    assert np.linalg.norm(e - damped) <= TOL[dtype] * gnorm, (np.linalg.norm(e - damped) / gnorm, dtype)
    sv = np.concatenate([np.linalg.svd(B, compute_uv=False), np.linalg.svd(A, compute_uv=False)])
    nonzero = sv[sv > 0]
    if nonzero.size and nonzero.min() ** 2 >= 1e4 * DELTA:
        pbx, pax = _exact_projector(B, "col"), _exact_projector(A, "row")
        exact = pbx @ g + (np.eye(m) - pbx) @ g @ pax
        bound = TOL[dtype] + 2 * DELTA / nonzero.min() ** 2
        assert np.linalg.norm(e - exact) <= bound * gnorm
    return ga, gb, e


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_equivalent_gradient_is_the_projection_formula(dtype):
    @settings(**SETTINGS)
    @given(problems(dtype))
    def check(p):
        _check_projection(*p, dtype)

    check()


def test_equivalent_gradient_is_the_projection_formula_float64(x64):
    @settings(**SETTINGS)
    @given(problems("float64"))
    def check(p):
        _check_projection(*p, "float64")

    check()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_factors_give_what_the_damping_prescribes(dtype):
    @settings(**SETTINGS)
    @given(problems(dtype), st.sampled_from(["b", "a", "both"]))
    def check(p, which):
        A, B, g, _, _, s = p
        if which in ("b", "both"):
            B = np.zeros_like(B)
        if which in ("a", "both"):
            A = np.zeros_like(A)
        gA, gB = s * B.T @ g, s * g @ A.T
        ga, gb, e = _check_projection(A, B, g, gA, gB, s, dtype)
        tol = TOL[dtype] * np.linalg.norm(g)
        if which == "b":  # Q = I/δ meets g_A = 0: ĝ_A = 0 exactly, ĝ_B = g_B (AAᵀ + δI)⁻¹ / s², ẽ = g P̃_A
            assert np.all(ga == 0)
            assert np.linalg.norm(e - g @ _damped_projector(A, "row")) <= tol
        elif which == "a":  # g_B = 0 and X = 0: ĝ_B = 0, ĝ_A = (BᵀB + δI)⁻¹ g_A / s², ẽ = P̃_B g
            assert np.all(gb == 0)
            assert np.linalg.norm(e - _damped_projector(B, "col") @ g) <= tol
        else:
            assert np.all(ga == 0) and np.all(gb == 0)

    check()


def test_generic_rank_deficiency_float64(x64):
    # A and B = (generic) products of rank k < r, in float64; the damped inverses see their null directions
    # at eps·σ_max² (not exactly 0) and weigh them by ≈ 1/δ. The error bound is that conditioning,
    # eps · σ_max² / δ for each factor (measured worst ≈ 0.2 of it).
    @settings(**SETTINGS)
    @given(st.integers(2, 6), st.integers(2, 6), st.integers(-3, 2), st.integers(-3, 2), st.integers(0, 2**31 - 1))
    def check(m, n, e_a, e_b, seed):
        rng = np.random.default_rng(seed)
        r = min(m, n)
        k = r - 1
        B = rng.standard_normal((m, k)) @ rng.standard_normal((k, r)) * 10.0**e_b
        A = rng.standard_normal((r, k)) @ rng.standard_normal((k, n)) * 10.0**e_a
        g = rng.standard_normal((m, n))
        s = 2.0
        gA, gB = s * B.T @ g, s * g @ A.T
        ga, gb = _ours(A, B, gA, gB, s, "float64")
        e = s * (B @ ga + gb @ A)
        pb, pa = _damped_projector(B, "col"), _damped_projector(A, "row")
        want = pb @ g + (np.eye(m) - pb) @ g @ pa
        eps = np.finfo(np.float64).eps
        cond = eps * (np.linalg.norm(B, 2) ** 2 + np.linalg.norm(A, 2) ** 2) / DELTA
        assert np.linalg.norm(e - want) <= (1e-9 + 5 * cond) * np.linalg.norm(g)

    check()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sylvester_x_satisfies_its_equation(dtype, request):
    if dtype == "float64":
        request.getfixturevalue("x64")

    @settings(**SETTINGS)
    @given(problems(dtype))
    def check(p):
        A, B, g, gA, gB, s = p
        r, n = A.shape
        if np.linalg.matrix_rank(A) < r:
            return  # X is recovered through A⁺: needs A of full row rank
        ga_s, gb_s = _ours(A, B, gA, gB, s, dtype, "sylvester")
        ga_z, gb_z = _ours(A, B, gA, gB, s, dtype, "zero")
        x = (ga_s - ga_z) @ np.linalg.pinv(A)  # ĝ_A^syl − ĝ_A^zero = X A
        # ĝ_B: − B X, to the rounding of the larger of ĝ_B^zero and ĝ_B^syl (ĝ_B^zero can be exactly 0, e.g.
        # for r = n = 1, where a tolerance from it alone would ask float32 for 1e-7 relative agreement)
        # plus the rounding of ĝ_A (|ĝ_A^zero| may dwarf X A), which reaches B X through A⁺ and B
        tol = 1e-9 if dtype == "float64" else 3e-4
        gb_scale = max(np.abs(gb_z).max(), np.abs(gb_s).max())
        ga_rounding = tol * np.linalg.norm(B) * np.linalg.norm(ga_z) * np.linalg.norm(np.linalg.pinv(A))
        np.testing.assert_allclose(B @ x, gb_z - gb_s, atol=1e-3 * (gb_scale + 1e-30) + ga_rounding)
        q = np.linalg.inv(B.T @ B + DELTA * np.eye(r))
        rhs = -q @ gA @ A.T / s**2
        lhs = B.T @ B @ x + x @ (A @ A.T)
        # rounding of ĝ_A (|ĝ_A^zero| may dwarf X A) reaches X through A⁺ and the equation through BᵀB, AAᵀ
        grams = np.linalg.norm(B.T @ B) + np.linalg.norm(A @ A.T)
        scale = np.linalg.norm(rhs) + grams * (np.linalg.norm(x) + np.linalg.norm(ga_z) * np.linalg.norm(np.linalg.pinv(A)))
        assert np.linalg.norm(lhs - rhs) <= tol * max(scale, 1e-300)

    check()
