"""LoRA-Pro: adjust the gradients of LoRA's A and B so that the equivalent full-weight gradient is the
best low-rank approximation of the full fine-tuning gradient.

Reference: Wang, Liang, Zhang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242 (ICLR 2025).

Notation (paper layout): base weight ``W0`` is ``m x n`` (out x in), ``A`` is ``r x n``, ``B`` is
``m x r``, ``W = W0 + s B A``; ``g = dL/dW``, ``g_A = s Bᵀ g``, ``g_B = s g Aᵀ``. The closed form is

    Q = (BᵀB + δI)⁻¹,  P = (AAᵀ + δI)⁻¹
    ĝ_A = Q g_A / s² + X A
    ĝ_B = (I − B Q Bᵀ) g_B P / s² − B X

and the equivalent gradient ``s (B ĝ_A + ĝ_B A) = P_B g + (I − P_B) g P_A`` is the closest matrix to
``g`` (Frobenius norm) of the form ``s (B Ĝ_A + Ĝ_B A)``, whatever ``X`` is. ``X`` is chosen to keep
``ĝ`` close to the raw LoRA gradients (``"sylvester"``), or ``"symmetry"`` / ``"zero"``.

The transforms work on pytrees whose LoRA factors are :class:`~lorapro_jax.lora.pair.LoraPair`
nodes (Flax layout: ``a = Aᵀ: (*in, r)``, ``b = Bᵀ: (r, *out)``); every other leaf passes through
(SGD form) or gets plain Adam (Adam forms).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.numpy import matrix_transpose as _t  # (..., m, n) -> (..., n, m)
import optax
from jaxtyping import Array, Float, Int

from ..lora.pair import LoraPair
from ._grouping import PairRecord, map_groups, pair_mats, pair_update, stack
from ._tree import Packed, map_pairs, require_params, unwrap_variable, unzip_packed
from .nonfinite import DEFAULT_MAX_CONSECUTIVE_SKIPS, NonfiniteMode, guard_nonfinite
from .closed_form import (
    XMode,
    bias_correction,
    check_x_mode,
    closed_form,
    equivalent_gradient,
    grams,
    lora_pro_gradients,
    lora_pro_pair_update,
)
from .lean import scale_by_lora_pro_lean
from .linalg import LinalgSequence

__all__ = [
    "XMode",
    "lora_pro_gradients",
    "equivalent_gradient",
    "lora_pro_pair_update",
    "scale_by_lora_pro",
    "lora_pro_sgd",
    "ScaleByLoraProAdamState",
    "scale_by_lora_pro_adam",
    "LoraProDecayState",
    "add_lora_pro_decayed_weights",
    "lora_pro_adamw",
    "base_decay_factor",
]

Form = Literal["full", "efficient", "lean"]
_FORMS = ("full", "efficient", "lean")



def _sgd_group(group: list[PairRecord], delta: float, x_mode: str, seq: LinalgSequence) -> list[LoraPair]:
    """SGD form for one group of equal pairs: the closed form, batched over ``(G, *stack)``."""
    u0, p0 = group[0].u, group[0].p
    dt = jnp.promote_types(jnp.result_type(p0.a, p0.b, u0.a, u0.b), jnp.float32)
    a2, bm, ga2, gb2 = pair_mats(group, dt)  # (G, *stack, n, r), (G, *stack, r, m)
    am, bp = _t(a2), _t(bm)  # paper layout
    ga_hat, gb_hat = closed_form(am, bp, _t(ga2), _t(gb2), p0.scale, grams(am, bp, delta, seq), x_mode)
    return [pair_update(rec.u, _t(ga_hat[j]), _t(gb_hat[j])) for j, rec in enumerate(group)]


def _full_group(group: list[PairRecord], count, b1, b2, eps, eps_root, delta, x_mode, seq) -> list[Packed]:
    """Full form for one group: r x r algebra and closed forms batched, full-size moments per pair."""
    u0, p0 = group[0].u, group[0].p
    s = p0.scale
    dt = jnp.promote_types(jnp.result_type(p0.a, u0.a), jnp.float32)
    a2, bm, ga2, gb2 = pair_mats(group, dt)  # (G, *stack, n, r), (G, *stack, r, m)
    am, bp = _t(a2), _t(bm)  # paper layout A (.., r, n), B (.., m, r)
    gr = grams(am, bp, delta, seq)  # shared by both applications of the closed form
    ga_hat, gb_hat = closed_form(am, bp, _t(ga2), _t(gb2), s, gr, "zero")
    ga_f, gb_f = _t(ga_hat), _t(gb_hat)  # Flax layout (.., n, r), (.., r, m)
    bc1, bc2 = bias_correction(b1, count, dt), bias_correction(b2, count, dt)
    h_a, h_b, moments = [], [], []
    for j, rec in enumerate(group):  # full-size (n x m) work per pair: never copied into a batch
        mu, nu = rec.states
        e = s * (ga_f[j] @ bm[j] + a2[j] @ gb_f[j])  # (*stack, n, m): equivalent gradient, Flax layout
        mu2 = b1 * mu.reshape(e.shape).astype(dt) + (1.0 - b1) * e
        nu2 = b2 * nu.reshape(e.shape).astype(dt) + (1.0 - b2) * jnp.square(e)
        d = (mu2 / bc1) / (jnp.sqrt(nu2 / bc2 + eps_root) + eps)  # (*stack, n, m)
        h_a.append(s * (d @ _t(bm[j])))  # (*stack, n, r) = (s Bᵀ d_paper)ᵀ
        h_b.append(s * (_t(a2[j]) @ d))  # (*stack, r, m) = (s d_paper Aᵀ)ᵀ
        moments.append((mu2.reshape(mu.shape).astype(mu.dtype), nu2.reshape(nu.shape).astype(nu.dtype)))
    ua, ub = closed_form(am, bp, _t(stack(h_a)), _t(stack(h_b)), s, gr, x_mode)
    return [Packed(pair_update(rec.u, _t(ua[j]), _t(ub[j])), *moments[j]) for j, rec in enumerate(group)]


def scale_by_lora_pro(
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
) -> optax.GradientTransformation:
    """LoRA-Pro, SGD form: rewrites every LoRA pair's gradients ``(g_A, g_B)`` into ``(ĝ_A, ĝ_B)``.

    Chain it with any optax optimizer, e.g. ``optax.chain(scale_by_lora_pro(), optax.sgd(lr))`` (the
    paper's SGD form) or ``optax.chain(scale_by_lora_pro(), optax.adamw(lr))`` (the "efficient" form).
    Non-LoRA leaves pass through unchanged. Needs ``params`` in ``update``.

    Stacked pairs (leading stack axes) are solved slice by slice. Pairs of equal shape, dtype, scale and
    stack axes are grouped and their r x r algebra runs as one batched call (see
    :mod:`lorapro_jax.optim._grouping`); the result equals each pair's :func:`lora_pro_pair_update`.

    Args:
      delta: damping of ``(BᵀB + δI)⁻¹`` and ``(AAᵀ + δI)⁻¹``.
      x_mode: ``"sylvester"`` | ``"zero"`` | ``"symmetry"`` (see :func:`lora_pro_gradients`).

    Returns:
      An ``optax.GradientTransformation`` with an empty state. It does not check for NaN/inf: wrap the
      whole chain in :func:`~lorapro_jax.guard_nonfinite` (or use :func:`lora_pro_sgd` /
      :func:`lora_pro_adamw`, which do).

    Examples:
      At the standard init ``B = 0`` LoRA-Pro's gradients are ``ĝ_A = 0`` and ``ĝ_B = g_B (AAᵀ + δI)⁻¹ / s²``
      (here ``AAᵀ = I``, ``s = 1``, so ``ĝ_B = g_B``):

      >>> import jax.numpy as jnp
      >>> import lorapro_jax as lp
      >>> params = {"fc": lp.LoraPair(a=jnp.eye(3, 2), b=jnp.zeros((2, 3)), scale=1.0)}  # a = Aᵀ: (n, r)
      >>> grads = {"fc": lp.LoraPair(a=jnp.zeros((3, 2)), b=jnp.ones((2, 3)), scale=1.0)}  # g_A = s Bᵀ g = 0
      >>> tx = lp.scale_by_lora_pro()
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["fc"].a)
      [[0. 0.]
       [0. 0.]
       [0. 0.]]
      >>> print(updates["fc"].b)
      [[1. 1. 1.]
       [1. 1. 1.]]
    """
    check_x_mode(x_mode)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        require_params(params, "scale_by_lora_pro")

        seq = LinalgSequence()  # every eigh of this update, all groups, one after another
        group_fn = lambda group: _sgd_group(group, delta, x_mode, seq)
        return map_groups(group_fn, lambda path, u, p: u, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def lora_pro_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
    on_nonfinite: NonfiniteMode = "raise",
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
) -> optax.GradientTransformation:
    """LoRA-Pro with SGD (optionally with momentum): ``chain(scale_by_lora_pro, optax.sgd)``.

    ``on_nonfinite`` / ``max_consecutive_skips`` are :func:`~lorapro_jax.guard_nonfinite`'s, applied once
    around the whole chain: a skipped step leaves the momentum and the schedule's step count as they were.

    Examples:
      >>> import jax.numpy as jnp
      >>> import lorapro_jax as lp
      >>> params = {"fc": lp.LoraPair(a=jnp.eye(3, 2), b=jnp.zeros((2, 3)), scale=1.0)}
      >>> grads = {"fc": lp.LoraPair(a=jnp.zeros((3, 2)), b=jnp.ones((2, 3)), scale=1.0)}  # g_A = s Bᵀ g = 0
      >>> tx = lp.lora_pro_sgd(learning_rate=0.1)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["fc"].b.round(3))  # −η ĝ_B
      [[-0.1 -0.1 -0.1]
       [-0.1 -0.1 -0.1]]

      With ``on_nonfinite="skip"`` a step with NaN gradients changes nothing and is counted:

      >>> tx = lp.lora_pro_sgd(0.1, on_nonfinite="skip")
      >>> bad = {"fc": grads["fc"].replace(a=grads["fc"].a.at[0, 0].set(jnp.nan))}
      >>> updates, state = tx.update(bad, tx.init(params), params)
      >>> float(abs(updates["fc"].b).max()), int(lp.nonfinite_skips(state))
      (0.0, 1)
    """
    tx = optax.chain(
        scale_by_lora_pro(delta=delta, x_mode=x_mode),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
    return guard_nonfinite(tx, on_nonfinite, max_consecutive_skips=max_consecutive_skips, name="lora_pro_sgd")


class ScaleByLoraProAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pro_adam`.

    Attributes:
      count: ``()`` int32, number of updates so far (bias correction uses the true step count ``t``).
      mu: first moments. Per LoRA pair (``form="full"``): ``(*stack, *in_shape, *out_shape)`` — the
        full-size moment of the equivalent gradient, in the base kernel's (Flax) layout (a stacked pair's
        moments have the stacked kernel's shape). Per other leaf: like the
        leaf.
      nu: second moments, shaped like ``mu``.
    """

    count: Int[Array, ""]
    mu: Any
    nu: Any


