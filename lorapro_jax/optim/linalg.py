"""Small dense linear algebra shared by the LoRA-family optimizers, and the ordering of its LAPACK calls.

The solvers take any number of leading batch axes (``(*batch, r, r)``): a batch is solved slice by slice,
in one batched ``eigh`` call. Everything here works on TPU, GPU and CPU: it uses ``jnp.linalg.eigh`` of
symmetric matrices only (``jax.scipy.linalg.solve_sylvester`` relies on a Schur decomposition that TPUs lack).

:class:`LinalgSequence` runs the decompositions (``eigh``, ``qr``, ``svd``) of one traced step so that none
of them can deadlock XLA:CPU; every LoRA-Pro transform routes its decompositions through one. Why: jaxlib
0.10's LAPACK kernels split a large enough *batched* call (``batch · FLOPs ≥ 2·10⁵``) into pieces, schedule them
on XLA's intra-op thread pool and block the calling pool thread until they are done (``ParallelBatchMap`` with
an ``absl::BlockingCounter``, in ``jaxlib/cpu/lapack_kernels.cc``). XLA's thunk executor runs independent
thunks concurrently on that same pool, so when every pool thread (two on a 2-core machine) is blocked in such
a call, nothing is left to run the pieces and the step never returns (0 % CPU, every thread asleep). So each
call runs its batch in chunks below that threshold, one chunk after another (``lax.map``): a chunk is
decomposed in the calling thread and nothing ever waits, whatever else runs concurrently. The calls are
also ordered by a true data dependency (cheap; it keeps at most one decomposition running, which alone
already avoids the deadlock between them). ``jax.lax.optimization_barrier`` orders nothing here: XLA:CPU
emits no thunk for it. See ``docs/reliability.md``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.numpy import matrix_transpose as _t  # (..., m, n) -> (..., n, m)
from jaxtyping import Array, Float

__all__ = [
    "LinalgSequence",
    "after",
    "damped_pinv",
    "pinv_from_eigh",
    "solve_sylvester_psd",
    "sylvester_from_eigh",
    "unsplit_chunk",
]



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
    w, v = jnp.linalg.eigh(damped(m, delta))
    return pinv_from_eigh(w, v, rtol)


def damped(m: Float[Array, "*batch r r"], delta: float) -> Float[Array, "*batch r r"]:
    """``sym(m) + delta * I``: the matrix whose ``eigh`` :func:`damped_pinv` inverts."""
    return 0.5 * (m + _t(m)) + delta * jnp.eye(m.shape[-1], dtype=m.dtype)


def pinv_from_eigh(
    w: Float[Array, "*batch r"], v: Float[Array, "*batch r r"], rtol: float | None = None
) -> Float[Array, "*batch r r"]:
    """``pinv(v diag(w) vᵀ)``: eigenvalues below ``rtol * max |w|`` count as zero (``rtol``: ``r * eps``)."""
    r = w.shape[-1]
    if rtol is None:
        rtol = r * jnp.finfo(w.dtype).eps
    cutoff = rtol * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    inv_w = jnp.where(jnp.abs(w) > cutoff, 1.0 / jnp.where(w == 0, 1.0, w), 0.0)
    return (v * inv_w[..., None, :]) @ _t(v)


def solve_sylvester_psd(
    s1: Float[Array, "*batch r r"],
    s2: Float[Array, "*batch k k"],
    c: Float[Array, "*batch r k"],
    *,
    seq: LinalgSequence | None = None,
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
      seq: the :class:`LinalgSequence` of the enclosing step that orders the two ``eigh`` (default: a new one).

    Returns:
      ``X`` with shape ``(r, k)``.
    """
    seq = LinalgSequence() if seq is None else seq
    lam, u = seq.eigh(0.5 * (s1 + _t(s1)))
    mu, v = seq.eigh(0.5 * (s2 + _t(s2)))
    return sylvester_from_eigh(lam, u, mu, v, c)


def sylvester_from_eigh(
    lam: Float[Array, "*batch r"],
    u: Float[Array, "*batch r r"],
    mu: Float[Array, "*batch k"],
    v: Float[Array, "*batch k k"],
    c: Float[Array, "*batch r k"],
) -> Float[Array, "*batch r k"]:
    """:func:`solve_sylvester_psd` given ``s1 = u diag(lam) uᵀ`` and ``s2 = v diag(mu) vᵀ``."""
    denom = lam[..., :, None] + mu[..., None, :]
    scale = jnp.maximum(jnp.max(jnp.abs(lam), axis=-1), jnp.max(jnp.abs(mu), axis=-1))[..., None, None]
    tiny = (lam.shape[-1] + mu.shape[-1]) * jnp.finfo(c.dtype).eps * scale
    ok = jnp.abs(denom) > tiny
    y = jnp.where(ok, (_t(u) @ c @ v) / jnp.where(ok, denom, 1.0), 0.0)
    return u @ y @ _t(v)


