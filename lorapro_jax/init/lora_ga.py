"""LoRA-GA: initialise LoRA so that its first step approximates full fine-tuning's.

Reference: Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000.

Paper layout (used by the math below and by :func:`lora_ga_factors`): ``W0`` is ``m x n`` (out x in),
``A`` is ``r x n``, ``B`` is ``m x r``, ``W = W0 + s B A``, ``G = dL/dW0`` is ``m x n``. In the model
(Flax layout) ``a = Aᵀ: (*in, r)``, ``b = Bᵀ: (r, *out)`` and the kernel is ``W0ᵀ: (*in, *out)``; the
conversions happen in exactly two places: :func:`lorapro_jax.init.paper_gradient` (kernel gradient →
``G``) and :func:`lora_ga_init` (``A0, B0`` → ``a, b``).

Algorithm. With ``G = U diag(σ) Vᵀ`` (top ``2r`` triplets, exact or randomised with
``q = min(4 r, min(m, n))``), ``direction`` picks disjoint index sets ``I_A, I_B`` of size ``r`` from
``{0, ..., 2r − 1}``::

    "ArB2r" (default): A0 = Vᵀ[0:r],       B0 = U[:, r:2r]
    "ArBr":            A0 = Vᵀ[1:2r:2],    B0 = U[:, 0:2r:2]
    "A2rBr":           A0 = Vᵀ[r:2r],      B0 = U[:, 0:r]
    "random":          a random split of {0, ..., 2r − 1} into I_A and I_B

and both factors are multiplied by ``c`` (``scale_mode``): ``"stable"`` ``c = m^(1/4) / sqrt(γ)``, ``"gd"`` ``c = 1/s``,
``"unit"`` ``c = 1``. The base weight becomes ``W0' = W0 − s B0 A0`` (fp32) so the model is unchanged.

First-step property (Theorem 3.1 of the paper, exact statement tested in ``tests/init``): one SGD
step of size ``η`` on ``A, B`` from this init, with the gradient ``G`` used for the init, changes the
equivalent weight by ``ΔW = s (B1 A1 − B0 A0) = −η s² (B0 B0ᵀ G + G A0ᵀ A0) + O(η²)`` and, since
``B0 B0ᵀ G + G A0ᵀ A0 = c² Σ_{i < 2r} σ_i u_i v_iᵀ = c² G_{2r}`` for every direction,

    lim_{η→0} ΔW / η = −s² c² G_{2r}   (= −G_{2r} with scale_mode="gd": projected full gradient descent).

The paper pairs this with rsLoRA (``s = α / sqrt(r)``, ``LoraConfig(rslora=True)``); the scale ``s`` is
always the pair's own ``scale`` (i.e. ``config.scale_for(rank)`` of that layer).

Export. Training changes only ``A, B``; the original weights are ``W0 = W0' + s B0 A0``, so the
trained weight is ``W0 + ΔW`` with ``ΔW = s (B A − B0 A0) = s [B | B0] [A ; −A0]``: a rank-``2r``
adapter on the ORIGINAL base weights (:func:`lora_ga_delta`, :func:`lora_ga_export`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float

from ..errors import check_config, check_module
from ..lora.config import LoraConfig
from ..lora.nnx_lora import LoRALayer, apply_lora, lora_layers
from ..lora.pair import LoraPair, pair_matrices
from .gradients import LossFn, estimate_full_gradients, paper_gradient
from .svd import SvdMethod, truncated_svd

__all__ = [
    "Direction",
    "ScaleMode",
    "apply_lora_ga",
    "lora_ga_delta",
    "lora_ga_delta_kernel",
    "lora_ga_export",
    "lora_ga_factors",
    "lora_ga_init",
    "lora_ga_original_kernels",
]

Direction = Literal["ArB2r", "ArBr", "A2rBr", "random"]
ScaleMode = Literal["stable", "gd", "unit"]
_DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
_SCALES = ("stable", "gd", "unit")


def _check_options(direction: str, scale_mode: str, svd: str, stable_gamma: float) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"LoRA-GA direction must be one of {_DIRECTIONS}, got {direction!r}.")
    if scale_mode not in _SCALES:
        raise ValueError(f"LoRA-GA scale_mode must be one of {_SCALES}, got {scale_mode!r}.")
    if svd not in ("full", "randomized"):
        raise ValueError(f"LoRA-GA svd must be 'full' or 'randomized', got {svd!r}.")
    if not stable_gamma > 0:
        raise ValueError(f"LoRA-GA stable_gamma must be positive, got {stable_gamma!r}.")


def _scale_factor(scale_mode: str, m: int, s: float, stable_gamma: float) -> float:
    if scale_mode == "stable":
        return m**0.25 / math.sqrt(stable_gamma)
    if scale_mode == "gd":
        return 1.0 / s
    return 1.0


def _direction_indices(direction: str, rank: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the top-2r singular triplets) used for A0 and for B0."""
    if direction == "ArB2r":
        return np.arange(rank), np.arange(rank, 2 * rank)
    if direction == "ArBr":
        return np.arange(1, 2 * rank, 2), np.arange(0, 2 * rank, 2)
    if direction == "A2rBr":
        return np.arange(rank, 2 * rank), np.arange(rank)
    perm = np.asarray(jax.random.permutation(key, 2 * rank))
    return perm[:rank], perm[rank:]


