"""What an optimizer step does when its gradients or its update hold NaN or inf: raise, skip or ignore.

One wrapper, :func:`guard_nonfinite`, is the whole mechanism (in the spirit of ``optax.apply_if_finite``):
it wraps any optax transformation, e.g. a user's own ``optax.chain``. The building blocks
(:func:`~lorapro_jax.scale_by_lora_pro`, :func:`~lorapro_jax.scale_by_lora_pro_adam`,
:func:`~lorapro_jax.optim.lean.scale_by_lora_pro_lean`) check nothing; the aliases
(:func:`~lorapro_jax.lora_pro_sgd`, :func:`~lorapro_jax.lora_pro_adamw`, :func:`~lorapro_jax.lora_plus_adamw`)
take ``on_nonfinite`` and wrap their whole chain once, so weight decay and learning-rate schedules stand
still on a skipped step too. The modes:

* ``"raise"``: a step whose incoming gradients or outgoing updates are not finite raises
  :class:`NonFiniteError`, whose message starts with the parameter paths concerned. The check is a
  ``lax.cond`` on one on-device boolean: the host callback that raises sits in the failing branch only,
  so a healthy step makes no host round trip. XLA wraps exceptions raised in callbacks in a
  ``JaxRuntimeError``; :func:`unwrap_nonfinite_errors` turns that back into the readable error.
* ``"skip"``: no host callback at all on the healthy path. A non-finite step returns zero updates and
  leaves the whole optimizer state as it was (moments, step counts: as ``optax.apply_if_finite``); it
  is counted in a :class:`SkipNonfiniteState` (read it with :func:`nonfinite_skips`). After more than
  ``max_consecutive_skips`` non-finite steps in a row the step raises :class:`NonFiniteError` (again
  from a callback inside the failing branch of a ``lax.cond``): a run whose loss diverged for good
  stops instead of spinning.
* ``"ignore"``: no check (the transformation is returned as it is, with extra-args support).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any, Iterator, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Int

from ._tree import unwrap_variable

__all__ = [
    "NonfiniteMode",
    "NonFiniteError",
    "SkipNonfiniteState",
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
    "guard_nonfinite",
    "nonfinite_skips",
    "unwrap_nonfinite_errors",
    "nonfinite_error",
]

NonfiniteMode = Literal["raise", "skip", "ignore"]
_MODES = ("raise", "skip", "ignore")
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10
_MAX_PATHS_SHOWN = 8


class NonFiniteError(FloatingPointError):
    """A step met NaN/inf gradients or produced NaN/inf updates.

    Attributes:
      paths: the ``jax.tree_util.keystr`` paths of the offending leaves.
      kind: ``"gradient"`` (the incoming gradients were non-finite) or ``"update"`` (finite gradients,
        non-finite update: an overflow inside the optimizer).
      transform: the name of the transformation that raised.
      consecutive: with ``on_nonfinite="skip"``, the number of non-finite steps in a row that hit the
        limit; ``None`` with ``"raise"``.
    """

    def __init__(self, message: str, paths: tuple[str, ...] = (), kind: str = "gradient", transform: str = "",
                 consecutive: int | None = None):
        super().__init__(message)
        self.paths, self.kind, self.transform, self.consecutive = tuple(paths), kind, transform, consecutive

    def __reduce__(self):
        return (type(self), (str(self), self.paths, self.kind, self.transform, self.consecutive))


class SkipNonfiniteState(NamedTuple):
    """State of :func:`guard_nonfinite` with ``on_nonfinite="skip"``.

    Attributes:
      inner_state: the wrapped transformation's state (unchanged by a skipped step).
      total_skips: ``()`` int32, steps skipped so far.
      consecutive_skips: ``()`` int32, non-finite steps in a row (a finite step resets it to 0).
    """

    inner_state: Any
    total_skips: Int[Array, ""]
    consecutive_skips: Int[Array, ""]


def _check_mode(on_nonfinite: str, where: str) -> str:
    if on_nonfinite not in _MODES:
        raise ValueError(f"{where}: on_nonfinite must be one of {_MODES}, got {on_nonfinite!r}.")
    return on_nonfinite


# ----------------------------------------------------------------------------------------------
# Flags on device, message on host.


def _float_leaves(tree: Any) -> list[tuple[str, Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [
        (jax.tree_util.keystr(p), x)
        for p, x in flat
        if hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]


def _finite_flags(leaves: list[tuple[str, Array]]) -> Bool[Array, " k"]:
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in leaves])


def _describe(paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_PATHS_SHOWN])
    more = len(paths) - _MAX_PATHS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


_last_error_lock = threading.Lock()
_last_error: list[NonFiniteError] = []


def _remember(err: NonFiniteError) -> NonFiniteError:
    with _last_error_lock:
        _last_error[:] = [err]
    return err


def _build_error(name: str, grad_paths, update_paths, grad_ok, update_ok, consecutive=None, limit=None):
    import numpy as np

    grad_ok, update_ok = np.asarray(grad_ok, bool), np.asarray(update_ok, bool)
    bad_g = [p for p, ok in zip(grad_paths, grad_ok) if not ok]
    bad_u = [p for p, ok in zip(update_paths, update_ok) if not ok]
    if bad_g:
        paths, kind, what = bad_g, "gradient", "non-finite gradient values (NaN/inf)"
    else:
        paths, kind, what = bad_u, "update", "non-finite update computed from finite gradients (overflow in the optimizer)"
    where = f"{_describe(paths)}: {what} in {name}"
    if consecutive is None:
        hint = " (on_nonfinite='raise'; on_nonfinite='skip' skips such steps instead)."
        return NonFiniteError(where + hint, tuple(paths), kind, name)
    msg = (f"{where}: {int(consecutive)} non-finite steps in a row, more than max_consecutive_skips={int(limit)} "
           "(on_nonfinite='skip'); training diverged.")
    return NonFiniteError(msg, tuple(paths), kind, name, int(consecutive))


def _raise_in_failing_branch(pred_ok, name, grad_leaves, update_leaves, grad_ok, update_ok, consecutive=None, limit=None):
    """A ``lax.cond`` whose failing branch calls the host to raise :class:`NonFiniteError`.

    Returns a boolean token (True: no error) that the caller must fold into an output, so that the
    branch is not dead code. The callback is a ``jax.pure_callback``, not ``jax.debug.callback``: a
    computation with an effect (any debug callback, even one in a branch never taken) loses jit's C++
    fast dispatch path (measured ~10x the per-call overhead on CPU); a pure callback does not. The host
    re-checks the flags, so the token is also correct where ``cond`` becomes ``select`` (``vmap``).
    """
    import numpy as np

    grad_paths = [p for p, _ in grad_leaves]
    update_paths = [p for p, _ in update_leaves]
    with_count = consecutive is not None

    def host_check(g_ok, u_ok, *count):
        if with_count:
            failing = int(count[0]) > int(count[1])
        else:
            failing = not (np.all(g_ok) and np.all(u_ok))
        if failing:
            raise _remember(_build_error(name, grad_paths, update_paths, g_ok, u_ok, *count))
        return np.bool_(True)

    def fail(operands):
        return jax.pure_callback(host_check, jax.ShapeDtypeStruct((), jnp.bool_), *operands, vmap_method="sequential")

    operands = (grad_ok, update_ok) + ((consecutive, jnp.asarray(limit, jnp.int32)) if with_count else ())
    return jax.lax.cond(pred_ok, lambda ops: jnp.bool_(True), fail, operands)


# ----------------------------------------------------------------------------------------------
# The wrapper.


def _select(ok, new, old):
    def pick(n, o):
        if not hasattr(n, "dtype"):
            return n
        return jnp.where(ok, n, o)

    return jax.tree.map(pick, new, old)


def _zeros_like_tree(tree):
    return jax.tree.map(lambda u: jnp.zeros_like(u) if hasattr(u, "dtype") else u, tree)


def guard_nonfinite(
    inner: optax.GradientTransformation,
    on_nonfinite: NonfiniteMode = "skip",
    *,
    max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that a step with NaN/inf gradients or updates raises, is skipped, or passes.

    Args:
      inner: any optax transformation (e.g. a whole ``optax.chain``).
      on_nonfinite: ``"raise"`` | ``"skip"`` | ``"ignore"`` (see the module docstring). ``"raise"`` and
        ``"ignore"`` keep ``inner``'s state unchanged in structure; ``"skip"`` wraps it in a
        :class:`SkipNonfiniteState`.
      max_consecutive_skips: with ``"skip"``: raise :class:`NonFiniteError` when more than this many
        steps in a row were non-finite (default 10; ``None``: never raise; ``0``: raise on the first
        one, like ``"raise"`` but counting). May be a traced scalar (``optax.inject_hyperparams``).
      name: the name errors give the transformation (default ``"optimizer"``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import lorapro_jax as lp
      >>> tx = lp.guard_nonfinite(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)), "skip")
      >>> params = {"w": jnp.ones(2)}
      >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(params))
      >>> updates["w"].tolist(), int(lp.nonfinite_skips(state))  # zero updates, state kept, step counted
      ([0.0, 0.0], 1)
    """
    mode = _check_mode(on_nonfinite, name or "guard_nonfinite")
    if max_consecutive_skips is not None and isinstance(max_consecutive_skips, (int, float)) and max_consecutive_skips < 0:
        raise ValueError(f"max_consecutive_skips must be >= 0 or None, got {max_consecutive_skips!r}.")
    name = name or "optimizer"
    inner = optax.with_extra_args_support(inner)
    if mode == "ignore":
        return inner
    if mode == "raise":
        return _raising(inner, name)
    return _skipping(inner, name, max_consecutive_skips)