def after(x: Array, *deps: Any) -> Array:
    """``x`` bit for bit, computed from ``deps`` at run time: XLA cannot start its consumers before ``deps``.

    Adds ``-0.0`` made from the first element of every leaf of ``deps`` (non-finite values masked), a
    few scalar operations. ``x + (-0.0) == x`` for every ``x``, signed zeros and NaN included.
    """
    leaves = [jnp.ravel(d)[0] for d in jax.tree.leaves(deps)]
    if not leaves:
        return x
    t = sum(jnp.abs(jnp.where(jnp.isfinite(e), e, 0)).astype(jnp.float32) for e in leaves)
    return x + (-(t * 0)).astype(x.dtype)


class LinalgSequence:
    """Runs the LAPACK-backed decompositions of one traced computation one after another, none of them split.

    Each call's batch runs in chunks that jaxlib 0.10 decomposes in the calling thread (:func:`unsplit_chunk`;
    several chunks go through ``lax.map``), so no call ever blocks a thread of XLA:CPU's pool waiting for
    pieces of itself, the cause of the deadlock described in the module docstring; and each call's first
    operand depends on the previous call's outputs (:func:`after`). Results are bit for bit those of the
    plain batched calls (each matrix is decomposed alone either way); the cost is the loop over chunks for
    large batches of large matrices and the lost overlap between independent decompositions. On GPU/TPU the
    same chunks run (harmless, slower for huge batches of big matrices).

    Use one instance per traced function (e.g. one optimizer update, shared by all its groups of pairs);
    it holds the last call's outputs, which are tracers of that trace only.

    Example::

        seq = LinalgSequence()
        w, v = seq.eigh(m)            # runs first
        q, r = seq.qr(x)              # starts after the eigh
        u, s, vt = seq.svd(r @ r.T)   # after the QR
    """

    def __init__(self) -> None:
        self._last: Any = None

    def run(self, fn: Callable[[Array], Any], x: Array) -> Any:
        """``fn(x)`` for a decomposition ``fn`` of the matrices ``x (*batch, n, m)``, after the previous call.

        The batch runs in chunks small enough that jaxlib never splits them over the thread pool
        (:func:`unsplit_chunk`), one chunk after another (``lax.map``) when there is more than one.
        """
        if self._last is not None:
            x = after(x, self._last)
        out = _chunked(fn, x)
        self._last = out
        return out

    def eigh(self, x: Float[Array, "*batch r r"]) -> tuple[Array, Array]:
        """``jnp.linalg.eigh(x)``: ascending eigenvalues ``(*batch, r)`` and eigenvectors ``(*batch, r, r)``."""
        return self.run(jnp.linalg.eigh, x)

    def qr(self, x: Float[Array, "*batch n k"]) -> tuple[Array, Array]:
        """Reduced ``jnp.linalg.qr(x)``: ``q (*batch, n, min(n, k))``, ``r (*batch, min(n, k), k)``."""
        return self.run(jnp.linalg.qr, x)

    def svd(self, x: Float[Array, "*batch n m"]) -> tuple[Array, Array, Array]:
        """Thin ``jnp.linalg.svd(x)``: ``u``, descending ``s``, ``vt``."""
        return self.run(functools.partial(jnp.linalg.svd, full_matrices=False), x)


# jaxlib 0.10 (jaxlib/cpu/lapack_kernels.cc) splits a batched call over the pool once
# batch * cost >= 2e5 FLOP, cost being at most 10 n m min(n, m) for the kernels used here.
_SPLIT_FLOPS = 200_000


def unsplit_chunk(n: int, m: int) -> int:
    """Largest batch of ``n x m`` matrices that jaxlib 0.10 decomposes in the calling thread (at least 1)."""
    return max(1, (_SPLIT_FLOPS - 1) // (10 * n * m * min(n, m)))


def _chunked(fn: Callable[[Array], Any], x: Array) -> Any:
    """``fn(x)`` with the batch cut into unsplit chunks run one after another; same results slice by slice."""
    *batch, n, m = x.shape
    total, chunk = math.prod(batch), unsplit_chunk(n, m)
    if total <= chunk:
        return fn(x)
    count = -(-total // chunk)
    flat = x.reshape(total, n, m)
    flat = jnp.concatenate([flat, jnp.zeros((count * chunk - total, n, m), x.dtype)]) if count * chunk > total else flat
    out = jax.lax.map(fn, flat.reshape(count, chunk, n, m))
    return jax.tree.map(lambda y: y.reshape(count * chunk, *y.shape[2:])[:total].reshape(*batch, *y.shape[2:]), out)