@functools.partial(jax.jit, static_argnames=("rank", "svd", "n_iter"))
def _factors_jit(g, key, ia, ib, c, *, rank, svd, n_iter):
    # Only shapes and (rank, svd, n_iter) are static: one compilation per weight shape, whatever the
    # direction or scale.
    m, n = g.shape
    q = min(4 * rank, min(m, n))
    u, _, vt = truncated_svd(g, 2 * rank, method=svd, q=q, key=key, n_iter=n_iter)
    c = c.astype(g.dtype)
    return c * vt[ia], c * u[:, ib]


def lora_ga_factors(
    g: Float[Array, "m n"],
    rank: int,
    scale: float,
    *,
    direction: Direction = "ArB2r",
    scale_mode: ScaleMode = "stable",
    stable_gamma: float = 16.0,
    svd: SvdMethod = "randomized",
    n_iter: int = 4,
    key: jax.Array | None = None,
) -> tuple[Float[Array, "r n"], Float[Array, "m r"]]:
    """LoRA-GA's ``(A0, B0)`` for one weight, in the PAPER layout.

    Args:
      g: the full gradient ``G = dL/dW0``, ``(m, n)`` = (out, in).
      rank: LoRA rank ``r``; needs ``2 r <= min(m, n)``.
      scale: the LoRA scale ``s`` of this layer (used by ``scale_mode="gd"``).
      direction: ``"ArB2r"`` | ``"ArBr"`` | ``"A2rBr"`` | ``"random"`` (see the module docstring).
      scale_mode: ``"stable"`` (``c = m^(1/4)/sqrt(γ)``) | ``"gd"`` (``c = 1/s``) | ``"unit"`` (``c = 1``).
      stable_gamma: ``γ`` of ``"stable"``.
      svd: ``"randomized"`` (reference: sketch ``q = min(4 r, min(m, n))``, ``n_iter`` power iterations)
        or ``"full"`` (exact).
      n_iter: power iterations of the randomised SVD.
      key: PRNG key for the randomised SVD and the ``"random"`` direction (default ``key(0)``).

    Returns:
      ``A0: (r, n)`` and ``B0: (m, r)`` (dtype of ``g``, at least float32) with ``c``-scaled orthonormal rows / columns.
    """
    _check_options(direction, scale_mode, svd, stable_gamma)
    g = jnp.asarray(g)
    if g.ndim != 2:
        raise ValueError(f"lora_ga_factors: G must be a 2-D (m, n) matrix, got shape {tuple(g.shape)}.")
    m, n = g.shape
    if 2 * rank > min(m, n):
        raise ValueError(
            f"LoRA-GA needs 2 r <= min(m, n) (it uses the top 2r singular vectors of G); got r = {rank} for an "
            f"{m} x {n} (out x in) weight."
        )
    key = jax.random.key(0) if key is None else key
    svd_key, dir_key = jax.random.split(key)
    ia, ib = _direction_indices(direction, int(rank), dir_key)
    c = _scale_factor(scale_mode, m, float(scale), float(stable_gamma))
    return _factors_jit(
        g.astype(jnp.promote_types(g.dtype, jnp.float32)),
        svd_key,
        jnp.asarray(ia),
        jnp.asarray(ib),
        jnp.asarray(c),
        rank=int(rank),
        svd=svd,
        n_iter=int(n_iter),
    )