def _raising(inner, name):
    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, state, params, **extra_args)
        g_leaves, u_leaves = _float_leaves(updates), _float_leaves(new_updates)
        if not u_leaves:
            return new_updates, new_state
        g_ok, u_ok = _finite_flags(g_leaves), _finite_flags(u_leaves)
        token = _raise_in_failing_branch(jnp.all(g_ok) & jnp.all(u_ok), name, g_leaves, u_leaves, g_ok, u_ok)
        # Fold the token into the smallest update leaf (it is always True when the step returns).
        small = min(range(len(u_leaves)), key=lambda i: u_leaves[i][1].size)
        flat, treedef = jax.tree_util.tree_flatten(new_updates)
        target = u_leaves[small][1]
        flat = [jnp.where(token, x, jnp.zeros_like(x)) if x is target else x for x in flat]
        return jax.tree_util.tree_unflatten(treedef, flat), new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _skipping(inner, name, limit):
    def init_fn(params):
        # two distinct buffers: one shared array would fail buffer donation ("donate the same buffer twice")
        return SkipNonfiniteState(inner.init(params), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        g_leaves, u_leaves = _float_leaves(updates), _float_leaves(new_updates)
        g_ok, u_ok = _finite_flags(g_leaves), _finite_flags(u_leaves)
        ok = jnp.all(g_ok) & jnp.all(u_ok)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        total = state.total_skips + bad
        consecutive = jnp.where(ok, 0, state.consecutive_skips + 1).astype(jnp.int32)
        if limit is not None:
            within = consecutive <= jnp.asarray(limit, jnp.int32)
            token = _raise_in_failing_branch(within, name, g_leaves, u_leaves, g_ok, u_ok, consecutive, limit)
            consecutive = jnp.where(token, consecutive, 0)  # the token is True whenever the step returns
        out_updates = _select(ok, new_updates, _zeros_like_tree(new_updates))
        out_inner = _select(ok, new_inner, state.inner_state)
        return out_updates, SkipNonfiniteState(out_inner, total.astype(jnp.int32), consecutive)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Reading the state; readable errors.


_SKIP_FIELDS = frozenset(SkipNonfiniteState._fields)


def _is_skip_state(x: Any) -> bool:
    """A :class:`SkipNonfiniteState`, or the mapping ``nnx.state(optimizer)`` turns one into."""
    if isinstance(x, SkipNonfiniteState):
        return True
    return isinstance(x, Mapping) and _SKIP_FIELDS <= set(x.keys())


def nonfinite_skips(opt_state: Any) -> Int[Array, ""]:
    """Number of steps skipped for non-finite gradients/updates, found anywhere in an optimizer state.

    Finds every :class:`SkipNonfiniteState` nested in ``opt_state`` (``optax.chain``,
    ``inject_hyperparams``, ``masked``, ``MultiSteps`` states ...) and returns the sum of their
    ``total_skips`` (0 when there is none). ``opt_state`` may also be an ``nnx.Optimizer`` /
    :class:`~lorapro_jax.LoraOptimizer` (its ``opt_state`` is read) or ``nnx.state`` of one. Works
    under ``jit``.

    Returns:
      ``()`` int32 array.
    """
    if hasattr(opt_state, "opt_state") and hasattr(opt_state, "tx"):
        opt_state = opt_state.opt_state
    found = []

    def visit(x):
        if _is_skip_state(x):
            get = (lambda k: getattr(x, k)) if isinstance(x, SkipNonfiniteState) else x.__getitem__
            found.append(jnp.asarray(unwrap_variable(get("total_skips")), jnp.int32))
            jax.tree.map(visit, get("inner_state"), is_leaf=_is_skip_state)
        return x

    jax.tree.map(visit, opt_state, is_leaf=_is_skip_state)
    total = jnp.zeros([], jnp.int32)
    for f in found:
        total = total + f
    return total


def nonfinite_error(exc: BaseException) -> NonFiniteError | None:
    """The :class:`NonFiniteError` behind ``exc``: itself, its cause, or the one a host callback raised.

    XLA re-raises exceptions from host callbacks as ``JaxRuntimeError: INTERNAL: CpuCallback error
    ...`` with the original traceback as text; this finds the original error object again.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, NonFiniteError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(exc)
    with _last_error_lock:
        last = _last_error[0] if _last_error else None
    if last is not None and str(last) in text:
        return last
    return None


@contextlib.contextmanager
def unwrap_nonfinite_errors() -> Iterator[None]:
    """Context manager: re-raises a non-finite error wrapped by XLA as the readable :class:`NonFiniteError`.

    Example::

        with lp.unwrap_nonfinite_errors():
            loss = train_step(model, optimizer, batch)   # NonFiniteError: ['lin']['lora'].a: non-finite ...
    """
    try:
        yield
    except NonFiniteError:
        raise
    except Exception as e:
        err = nonfinite_error(e)
        if err is None:
            raise
        raise NonFiniteError(str(err), err.paths, err.kind, err.transform, err.consecutive) from None


class _DropOwnCallbackLogs(logging.Filter):
    """JAX logs every exception raised in a debug callback before XLA re-raises it; ours are re-raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, NonFiniteError)


for _logger in ("jax._src.callback", "jax._src.debugging"):
    logging.getLogger(_logger).addFilter(_DropOwnCallbackLogs())
