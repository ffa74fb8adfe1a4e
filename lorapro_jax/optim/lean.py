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

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.numpy import matrix_transpose as _t  # (..., m, n) -> (..., n, m)
import optax
from jaxtyping import Array, Float, Int

from ._grouping import PairRecord, map_groups, pair_mats, pair_update, stack
from ._tree import Packed, map_pairs, require_params, unzip_packed
from .closed_form import XMode, bias_correction, check_x_mode, closed_form, grams
from .linalg import LinalgSequence

__all__ = ["LeanMoments", "ScaleByLoraProLeanState", "scale_by_lora_pro_lean", "truncated_sum"]


class LeanMoments(NamedTuple):
    """Factored Adam moments of one pair's equivalent gradient (Flax layout).

    Attributes:
      left: ``(*stack, n, k)`` left factor of the first moment ``M ≈ left @ right``.
      right: ``(*stack, k, m)`` right factor.
      row: ``(*stack, n)`` EMA of the row sums of ``ẽ²``.
      col: ``(*stack, m)`` EMA of the column sums of ``ẽ²``.

    ``stack`` are the stack axes of a stacked pair (none for an ordinary pair).
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
    l1: Float[Array, "*batch n k1"],
    r1: Float[Array, "*batch k1 m"],
    l2: Float[Array, "*batch n k2"],
    r2: Float[Array, "*batch k2 m"],
    k: int,
    *,
    seq: LinalgSequence | None = None,
) -> tuple[Float[Array, "*batch n k"], Float[Array, "*batch k m"]]:
    """Best rank-``k`` approximation of ``l1 @ r1 + l2 @ r2`` as factors, without forming ``n x m``.

    Leading batch axes are independent problems (batched QR / SVD).

    QR of ``[l1, l2]`` and of ``[r1; r2]ᵀ``, SVD of the small core; singular values go to the left
    factor. Cost ``O((n + m) (k1 + k2)²)``. The decompositions run one after another through ``seq``
    (default: a new :class:`~lorapro_jax.optim.linalg.LinalgSequence`).
    """
    seq = LinalgSequence() if seq is None else seq
    lc = jnp.concatenate([l1, l2], axis=-1)  # (*batch, n, K)
    rc = jnp.concatenate([r1, r2], axis=-2)  # (*batch, K, m)
    q1, t1 = seq.qr(lc)  # (n, K'), (K', K)
    q2, t2 = seq.qr(_t(rc))  # (m, K''), (K'', K): after the first QR (one stacked QR measured slower)
    u, sv, vt = seq.svd(t1 @ _t(t2))
    kk = min(k, sv.shape[-1])
    left = q1 @ (u[..., :, :kk] * sv[..., None, :kk])
    right = _t(q2 @ _t(vt[..., :kk, :]))
    if kk < k:  # pad with zero columns to keep a static shape
        batch = [(0, 0)] * (left.ndim - 2)
        left = jnp.pad(left, batch + [(0, 0), (0, k - kk)])
        right = jnp.pad(right, batch + [(0, k - kk), (0, 0)])
    return left, right



def _lean_group(group: list[PairRecord], count, b1, b2, eps, eps_row, delta, x_mode, seq) -> list[Packed]:
    """Lean form for one group of equal pairs, batched over ``(G, *stack)`` (all of it factor-sized)."""
    p0, mom0 = group[0].p, group[0].states[0]
    sdt = mom0.left.dtype  # storage dtype (mu_dtype); computed in at least float32
    s, dt = p0.scale, jnp.promote_types(sdt, jnp.float32)
    a2, bm, ga2, gb2 = pair_mats(group, dt)  # (G, *stack, n, r), (G, *stack, r, m)
    mom = LeanMoments(*(stack([rec.states[0][i] for rec in group]).astype(dt) for i in range(4)))
    am, bp = _t(a2), _t(bm)  # paper layout
    gr = grams(am, bp, delta, seq)  # shared by both applications of the closed form
    ga_hat, gb_hat = closed_form(am, bp, _t(ga2), _t(gb2), s, gr, "zero")
    # ẽ (Flax, n x m) = s (ĝ_a b + a ĝ_b) = le @ re with le (n, 2r), re (2r, m).
    le = s * jnp.concatenate([_t(ga_hat), a2], axis=-1)
    re = jnp.concatenate([bm, _t(gb_hat)], axis=-2)
    left, right = truncated_sum(b1 * mom.left, mom.right, (1.0 - b1) * le, re, mom.left.shape[-1], seq=seq)
    # Row / column sums of ẽ² from the factors: diag(le (re reᵀ) leᵀ), diag(reᵀ (leᵀ le) re).
    rows = jnp.sum((le @ (re @ _t(re))) * le, axis=-1)
    cols = jnp.sum((_t(re) @ (_t(le) @ le)) * _t(re), axis=-1)
    row = b2 * mom.row + (1.0 - b2) * rows
    col = b2 * mom.col + (1.0 - b2) * cols
    bc1, bc2 = bias_correction(b1, count, dt), bias_correction(b2, count, dt)
    total = jnp.sum(row, axis=-1, keepdims=True) + eps_row
    p_fac = jnp.sqrt((row + eps_row) / total) + jnp.sqrt(eps)  # (.., n)
    q_fac = jnp.sqrt((col + eps_row) / bc2) + jnp.sqrt(eps)  # (.., m)
    ld = (left / bc1) / p_fac[..., :, None]  # d = ld @ rd, (.., n, k) and (.., k, m)
    rd = right / q_fac[..., None, :]
    h_a = s * (ld @ (rd @ _t(bm)))  # (.., n, r)
    h_b = s * ((_t(a2) @ ld) @ rd)  # (.., r, m)
    ua, ub = closed_form(am, bp, _t(h_a), _t(h_b), s, gr, x_mode)
    return [
        Packed(pair_update(rec.u, _t(ua[j]), _t(ub[j])),
               LeanMoments(*(x[j].astype(sdt) for x in (left, right, row, col))))
        for j, rec in enumerate(group)
    ]


def scale_by_lora_pro_lean(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    rank: int | None = None,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
    eps_row: float = 1e-30,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """LoRA-Pro AdamW direction from factored moments (see the module docstring).

    Args:
      b1, b2, eps: Adam hyper-parameters.
      rank: rank ``k`` of the first-moment factorisation; default ``2 r`` of each pair.
      delta, x_mode: see :func:`lorapro_jax.lora_pro_gradients`.
      eps_row: added to the row/column sums before the division (Adafactor's ``ε₁``).
      mu_dtype: storage dtype of all moments (factors and sums; computed in at least float32); default:
        the parameter dtype promoted to at least float32 for pairs, the leaf dtype for other leaves.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ScaleByLoraProLeanState`; non-LoRA leaves get
      plain Adam. No NaN/inf check: see :func:`lorapro_jax.guard_nonfinite`.
    """
    check_x_mode(x_mode)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        def on_pair(path, p):
            n, m = math.prod(p.in_shape), math.prod(p.out_shape)
            k = int(min(rank if rank is not None else 2 * p.rank, n, m))
            dt = mu_dtype or jnp.promote_types(jnp.result_type(p.a), jnp.float32)
            st = p.stack_shape
            zeros = lambda *shape: jnp.zeros(st + shape, dt)
            return LeanMoments(zeros(n, k), zeros(k, m), zeros(n), zeros(m))

        def on_leaf(path, x):
            if not hasattr(x, "shape"):
                return x
            return (jnp.zeros_like(x, dtype=mu_dtype or x.dtype), jnp.zeros_like(x, dtype=mu_dtype or x.dtype))

        return ScaleByLoraProLeanState(jnp.zeros([], jnp.int32), map_pairs(on_pair, on_leaf, params))

    def update_fn(updates, state, params=None):
        require_params(params, "scale_by_lora_pro_lean")
        count = optax.safe_increment(state.count)

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

        seq = LinalgSequence()  # every decomposition of this update, all groups, one after another
        group_fn = lambda group: _lean_group(group, count, b1, b2, eps, eps_row, delta, x_mode, seq)
        packed = map_groups(group_fn, on_leaf, updates, params, state.moments)
        new_updates, new_moments = unzip_packed(packed, 2)
        return new_updates, ScaleByLoraProLeanState(count, new_moments)

    return optax.GradientTransformation(init_fn, update_fn)