def _as_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int):
        return jax.random.key(key)
    if isinstance(key, nnx.Rngs):
        return key.params()
    return key


def lora_ga_init(
    model: nnx.Module,
    grads: Mapping[str, Any],
    *,
    direction: Direction = "ArB2r",
    scale_mode: ScaleMode = "stable",
    stable_gamma: float = 16.0,
    svd: SvdMethod = "randomized",
    n_iter: int = 4,
    key: jax.Array | int | nnx.Rngs | None = None,
) -> dict[str, LoraPair]:
    """Initialises every LoRA layer named in ``grads`` with LoRA-GA, in place (arXiv 2407.05000).

    For each ``path -> gradient`` (Flax kernel layout, as returned by
    :func:`~lorapro_jax.init.estimate_full_gradients`): converts it to the paper's ``G: (m, n)``, computes
    ``(A0, B0)`` with :func:`lora_ga_factors` using the layer's own rank ``r`` and scale ``s``, writes
    ``a = A0ᵀ: (*in, r)``, ``b = B0ᵀ: (r, *out)`` into the layer's :class:`LoraPair` (in the pair's
    dtype) and sets the base kernel to ``W0 − s (a ⊙ mask ⊙ gate) b`` computed in at least float32 (then cast to
    the kernel's dtype; float64 stays float64), so the model's output is unchanged up to rounding.

    Args:
      model: an NNX model adapted with :func:`lorapro_jax.apply_lora` (not merged).
      grads: ``{dotted path: dL/dW0}`` in each base kernel's shape.
      direction, scale_mode, stable_gamma, svd, n_iter: see :func:`lora_ga_factors` (``scale_mode`` picks
        the factor ``c``; the LoRA scale ``s`` itself is each layer's own).
      key: PRNG key / int seed / ``nnx.Rngs`` (its ``params`` stream) for the randomised SVD and the
        ``"random"`` direction; ``None`` means ``key(0)``. Layer ``i`` uses ``fold_in(key, i)``.

    Returns:
      ``{path: LoraPair(a0, b0, s)}``: the initial adapter actually added (mask and gate folded into
      ``a0``), Flax layout; keep it to export the trained adapter (:func:`lora_ga_export`).

    Raises:
      ValueError: unknown path, merged layer, gradient of the wrong shape, non-finite or identically
        zero gradient, ``2 r > min(m, n)``, bad options.
    """
    _check_options(direction, scale_mode, svd, stable_gamma)
    layers = lora_layers(model)
    key = _as_key(key)
    record: dict[str, LoraPair] = {}
    for i, (path, grad) in enumerate(grads.items()):
        layer = layers.get(path)
        if layer is None:
            raise ValueError(f"lora_ga_init: {path!r} is not a LoRA layer of the model. LoRA layers: {list(layers)}")
        if layer.merged:
            raise ValueError(f"lora_ga_init: LoRA layer {path!r} is merged; unmerge it first.")
        g = paper_gradient(layer, grad)  # (*stack, m, n): one G per slice of a stacked layer
        a, b = _lora_ga_pair(path, layer, g, jax.random.fold_in(key, i), dict(
            direction=direction, scale_mode=scale_mode, stable_gamma=stable_gamma, svd=svd, n_iter=n_iter))
        layer.lora.set_value(layer.pair.replace(a=a, b=b))
        init = layer.effective_pair()  # what the forward pass adds: s (a ⊙ mask ⊙ gate) b
        kernel = layer.base.kernel
        k = kernel[...]
        kernel[...] = (k.astype(_wide(k)) - _delta_kernel(layer, init, _wide(k))).astype(k.dtype)
        record[path] = init
    return record


