"""Truncated SVDs used by the data-driven LoRA initialisations.

``randomized_svd`` is the randomised range finder with power iterations of Halko, Martinsson and
Tropp ("Finding structure with randomness", arXiv 0909.4061, Alg. 4.4 + 5.1), the algorithm behind
``torch.svd_lowrank`` that the LoRA-GA reference uses with ``q = min(4 r, min(m, n))`` and 4 power
iterations. ``truncated_svd`` dispatches between it and the exact (LAPACK / cuSOLVER) SVD.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["SvdMethod", "randomized_svd", "truncated_svd"]

SvdMethod = Literal["full", "randomized"]


def randomized_svd(
    mat: Float[Array, "m n"],
    q: int,
    *,
    key: jax.Array,
    n_iter: int = 4,
) -> tuple[Float[Array, "m q"], Float[Array, " q"], Float[Array, "q n"]]:
    """Approximate top-``q`` SVD ``mat ≈ U diag(S) Vᵀ`` by a randomised range finder.

    A Gaussian sketch ``Y = mat Ω`` (``Ω: n x q``) is re-orthonormalised after every multiplication
    by ``mat`` and ``matᵀ`` (``n_iter`` power iterations sharpen the spectrum by ``σ^(2 n_iter + 1)``),
    then the small ``q x n`` projection is decomposed exactly. The error on the top ``k < q`` triplets
    falls with the gap ``σ_{q+1} / σ_k``.

    Args:
      mat: the ``(m, n)`` matrix (computed in float32 or wider).
      q: sketch size = number of triplets returned, ``1 <= q <= min(m, n)``.
      key: PRNG key of the Gaussian sketch.
      n_iter: number of power iterations.

    Returns:
      ``(U: (m, q), S: (q,), Vt: (q, n))`` with orthonormal columns of ``U`` / rows of ``Vt`` and
      ``S`` in decreasing order.
    """
    m, n = mat.shape
    if not 1 <= q <= min(m, n):
        raise ValueError(f"randomized_svd: q must be in [1, min(m, n)] = [1, {min(m, n)}], got {q}.")
    if n_iter < 0:
        raise ValueError(f"randomized_svd: n_iter must be >= 0, got {n_iter}.")
    dt = jnp.promote_types(mat.dtype, jnp.float32)
    mat = mat.astype(dt)
    omega = jax.random.normal(key, (n, q), dt)
    basis, _ = jnp.linalg.qr(mat @ omega)  # (m, q)
    for _ in range(n_iter):
        z, _ = jnp.linalg.qr(mat.T @ basis)  # (n, q)
        basis, _ = jnp.linalg.qr(mat @ z)  # (m, q)
    small = basis.T @ mat  # (q, n)
    u_small, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return basis @ u_small, s, vt


def truncated_svd(
    mat: Float[Array, "m n"],
    k: int,
    *,
    method: SvdMethod = "randomized",
    q: int | None = None,
    key: jax.Array | None = None,
    n_iter: int = 4,
) -> tuple[Float[Array, "m k"], Float[Array, " k"], Float[Array, "k n"]]:
    """Top-``k`` singular triplets of ``mat``, exactly (``"full"``) or randomised (``"randomized"``).

    Args:
      mat: ``(m, n)`` matrix.
      k: number of triplets, ``k <= min(m, n)``.
      method: ``"full"`` (exact thin SVD) or ``"randomized"`` (:func:`randomized_svd`).
      q: sketch size of the randomised method (default ``min(2 k, min(m, n))``; LoRA-GA passes
        ``min(4 r, min(m, n))`` with ``k = 2 r``). Must be ``>= k``.
      key: PRNG key (required for ``"randomized"``).
      n_iter: power iterations of the randomised method.

    Returns:
      ``(U: (m, k), S: (k,), Vt: (k, n))``.
    """
    m, n = mat.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"truncated_svd: k must be in [1, min(m, n)] = [1, {min(m, n)}], got {k}.")
    if method == "full":
        dt = jnp.promote_types(mat.dtype, jnp.float32)
        u, s, vt = jnp.linalg.svd(mat.astype(dt), full_matrices=False)
    elif method == "randomized":
        if key is None:
            raise ValueError("truncated_svd(method='randomized') needs a PRNG `key`.")
        q = min(2 * k, min(m, n)) if q is None else int(q)
        if q < k:
            raise ValueError(f"truncated_svd: sketch size q={q} is smaller than the number of triplets k={k}.")
        u, s, vt = randomized_svd(mat, q, key=key, n_iter=n_iter)
    else:
        raise ValueError(f"svd method must be 'full' or 'randomized', got {method!r}.")
    return u[:, :k], s[:k], vt[:k]