def scale_by_lora_pro_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    delta: float = 1e-8,
    x_mode: XMode = "sylvester",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    """LoRA-Pro, the paper's AdamW "full" form (without learning rate and weight decay).

    For each pair: the equivalent gradient ``ẽ = s (B ĝ_A + ĝ_B A)`` of the LoRA-Pro gradients feeds
    full-size Adam moments ``m, v`` (shape of the base kernel); the bias-corrected Adam direction
    ``d = m̂ / (sqrt(v̂) + eps)`` is mapped back to LoRA space ``h_A = s Bᵀ d``, ``h_B = s d Aᵀ`` and
    the LoRA-Pro closed form (with ``X``) turns ``(h_A, h_B)`` into the updates of ``A`` and ``B``; so
    the equivalent update is the best rank-constrained approximation of the full AdamW direction.
    Bias correction uses the true step count ``t`` (the reference code's ``t + 1`` is off by one).
    Other leaves get plain Adam. Costs ``2 m n`` state per pair.

    Args:
      b1, b2, eps, eps_root: Adam hyper-parameters (as in ``optax.scale_by_adam``).
      delta, x_mode: see :func:`lora_pro_gradients`.
      mu_dtype: dtype of both moments (e.g. ``jnp.bfloat16`` as the reference code); default: the
        parameter dtype.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ScaleByLoraProAdamState` (no NaN/inf check: see
      :func:`~lorapro_jax.guard_nonfinite`).
    """
    check_x_mode(x_mode)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        def pair_zeros(path, p):
            dt = mu_dtype or jnp.result_type(p.a)
            return jnp.zeros(p.kernel_shape, dt)

        def leaf_zeros(path, x):
            return jnp.zeros_like(x, dtype=mu_dtype or jnp.result_type(x)) if hasattr(x, "shape") else x

        mu = map_pairs(pair_zeros, leaf_zeros, params)
        nu = map_pairs(pair_zeros, leaf_zeros, params)
        return ScaleByLoraProAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        require_params(params, "scale_by_lora_pro_adam")
        count = optax.safe_increment(state.count)

        def on_leaf(path, g, p, mu, nu):
            if not hasattr(g, "shape"):
                return Packed(g, mu, nu)
            dt = jnp.promote_types(g.dtype, jnp.float32)
            bc1, bc2 = bias_correction(b1, count, dt), bias_correction(b2, count, dt)
            mu2 = b1 * mu.astype(dt) + (1.0 - b1) * g.astype(dt)
            nu2 = b2 * nu.astype(dt) + (1.0 - b2) * jnp.square(g.astype(dt))
            d = (mu2 / bc1) / (jnp.sqrt(nu2 / bc2 + eps_root) + eps)
            return Packed(d.astype(g.dtype), mu2.astype(mu.dtype), nu2.astype(nu.dtype))

        seq = LinalgSequence()  # every eigh of this update, all groups, one after another
        group_fn = lambda group: _full_group(group, count, b1, b2, eps, eps_root, delta, x_mode, seq)
        packed = map_groups(group_fn, on_leaf, updates, params, state.mu, state.nu)
        new_updates, new_mu, new_nu = unzip_packed(packed, 3)
        return new_updates, ScaleByLoraProAdamState(count=count, mu=new_mu, nu=new_nu)

    return optax.GradientTransformation(init_fn, update_fn)