def _lora_ga_pair(path: str, layer: LoRALayer, g: Array, key: Array, options: dict) -> tuple[Array, Array]:
    """``a = A0ᵀ``, ``b = B0ᵀ`` in the pair's shapes and dtype, from ``G`` ``(*stack, m, n)``, slice by slice.

    An unstacked layer uses ``key``; slice ``j`` (row-major over the stack axes) of a stacked layer uses
    ``fold_in(key, j)``, so each slice gets the SVD of its own gradient, as the unrolled model's layers do.
    """
    pair = layer.pair
    stack = tuple(g.shape[:-2])
    norms = np.asarray(jnp.linalg.norm(g, axis=(-2, -1))).reshape(stack)
    for idx in np.ndindex(*stack):
        where = f"{path!r}" + (f" (slice {idx} of its stack axes {stack})" if stack else "")
        if not np.isfinite(norms[idx]):
            raise ValueError(f"lora_ga_init: the gradient of {where} has non-finite values.")
        if norms[idx] == 0.0:
            raise ValueError(
                f"lora_ga_init: the gradient of {where} is identically zero (is the layer used by loss_fn?); "
                "its singular vectors are undefined."
            )
    a0s, b0s = [], []
    for j, idx in enumerate(np.ndindex(*stack)):
        try:
            a0, b0 = lora_ga_factors(
                g[idx], pair.rank, pair.scale, key=jax.random.fold_in(key, j) if stack else key, **options
            )
        except ValueError as e:
            raise ValueError(f"lora_ga_init: LoRA layer {path!r}: {e}") from e
        a0s.append(a0.T)  # (n, r) = A0ᵀ
        b0s.append(b0.T)  # (r, m) = B0ᵀ
    a = jnp.stack(a0s).reshape(pair.a.shape).astype(pair.a.dtype)
    b = jnp.stack(b0s).reshape(pair.b.shape).astype(pair.b.dtype)
    return a, b


def _wide(x: Any) -> Any:
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _delta_kernel(layer: LoRALayer, pair: LoraPair, dtype: Any) -> Array:
    """``s a b`` of ``pair`` in ``layer``'s kernel shape and axis order, computed in ``dtype``."""
    a2, b2 = pair_matrices(pair)
    return layer.spec.to_kernel(pair.scale * (a2.astype(dtype) @ b2.astype(dtype)))


def _check_same(path: str, p: LoraPair, init: LoraPair) -> None:
    if p.a.shape != init.a.shape or p.b.shape != init.b.shape:
        raise ValueError(
            f"lora_ga_delta {path}: trained pair a{tuple(p.a.shape)}, b{tuple(p.b.shape)} does not match the initial "
            f"pair a{tuple(init.a.shape)}, b{tuple(init.b.shape)}."
        )
    if not math.isclose(p.scale, init.scale, rel_tol=1e-12):
        raise ValueError(f"lora_ga_delta {path}: trained scale {p.scale} differs from the initial scale {init.scale}.")


def lora_ga_delta(trained: LoRALayer | LoraPair, init: LoraPair) -> LoraPair:
    """The rank-``2r`` adapter moving the ORIGINAL base weight to the trained one.

    ``ΔW = s (B A − B0 A0) = s [B | B0] [A ; −A0]``; in Flax layout ``a = [a | −a0]: (*in, 2r)``,
    ``b = [b ; b0]: (2r, *out)``, same scale ``s``, so ``LoraPair.delta()`` is ``s (a b − a0 b0)``.
    Exporting it to a PEFT-style ``alpha``: ``alpha = s · 2r`` (or ``s · sqrt(2r)`` with rsLoRA).

    Args:
      trained: the trained :class:`LoRALayer` (its mask and gate are folded in) or its pair.
      init: the pair recorded by :func:`lora_ga_init` for that layer.
    """
    path = getattr(trained, "path", "")
    p = trained.effective_pair() if isinstance(trained, LoRALayer) else trained
    _check_same(repr(path), p, init)
    dt = jnp.result_type(p.a, init.a)
    a = jnp.concatenate([p.a.astype(dt), -init.a.astype(dt)], axis=-1)
    b = jnp.concatenate([p.b.astype(dt), init.b.astype(dt)], axis=p.stack_ndim)  # the rank axis
    return p.replace(a=a, b=b)


def lora_ga_delta_kernel(layer: LoRALayer, init: LoraPair) -> Array:
    """``ΔW`` in the base kernel's shape and axis order (at least float32): add it to the ORIGINAL kernel."""
    delta = lora_ga_delta(layer, init)
    return _delta_kernel(layer, delta, _wide(delta.a))


def lora_ga_export(model: nnx.Module, record: Mapping[str, LoraPair]) -> dict[str, LoraPair]:
    """``{path: rank-2r LoraPair}`` (:func:`lora_ga_delta`) for every layer of ``record``.

    Valid while the base kernels hold ``W0'`` as left by :func:`lora_ga_init` (frozen base; do not use
    :func:`lorapro_jax.decay_base_weights` in between).
    """
    layers = lora_layers(model)
    missing = [p for p in record if p not in layers]
    if missing:
        raise ValueError(f"lora_ga_export: {missing} are not LoRA layers of the model. LoRA layers: {list(layers)}")
    return {p: lora_ga_delta(layers[p], init) for p, init in record.items()}


