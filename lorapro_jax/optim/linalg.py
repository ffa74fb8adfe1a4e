"""Small dense linear algebra shared by the LoRA-family optimizers (r x r matrices only).

Both functions take any number of leading batch axes (``(*batch, r, r)``): a batch is solved slice by
slice, in one batched ``eigh`` call. Everything here works on TPU, GPU and CPU: it uses ``jnp.linalg.eigh`` of symmetric matrices only
(``jax.scipy.linalg.solve_sylvester`` relies on a Schur decomposition that TPUs lack).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.numpy import matrix_transpose as _t  # (..., m, n) -> (..., n, m)
from jaxtyping import Array, Float

__all__ = ["damped_pinv", "solve_sylvester_psd"]



def damped_pinv(m: Float[Array, "*batch r r"], delta: float, rtol: float | None = None) -> Float[Array, "*batch r r"]:
    """Pseudo-inverse of the damped symmetric PSD matrix ``m + delta * I``.

    This is LoRA-Pro's ``(BᵀB + δI)⁻¹`` / ``(AAᵀ + δI)⁻¹`` (the reference code uses ``pinv`` with
    ``δ = 1e-8``). Computed by ``eigh``; eigenvalues of ``m + δI`` below ``rtol * max eigenvalue`` are
    treated as zero as ``pinv`` does (``rtol`` defaults to ``r * eps(dtype)``).

    Args:
      m: symmetric PSD matrix ``(r, r)``.
      delta: damping ``δ >= 0`` added to the diagonal.
      rtol: relative cut-off for tiny eigenvalues.

    Returns:
      ``(r, r)`` symmetric matrix.
    """
    r = m.shape[-1]
    m = 0.5 * (m + _t(m)) + delta * jnp.eye(r, dtype=m.dtype)
    w, v = jnp.linalg.eigh(m)
    if rtol is None:
        rtol = r * jnp.finfo(m.dtype).eps
    cutoff = rtol * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    inv_w = jnp.where(jnp.abs(w) > cutoff, 1.0 / jnp.where(w == 0, 1.0, w), 0.0)
    return (v * inv_w[..., None, :]) @ _t(v)


def solve_sylvester_psd(
    s1: Float[Array, "*batch r r"], s2: Float[Array, "*batch k k"], c: Float[Array, "*batch r k"]
) -> Float[Array, "*batch r k"]:
    """Solves ``s1 @ X + X @ s2 = c`` for symmetric PSD ``s1``, ``s2``.

    With ``s1 = U diag(λ) Uᵀ`` and ``s2 = V diag(μ) Vᵀ`` the equation becomes
    ``(λ_i + μ_j) Y_ij = (Uᵀ c V)_ij`` with ``X = U Y Vᵀ``. Where ``λ_i + μ_j`` vanishes (both
    matrices singular in matching directions) the component is set to zero, which gives the
    minimum-norm least-squares solution.

    Args:
      s1: ``(r, r)`` symmetric PSD (LoRA-Pro: ``BᵀB``).
      s2: ``(k, k)`` symmetric PSD (LoRA-Pro: ``AAᵀ``).
      c: ``(r, k)`` right-hand side.

    Returns:
      ``X`` with shape ``(r, k)``.
    """
    lam, u = jnp.linalg.eigh(0.5 * (s1 + _t(s1)))
    mu, v = jnp.linalg.eigh(0.5 * (s2 + _t(s2)))
    denom = lam[..., :, None] + mu[..., None, :]
    scale = jnp.maximum(jnp.max(jnp.abs(lam), axis=-1), jnp.max(jnp.abs(mu), axis=-1))[..., None, None]
    tiny = (lam.shape[-1] + mu.shape[-1]) * jnp.finfo(c.dtype).eps * scale
    ok = jnp.abs(denom) > tiny
    y = jnp.where(ok, (_t(u) @ c @ v) / jnp.where(ok, denom, 1.0), 0.0)
    return u @ y @ _t(v)
