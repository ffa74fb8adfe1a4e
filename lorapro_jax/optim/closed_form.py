"""LoRA-Pro's closed form and its ``r x r`` pieces: the one home shared by every LoRA-Pro transform.

Reference: Wang, Liang, Zhang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242 (ICLR 2025), Theorems 2.1-2.2.

Notation (paper layout): ``A`` is ``r x n``, ``B`` is ``m x r``, ``W = W0 + s B A``; ``g = dL/dW``,
``g_A = s Bᵀ g``, ``g_B = s g Aᵀ``. The closed form is

    Q = (BᵀB + δI)⁻¹,  P = (AAᵀ + δI)⁻¹
    ĝ_A = Q g_A / s² + X A
    ĝ_B = (I − B Q Bᵀ) g_B P / s² − B X

Every function here takes any number of leading *batch* axes (``(*batch, r, n)`` etc.): the slices of a
stacked :class:`~lorapro_jax.lora.pair.LoraPair` and the groups of equal-shaped pairs that the
transforms batch together are both solved in one call (batched matmuls and ONE batched ``eigh`` of the
``2 x batch`` matrices ``BᵀB + δI`` and ``AAᵀ + δI``, reused by the damped inverses and by the Sylvester
solve), slice by slice exactly as if each were alone. The ``eigh`` goes through the caller's
:class:`~lorapro_jax.optim.linalg.LinalgSequence` so that no two batched LAPACK calls of a step run at once. :mod:`lorapro_jax.optim.lora_pro` (SGD, full and efficient
Adam forms) and :mod:`lorapro_jax.optim.lean` import it; it imports neither.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax.numpy as jnp
from jax.numpy import matrix_transpose as _t  # (..., m, n) -> (..., n, m)
from jaxtyping import Array, Float

from ..lora.pair import LoraPair, pair_matrices
from .linalg import LinalgSequence, damped, pinv_from_eigh, sylvester_from_eigh

__all__ = [
    "XMode",
    "X_MODES",
    "Grams",
    "bias_correction",
    "check_pair",
    "check_x_mode",
    "closed_form",
    "equivalent_gradient",
    "grams",
    "lora_pro_gradients",
    "lora_pro_pair_update",
]

XMode = Literal["sylvester", "zero", "symmetry"]
X_MODES = ("sylvester", "zero", "symmetry")



def check_x_mode(x_mode: str) -> None:
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}.")


def check_pair(path: str, u: LoraPair, p: LoraPair) -> None:
    """Raises a ``ValueError`` naming ``path`` when an update pair does not match its parameter pair."""
    if u.a.shape != p.a.shape or u.b.shape != p.b.shape:
        raise ValueError(
            f"LoRA pair at {path}: update shapes a{tuple(u.a.shape)}, b{tuple(u.b.shape)} do not match parameter "
            f"shapes a{tuple(p.a.shape)}, b{tuple(p.b.shape)}."
        )
    k = p.stack_ndim
    if p.b.ndim <= k or p.a.shape[:k] != p.b.shape[:k] or p.a.shape[-1] != p.b.shape[k]:
        raise ValueError(
            f"LoRA pair at {path}: a{tuple(p.a.shape)} has stack axes {tuple(p.a.shape[:k])} and rank "
            f"{p.a.shape[-1]} on its last axis but b{tuple(p.b.shape)} does not start with "
            f"{tuple(p.a.shape[:k]) + (p.a.shape[-1],)}."
        )


def bias_correction(decay, count, dtype=jnp.float32):
    """``1 - decay**t`` in ``dtype`` (float32 loses ~1e-5 relative for b2 = 0.999 near t = 1)."""
    return 1.0 - jnp.asarray(decay, dtype) ** count.astype(dtype)


class Grams(NamedTuple):
    """The ``r x r`` matrices of one pair (or a batch of pairs) that the closed form needs (paper layout).

    ``lam_b, u_b`` / ``lam_a, u_a`` are eigenvalues and eigenvectors of ``BᵀB`` / ``AAᵀ`` for the
    Sylvester solve, taken from the same ``eigh`` of the damped matrices as ``q`` / ``p``
    (``lam = w − δ``).
    """

    btb: Float[Array, "*batch r r"]  # BᵀB
    aat: Float[Array, "*batch r r"]  # AAᵀ
    q: Float[Array, "*batch r r"]  # (BᵀB + δI)⁻¹
    p: Float[Array, "*batch r r"]  # (AAᵀ + δI)⁻¹
    lam_b: Float[Array, "*batch r"]
    u_b: Float[Array, "*batch r r"]
    lam_a: Float[Array, "*batch r"]
    u_a: Float[Array, "*batch r r"]


def grams(
    a_mat: Float[Array, "*batch r n"],
    b_mat: Float[Array, "*batch m r"],
    delta: float,
    seq: LinalgSequence | None = None,
) -> Grams:
    """``BᵀB``, ``AAᵀ``, their damped pseudo-inverses and eigendecompositions: one batched ``eigh`` in all.

    ``seq`` orders that ``eigh`` after the enclosing step's other decompositions (default: a new sequence).
    """
    btb = _t(b_mat) @ b_mat
    aat = a_mat @ _t(a_mat)
    seq = LinalgSequence() if seq is None else seq
    w, v = seq.eigh(jnp.stack([damped(btb, delta), damped(aat, delta)]))  # (2, *batch, r), (2, *batch, r, r)
    q, p = pinv_from_eigh(w, v)
    lam = w - jnp.asarray(delta, w.dtype)
    return Grams(btb, aat, q, p, lam[0], v[0], lam[1], v[1])


def closed_form(
    a_mat: Float[Array, "*batch r n"],
    b_mat: Float[Array, "*batch m r"],
    g_a: Float[Array, "*batch r n"],
    g_b: Float[Array, "*batch m r"],
    scale: float,
    gr: Grams,
    x_mode: str,
) -> tuple[Float[Array, "*batch r n"], Float[Array, "*batch m r"]]:
    """LoRA-Pro's closed form given precomputed :class:`Grams` (the Adam forms apply it twice per step)."""
    s2 = jnp.asarray(scale, g_a.dtype) ** 2
    q, p = gr.q, gr.p
    ga_hat = q @ g_a / s2  # (r, n)
    mat = g_b @ p / s2  # (m, r)
    gb_hat = mat - b_mat @ (
        q @ (_t(b_mat) @ mat)
    )  # (I - B Q Bᵀ) g_B P / s², never forming m x m
    if x_mode == "sylvester":
        x = sylvester_from_eigh(gr.lam_b, gr.u_b, gr.lam_a, gr.u_a, -(q @ (g_a @ _t(a_mat))) / s2)
    elif x_mode == "symmetry":
        x = -0.5 * (q @ (_t(b_mat) @ g_b) @ gr.aat) / s2
    else:
        x = None
    if x is not None:
        ga_hat = ga_hat + x @ a_mat
        gb_hat = gb_hat - b_mat @ x
    return ga_hat, gb_hat