def lora_ga_original_kernels(model: nnx.Module, record: Mapping[str, LoraPair]) -> dict[str, Array]:
    """The original base kernels ``W0 = W0' + s a0 b0`` (kernel shape, at least float32) of the layers of ``record``."""
    layers = lora_layers(model)
    out = {}
    for p, init in record.items():
        if p not in layers:
            raise ValueError(f"lora_ga_original_kernels: {p!r} is not a LoRA layer. LoRA layers: {list(layers)}")
        k = layers[p].base.kernel[...]
        dt = jnp.promote_types(_wide(k), _wide(init.a))
        out[p] = k.astype(dt) + _delta_kernel(layers[p], init, dt)
    return out


def apply_lora_ga(
    model: nnx.Module,
    config: LoraConfig,
    loss_fn: LossFn,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    rngs: nnx.Rngs,
    direction: Direction = "ArB2r",
    scale_mode: ScaleMode = "stable",
    stable_gamma: float = 16.0,
    svd: SvdMethod = "randomized",
    n_iter: int = 4,
    layer_by_layer: bool | int = False,
    mesh: Mesh | None = None,
    batch_axis: str | tuple[str, ...] = "data",
    data_parallel: Literal["jit", "shard_map"] = "jit",
    targets: str | Sequence[str] | None = None,
) -> tuple[nnx.Module, dict[str, LoraPair]]:
    """LoRA + LoRA-GA in one call: ``apply_lora``, ``estimate_full_gradients``, ``lora_ga_init``.

    Use ``LoraConfig(rslora=True)`` to match the paper's scaling. ``rngs`` initialises the LoRA layers
    (``params`` / ``dropout`` streams) and then seeds the randomised SVD (one more ``params`` key).
    ``targets`` restricts LoRA-GA to some of the adapted layers (the others keep the config's init).

    Args:
      model, config: as in :func:`~lorapro_jax.apply_lora`.
      loss_fn: ``loss_fn(model, batch) -> scalar``, differentiated with respect to the base kernels.
      batches: the batches (or a function returning an iterable of them) whose mean gradient is ``G``.
      rngs: see above.
      direction, scale_mode, stable_gamma, svd, n_iter: see :func:`lora_ga_factors`.
      layer_by_layer, mesh, batch_axis, data_parallel, targets: see
        :func:`~lorapro_jax.init.estimate_full_gradients`.

    Returns:
      ``(model, record)``: the model (adapted in place) and the :func:`lora_ga_init` record.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import lorapro_jax as lp
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.fc(x)
      >>> def loss_fn(model, batch):
      ...     x, y = batch
      ...     return jnp.mean((model(x) - y) ** 2)
      >>> x, y = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4), jnp.ones((2, 3))
      >>> model = MLP(nnx.Rngs(0))
      >>> before = model(x)
      >>> model, record = lp.apply_lora_ga(model, lp.LoraConfig(rank=1, alpha=1.0, targets=["fc"]), loss_fn,
      ...                                  [(x, y)], rngs=nnx.Rngs(1), svd="full")
      >>> record["fc"].a.shape, record["fc"].b.shape  # A0ᵀ, B0ᵀ from the SVD of the gradient
      ((4, 1), (1, 3))
      >>> bool(jnp.allclose(model(x), before, atol=1e-5))  # W0 − s B0 A0 + s B0 A0: output unchanged
      True
    """
    check_module(model, "model", "apply_lora_ga", "apply_lora_ga(model, config, loss_fn, batches, rngs=...)")
    check_config(config, "apply_lora_ga")
    _check_options(direction, scale_mode, svd, stable_gamma)
    apply_lora(model, config, rngs=rngs)
    grads = estimate_full_gradients(
        model, loss_fn, batches, targets=targets, layer_by_layer=layer_by_layer, mesh=mesh,
        batch_axis=batch_axis, data_parallel=data_parallel,
    )
    record = lora_ga_init(
        model, grads, direction=direction, scale_mode=scale_mode, stable_gamma=stable_gamma, svd=svd, n_iter=n_iter,
        key=rngs.params(),
    )
    return model, record