class LoraProDecayState(NamedTuple):
    """State of :func:`add_lora_pro_decayed_weights`.

    Attributes:
      count: ``()`` int32 step count (to evaluate a learning-rate schedule).
      base_decay: ``()`` float32, ``1 − η_t λ`` of the latest step: the factor by which the frozen base
        weights ``W0`` should be multiplied to decay like full AdamW (see :func:`base_decay_factor`).
    """

    count: Int[Array, ""]
    base_decay: Float[Array, ""]


def add_lora_pro_decayed_weights(
    weight_decay: float,
    learning_rate: optax.ScalarOrSchedule,
    *,
    pair_decay: Literal["sqrt", "linear"] = "sqrt",
    mask: Any = None,
) -> optax.GradientTransformation:
    """Decoupled weight decay for LoRA pairs, to be placed right before ``scale_by_learning_rate``.

    ``pair_decay="sqrt"`` (LoRA-Pro full form): A and B are multiplied by ``sqrt(1 − η λ)`` each, so
    ``s B A`` decays by ``1 − η λ`` as ``W`` does in full AdamW; ``"linear"``: by ``1 − η λ`` (plain
    AdamW on A and B, the efficient form). Other leaves: plain AdamW decay ``1 − η λ``. The update
    added is ``c · param`` with ``c`` chosen so that after ``scale_by_learning_rate`` the parameter is
    multiplied by exactly that factor.

    Args:
      weight_decay: ``λ``.
      learning_rate: the same learning rate (or schedule) given to ``scale_by_learning_rate``.
      pair_decay: see above.
      mask: optional pytree/callable of booleans (as ``optax.add_decayed_weights``'s ``mask``).
    """
    if pair_decay not in ("sqrt", "linear"):
        raise ValueError(f"pair_decay must be 'sqrt' or 'linear', got {pair_decay!r}")

    def init_fn(params):
        del params
        return LoraProDecayState(count=jnp.zeros([], jnp.int32), base_decay=jnp.ones([], jnp.float32))

    def update_fn(updates, state, params=None):
        require_params(params, "add_lora_pro_decayed_weights")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        lam = jnp.asarray(weight_decay, jnp.float32)
        # (1 - sqrt(1 - lr·λ)) / lr, written without dividing by lr.
        c_sqrt = lam / (1.0 + jnp.sqrt(jnp.maximum(1.0 - lr * lam, 0.0)))
        c_pair = c_sqrt if pair_decay == "sqrt" else lam

        def on_pair(path, u, p):
            return u.replace(a=u.a + (c_pair * p.a).astype(u.a.dtype), b=u.b + (c_pair * p.b).astype(u.b.dtype))

        def on_leaf(path, u, p):
            if not hasattr(u, "shape"):
                return u
            return u + (lam * p).astype(u.dtype)

        new = map_pairs(on_pair, on_leaf, updates, params)
        return new, LoraProDecayState(count=optax.safe_increment(state.count), base_decay=1.0 - lr * lam)

    tx = optax.GradientTransformation(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


def lora_pro_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    form: Form = "full",
    x_mode: XMode = "sylvester",
    delta: float = 1e-8,
    mu_dtype: Any = None,
    mask: Any = None,
    lean_rank: int | None = None,
    on_nonfinite: NonfiniteMode = "raise",
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
) -> optax.GradientTransformation:
    """LoRA-Pro AdamW (arXiv 2407.18242), as an optax optimizer.

    Forms:
      * ``"full"`` (the paper's main algorithm): full-size Adam moments of the equivalent gradient,
        see :func:`scale_by_lora_pro_adam`; A and B decay by ``sqrt(1 − ηλ)``.
      * ``"efficient"``: plain low-rank AdamW on the LoRA-Pro gradients ``(ĝ_A, ĝ_B)`` (memory of
        LoRA); A and B decay by ``1 − ηλ``.
      * ``"lean"``: the full form's direction from factored state, see
        :func:`lorapro_jax.optim.lean.scale_by_lora_pro_lean` (``lean_rank`` sets its first-moment rank).

    Non-LoRA leaves are trained with ordinary AdamW. To decay the frozen ``W0`` as well (as the
    reference implementation does), call ``lorapro_jax.decay_base_weights(model,
    base_decay_factor(opt_state))`` after each update. To clip like the reference (by the norm of the
    raw LoRA gradients), chain ``optax.clip_by_global_norm`` in front.

    Args:
      learning_rate: float or schedule ``η``.
      b1, b2, eps, eps_root: Adam hyper-parameters.
      weight_decay: decoupled weight decay ``λ``.
      form: ``"full"`` | ``"efficient"`` | ``"lean"``.
      x_mode: ``"sylvester"`` | ``"zero"`` | ``"symmetry"``.
      delta: damping of the r x r inverses.
      mu_dtype: dtype of the Adam moments.
      mask: optional weight-decay mask (pytree or callable of booleans).
      lean_rank: rank of the lean form's first moment (default ``2 r`` per pair).
      on_nonfinite: ``"raise"`` | ``"skip"`` | ``"ignore"`` for steps with NaN/inf gradients or updates:
        :func:`~lorapro_jax.guard_nonfinite` applied once around the whole chain (a skipped step leaves
        moments, weight decay and schedule counts as they were; see :mod:`lorapro_jax.optim.nonfinite`).
      max_consecutive_skips: with ``"skip"``, raise after more than this many non-finite steps in a row.

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import lorapro_jax as lp
      >>> params = {"fc": lp.LoraPair(a=jnp.eye(3, 2), b=jnp.zeros((2, 3)), scale=1.0), "bias": jnp.zeros(3)}
      >>> grads = {"fc": lp.LoraPair(a=jnp.zeros((3, 2)), b=jnp.ones((2, 3)), scale=1.0), "bias": jnp.ones(3)}
      >>> tx = lp.lora_pro_adamw(1e-2, form="full")
      >>> state = tx.init(params)
      >>> state[0].mu["fc"].shape  # the full form keeps an (n, m) Adam moment per pair
      (3, 3)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> print(params["bias"].round(4))  # a plain leaf gets plain AdamW: −η on the first step
      [-0.01 -0.01 -0.01]
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}.")
    if form == "full":
        direction = scale_by_lora_pro_adam(b1, b2, eps, eps_root, delta=delta, x_mode=x_mode, mu_dtype=mu_dtype)
    elif form == "efficient":
        direction = optax.chain(
            scale_by_lora_pro(delta=delta, x_mode=x_mode),
            optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype),
        )
    else:
        direction = scale_by_lora_pro_lean(b1, b2, eps, delta=delta, x_mode=x_mode, rank=lean_rank, mu_dtype=mu_dtype)
    tx = optax.chain(
        direction,
        add_lora_pro_decayed_weights(
            weight_decay, learning_rate, pair_decay="sqrt" if form != "efficient" else "linear", mask=mask
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    return guard_nonfinite(tx, on_nonfinite, max_consecutive_skips=max_consecutive_skips, name="lora_pro_adamw")


def base_decay_factor(opt_state: Any) -> Float[Array, ""]:
    """The factor ``1 − η_t λ`` of the latest step, read from a state containing :class:`LoraProDecayState`.

    Multiply the frozen base weights by it (:func:`lorapro_jax.decay_base_weights`) to reproduce the
    reference LoRA-Pro AdamW, which decays ``W0`` too. Returns 1.0 when no decay state is found.
    """
    found = []

    def visit(x):
        if isinstance(x, LoraProDecayState):
            found.append(x.base_decay)
        return x

    jax.tree.map(visit, opt_state, is_leaf=lambda x: isinstance(x, LoraProDecayState))
    if not found:
        return jnp.ones([], jnp.float32)
    return jnp.asarray(unwrap_variable(found[0]))