def lora_pro_gradients(
    a_mat: Float[Array, "*batch r n"],
    b_mat: Float[Array, "*batch m r"],
    g_a: Float[Array, "*batch r n"],
    g_b: Float[Array, "*batch m r"],
    scale: float,
    *,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
) -> tuple[Float[Array, "*batch r n"], Float[Array, "*batch m r"]]:
    """LoRA-Pro's optimal adjusted gradients (paper layout; one pair, or a batch over leading axes).

    Args:
      a_mat: ``A`` with shape ``(*batch, r, n)``.
      b_mat: ``B`` with shape ``(*batch, m, r)``.
      g_a: gradient w.r.t. ``A``, ``(*batch, r, n)`` (``= s Bᵀ g``).
      g_b: gradient w.r.t. ``B``, ``(*batch, m, r)`` (``= s g Aᵀ``).
      scale: LoRA scale ``s``.
      delta: damping ``δ`` of the two ``r x r`` inverses (reference: 1e-8). At the standard init
        ``B = 0`` the inverse ``(BᵀB + δI)⁻¹ = I/δ`` multiplies ``g_A = 0``, so ``ĝ_A = X A`` and
        ``ĝ_B = g_B (AAᵀ + δI)⁻¹ / s²``: the equivalent gradient is ``g P_A`` exactly.
      x_mode: ``"sylvester"`` solves ``BᵀB X + X AAᵀ = −Q g_A Aᵀ / s²`` (the X minimising
        ``||ĝ_A − g_A||² + ||ĝ_B − g_B||²``); ``"symmetry"`` uses ``X = −Q Bᵀ g_B AAᵀ / (2 s²)`` as the
        reference code does; ``"zero"`` uses ``X = 0``.

    Returns:
      ``(ĝ_A, ĝ_B)`` with the shapes of ``(g_a, g_b)``, in the promoted (at least float32) dtype.
    """
    check_x_mode(x_mode)
    dt = jnp.promote_types(jnp.result_type(a_mat, b_mat, g_a, g_b), jnp.float32)
    a_mat, b_mat, g_a, g_b = (x.astype(dt) for x in (a_mat, b_mat, g_a, g_b))
    return closed_form(
        a_mat, b_mat, g_a, g_b, scale, grams(a_mat, b_mat, delta), x_mode
    )


def equivalent_gradient(
    a_mat: Float[Array, "*batch r n"],
    b_mat: Float[Array, "*batch m r"],
    g_a: Float[Array, "*batch r n"],
    g_b: Float[Array, "*batch m r"],
    scale: float,
) -> Float[Array, "*batch m n"]:
    """The full-weight gradient equivalent to LoRA gradients: ``s (B g_A + g_B A)`` (paper layout)."""
    return scale * (b_mat @ g_a + g_b @ a_mat)


def lora_pro_pair_update(
    params: LoraPair,
    grads: LoraPair,
    *,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
) -> LoraPair:
    """Applies :func:`lora_pro_gradients` to one Flax-layout pair (stacked: to each slice); returns a pair
    shaped like ``grads``."""
    a2, b2 = pair_matrices(params)  # (*stack, n, r), (*stack, r, m)
    ga2, gb2 = pair_matrices(grads)
    if ga2.shape != a2.shape or gb2.shape != b2.shape:
        raise ValueError(
            f"gradient pair shapes a{tuple(grads.a.shape)}, b{tuple(grads.b.shape)} do not match parameter pair "
            f"shapes a{tuple(params.a.shape)}, b{tuple(params.b.shape)}"
        )
    ga_hat, gb_hat = lora_pro_gradients(
        _t(a2), _t(b2), _t(ga2), _t(gb2), params.scale, delta=delta, x_mode=x_mode
    )
    return grads.replace(
        a=_t(ga_hat).reshape(grads.a.shape).astype(grads.a.dtype),
        b=_t(gb_hat).reshape(grads.b.shape).astype(grads.b.dtype),
    )
