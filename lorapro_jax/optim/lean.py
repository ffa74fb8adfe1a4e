"""LoRA-Pro "lean" form (ours): the full form's direction from O((m + n)·k) optimizer state.

The paper's AdamW full form (:func:`~lorapro_jax.optim.lora_pro.scale_by_lora_pro_adam`) keeps two
full-size moments per adapted ``m x n`` weight (≈26 GB in bf16 for Llama-2-7B). The lean form keeps:

* the first moment as a rank-``k`` factorisation ``M ≈ L R`` (``L: (n, k)``, ``R: (k, m)``, Flax
  layout). Every equivalent gradient ``ẽ = s (ĝ_a b + a ĝ_b)`` has rank ``≤ 2r``, so
  ``β₁ M + (1 − β₁) ẽ`` is a product of ``(n, k + 2r)`` and ``(k + 2r, m)`` factors, re-truncated to
  rank ``k`` by QR of both factors and an SVD of the ``(k + 2r)²`` core — the best rank-``k``
  approximation of that sum, never forming ``n x m``;
* the second moment factored as in Adafactor (Shazeer & Stern, arXiv 1804.04235): EMAs of the row
  sums ``ρ`` (``n``) and column sums ``κ`` (``m``) of ``ẽ²``, computed from the factors of ``ẽ``, with
  ``v̂_ij = ρ_i κ_j / Σρ``.

Because ``sqrt(v̂)`` is then an outer product ``p_i q_j``, the Adam direction
``d = D_p⁻¹ M̂ D_q⁻¹`` keeps the factored form and ``h_A = s Bᵀ d``, ``h_B = s d Aᵀ`` cost
``O((m + n) k r)``. ``eps`` enters as ``sqrt(eps)`` added to each factor (``(p_i + √ε)(q_j + √ε)``
instead of ``p_i q_j + ε``). Finally the LoRA-Pro closed form maps ``(h_A, h_B)`` to the updates of A
and B, as in the full form.

Error against the full form (measured, see ``tests/test_lean.py`` and ``benchmarks/``):
* first moment: exact when ``k ≥`` the rank of the true EMA (e.g. ``k ≥ min(m, n)``); otherwise the
  best rank-``k`` approximation of each step's update;
* second moment: exact when ``E[ẽ²]`` is rank one (Adafactor's assumption), otherwise its rank-one
  row/column-sum approximation.

State per pair: ``(n + m)·k + n + m`` numbers instead of ``2·n·m``; with the default ``k = 2r`` that is
about LoRA's own Adam state (``2·r·(n + m)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from ..lora.pairing import LoraPair, pair_matrices
from ._tree import Packed, map_pairs, require_params, unzip_packed
from .nonfinite import DEFAULT_MAX_CONSECUTIVE_SKIPS, NonfiniteMode, guard_nonfinite, resolve_on_nonfinite
from .closed_form import XMode, bias_correction, check_pair, check_x_mode, closed_form, grams

__all__ = ["LeanMoments", "ScaleByLoraProLeanState", "scale_by_lora_pro_lean", "truncated_sum"]


class LeanMoments(NamedTuple):
    """Factored Adam moments of one pair's equivalent gradient (Flax layout).

    Attributes:
      left: ``(n, k)`` left factor of the first moment ``M ≈ left @ right``.
      right: ``(k, m)`` right factor.
      row: ``(n,)`` EMA of the row sums of ``ẽ²``.
      col: ``(m,)`` EMA of the column sums of ``ẽ²``.
    """

    left: Float[Array, "n k"]
    right: Float[Array, "k m"]
    row: Float[Array, " n"]
    col: Float[Array, " m"]


class ScaleByLoraProLeanState(NamedTuple):
    """State of :func:`scale_by_lora_pro_lean`.

    Attributes:
      count: ``()`` int32 number of updates.
      moments: per LoRA pair a :class:`LeanMoments`; per other leaf a ``(mu, nu)`` tuple shaped like it.
    """

    count: Int[Array, ""]
    moments: Any


def truncated_sum(
    l1: Float[Array, "n k1"], r1: Float[Array, "k1 m"], l2: Float[Array, "n k2"], r2: Float[Array, "k2 m"], k: int
) -> tuple[Float[Array, "n k"], Float[Array, "k m"]]:
    """Best rank-``k`` approximation of ``l1 @ r1 + l2 @ r2`` as factors, without forming ``n x m``.

    QR of ``[l1, l2]`` and of ``[r1; r2]ᵀ``, SVD of the small core; singular values go to the left
    factor. Cost ``O((n + m) (k1 + k2)²)``.
    """
    lc = jnp.concatenate([l1, l2], axis=1)  # (n, K)
    rc = jnp.concatenate([r1, r2], axis=0)  # (K, m)
    q1, t1 = jnp.linalg.qr(lc)  # (n, K'), (K', K)
    q2, t2 = jnp.linalg.qr(rc.T)  # (m, K''), (K'', K)
    u, sv, vt = jnp.linalg.svd(t1 @ t2.T, full_matrices=False)
    kk = min(k, sv.shape[0])
    left = q1 @ (u[:, :kk] * sv[:kk])
    right = (q2 @ vt[:kk].T).T
    if kk < k:  # pad with zero columns to keep a static shape
        left = jnp.pad(left, ((0, 0), (0, k - kk)))
        right = jnp.pad(right, ((0, k - kk), (0, 0)))
    return left, right


def scale_by_lora_pro_lean(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    rank: int | None = None,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
    eps_row: float = 1e-30,
    check_finite_grads: bool | None = None,
    on_nonfinite: NonfiniteMode = "raise",
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
) -> optax.GradientTransformation:
    """LoRA-Pro AdamW direction from factored moments (see the module docstring).

    Args:
      b1, b2, eps: Adam hyper-parameters.
      rank: rank ``k`` of the first-moment factorisation; default ``2 r`` of each pair.
      delta, x_mode: see :func:`lorapro_jax.lora_pro_gradients`.
      eps_row: added to the row/column sums before the division (Adafactor's ``ε₁``).
      check_finite_grads, on_nonfinite, max_consecutive_skips: see :func:`lorapro_jax.scale_by_lora_pro`.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ScaleByLoraProLeanState`; non-LoRA leaves get
      plain Adam.
    """
    check_x_mode(x_mode)
    mode = resolve_on_nonfinite(on_nonfinite, check_finite_grads, "scale_by_lora_pro_lean")

    def _k(p: LoraPair) -> int:
        k = rank if rank is not None else 2 * p.rank
        return int(min(k, p.a.size // p.rank, p.b.size // p.rank))

    def init_fn(params):
        def on_pair(path, p):
            n, m = p.a.size // p.rank, p.b.size // p.rank
            k = _k(p)
            dt = jnp.promote_types(jnp.result_type(p.a), jnp.float32)
            return LeanMoments(jnp.zeros((n, k), dt), jnp.zeros((k, m), dt), jnp.zeros((n,), dt), jnp.zeros((m,), dt))

        def on_leaf(path, x):
            if not hasattr(x, "shape"):
                return x
            return (jnp.zeros_like(x), jnp.zeros_like(x))

        return ScaleByLoraProLeanState(jnp.zeros([], jnp.int32), map_pairs(on_pair, on_leaf, params))

    def update_fn(updates, state, params=None):
        require_params(params, "scale_by_lora_pro_lean")
        count = optax.safe_increment(state.count)

        def on_pair(path, u, p, mom):
            check_pair(path, u, p)
            a2, bm = pair_matrices(p)  # (n, r), (r, m)
            ga2, gb2 = pair_matrices(u)
            s = p.scale
            dt = mom.left.dtype
            a2, bm, ga2, gb2 = (x.astype(dt) for x in (a2, bm, ga2, gb2))
            gr = grams(a2.T, bm.T, delta)  # shared by both applications of the closed form
            ga_hat, gb_hat = closed_form(a2.T, bm.T, ga2.T, gb2.T, s, gr, "zero")
            # ẽ (Flax, n x m) = s (ĝ_a b + a ĝ_b) = le @ re with le (n, 2r), re (2r, m).
            le = s * jnp.concatenate([ga_hat.T, a2], axis=1)
            re = jnp.concatenate([bm, gb_hat.T], axis=0)
            left, right = truncated_sum(b1 * mom.left, mom.right, (1.0 - b1) * le, re, mom.left.shape[1])
            # Row / column sums of ẽ² from the factors: diag(le (re reᵀ) leᵀ), diag(reᵀ (leᵀ le) re).
            rows = jnp.sum((le @ (re @ re.T)) * le, axis=1)
            cols = jnp.sum((re.T @ (le.T @ le)) * re.T, axis=1)
            row = b2 * mom.row + (1.0 - b2) * rows
            col = b2 * mom.col + (1.0 - b2) * cols
            bc1, bc2 = bias_correction(b1, count, dt), bias_correction(b2, count, dt)
            total = jnp.sum(row) + eps_row
            p_fac = jnp.sqrt((row + eps_row) / total) + jnp.sqrt(eps)  # (n,)
            q_fac = jnp.sqrt((col + eps_row) / bc2) + jnp.sqrt(eps)  # (m,)
            ld = (left / bc1) / p_fac[:, None]  # d = ld @ rd, (n, k) and (k, m)
            rd = right / q_fac[None, :]
            h_a = s * (ld @ (rd @ bm.T))  # (n, r)
            h_b = s * ((a2.T @ ld) @ rd)  # (r, m)
            ua, ub = closed_form(a2.T, bm.T, h_a.T, h_b.T, s, gr, x_mode)
            upd = u.replace(a=ua.T.reshape(u.a.shape).astype(u.a.dtype), b=ub.T.reshape(u.b.shape).astype(u.b.dtype))
            return Packed(upd, LeanMoments(left, right, row, col))

        def on_leaf(path, g, p, mom):
            if not hasattr(g, "shape"):
                return Packed(g, mom)
            mu, nu = mom
            dt = jnp.promote_types(g.dtype, jnp.float32)
            bc1, bc2 = bias_correction(b1, count, dt), bias_correction(b2, count, dt)
            mu2 = b1 * mu.astype(dt) + (1.0 - b1) * g.astype(dt)
            nu2 = b2 * nu.astype(dt) + (1.0 - b2) * jnp.square(g.astype(dt))
            d = (mu2 / bc1) / (jnp.sqrt(nu2 / bc2) + eps)
            return Packed(d.astype(g.dtype), (mu2.astype(mu.dtype), nu2.astype(nu.dtype)))

        packed = map_pairs(on_pair, on_leaf, updates, params, state.moments)
        new_updates, new_moments = unzip_packed(packed, 2)
        return new_updates, ScaleByLoraProLeanState(count, new_moments)

    tx = optax.GradientTransformation(init_fn, update_fn)
    return guard_nonfinite(tx, mode, max_consecutive_skips=max_consecutive_skips, name="scale_by_lora_pro_lean")
