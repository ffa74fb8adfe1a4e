"""LoRA-GA init: unchanged output, the first-step property against NumPy SVD, the chosen singular directions,
scales (incl. rsLoRA), the rank-2r export onto the ORIGINAL base weights, and errors."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.init import (
    apply_lora_ga,
    estimate_full_gradients,
    lora_ga_delta,
    lora_ga_delta_kernel,
    lora_ga_export,
    lora_ga_init,
    lora_ga_original_kernels,
)

sys.path.insert(0, os.path.dirname(__file__))
from _lora_ga_ref import Net, loss_fn, make_batches, np_loss_and_grads, pair_paper, to_paper, truncated, weights  # noqa: E402

NAMES = ("fc", "gen", "ein")
OUT_FEATURES = {"fc": 8, "gen": 8, "ein": 6}  # m of each weight, written out by hand


def _model(rank=2, alpha=4.0, dtype=jnp.float32, **kw):
    m = Net(nnx.Rngs(0), dtype=dtype)
    cfg = lp.LoraConfig(rank=rank, alpha=alpha, targets=list(NAMES), param_dtype=jnp.dtype(dtype).name, **kw)
    lp.apply_lora(m, cfg, rngs=nnx.Rngs(1))
    return m


def _kernel_from_flax_matrix(name, mat):
    """(n, m) Flax-layout matrix -> the kernel's own shape/axis order, written out by hand per layer."""
    if name == "fc":
        return mat
    if name == "gen":
        return mat.reshape(8, 2, 4)
    return np.transpose(mat.reshape(4, 2, 6), (2, 0, 1))  # (d, h, o) -> kernel 'odh'


def _flax_delta(pair):
    a = np.asarray(pair.a, np.float64)
    b = np.asarray(pair.b, np.float64)
    r = a.shape[-1]
    return pair.scale * a.reshape(-1, r) @ b.reshape(r, -1)


@pytest.mark.parametrize("direction", ["ArB2r", "ArBr", "A2rBr", "random"])
def test_output_unchanged_after_init_fp32(direction):
    m = _model()
    x = jnp.asarray(make_batches(1, 7, seed=11)[0][0])
    y0 = np.asarray(m(x))
    k0 = {n: np.asarray(getattr(m, n).base.kernel[...]) for n in NAMES}
    grads = estimate_full_gradients(m, loss_fn, make_batches(2, 4, seed=1))
    rec = lora_ga_init(m, grads, direction=direction, key=3)
    y1 = np.asarray(m(x))
    # fp32: W0' = W0 - s B0 A0 rounds once per kernel entry; the output may move by a few ulps.
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-5 * max(1.0, np.abs(y0).max()))
    for n in NAMES:
        layer = getattr(m, n)
        moved = np.abs(np.asarray(layer.base.kernel[...]) - k0[n]).max()
        assert moved > 1e-3  # the base really changed (by s B0 A0), and the adapter compensates exactly
        np.testing.assert_array_equal(np.asarray(rec[n].a), np.asarray(layer.pair.a))
        np.testing.assert_array_equal(np.asarray(rec[n].b), np.asarray(layer.pair.b))


def test_output_unchanged_with_mask_and_gate_and_record_folds_them():
    m = _model(a_mask=True)
    rng = np.random.default_rng(0)
    for n in NAMES:
        layer = getattr(m, n)
        layer.a_mask[...] = jnp.asarray(rng.integers(0, 2, size=layer.a_mask[...].shape), jnp.float32)
        layer.gate[...] = jnp.asarray([1.0, 0.5])
    x = jnp.asarray(make_batches(1, 5, seed=12)[0][0])
    y0 = np.asarray(m(x))
    rec = lora_ga_init(m, estimate_full_gradients(m, loss_fn, make_batches(1, 4)), svd="full")
    np.testing.assert_allclose(np.asarray(m(x)), y0, rtol=0, atol=1e-5 * max(1.0, np.abs(y0).max()))
    for n in NAMES:
        layer = getattr(m, n)
        want = np.asarray(layer.pair.a) * np.asarray(layer.a_mask[...]) * np.array([1.0, 0.5])
        np.testing.assert_allclose(np.asarray(rec[n].a), want, rtol=1e-6)


@pytest.mark.parametrize(
    "direction,scale,svd",
    [
        ("ArB2r", "gd", "full"),
        ("ArB2r", "unit", "full"),
        ("ArB2r", "stable", "randomized"),
        ("ArBr", "gd", "full"),
        ("A2rBr", "stable", "full"),
        ("random", "unit", "randomized"),
    ],
)
def test_first_sgd_step_is_best_rank_2r_approximation_of_minus_gradient(x64, direction, scale, svd):
    rank, alpha = 2, 4.0
    s = alpha / np.sqrt(rank)  # rsLoRA scale, computed here by hand
    m = _model(rank=rank, alpha=alpha, dtype=jnp.float64, rslora=True)
    batch = make_batches(1, 6, seed=5, dtype=np.float64)[0]
    _, G_kernel = np_loss_and_grads(weights(m), *batch)  # NumPy gradients at the ORIGINAL weights
    rec = lora_ga_init(m, estimate_full_gradients(m, loss_fn, [batch]), direction=direction, scale_mode=scale, svd=svd,
                       key=0)
    # LoRA gradients of the SAME batch (plain JAX autodiff), then one SGD step of size eta on A and B.
    g = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lp.LoRAParam))(m, tuple(map(jnp.asarray, batch)))
    for n in NAMES:
        p0 = rec[n]
        gp = g[n]["lora"].get_value()
        assert p0.scale == pytest.approx(s, rel=1e-12)

        def dw_over_eta(eta, p0=p0, gp=gp):
            p1 = lp.LoraPair(p0.a - eta * gp.a, p0.b - eta * gp.b, p0.scale)
            return (_flax_delta(p1) - _flax_delta(p0)).T / eta  # paper layout (m, n)

        # ΔW/η is exactly affine in η for one SGD step; Richardson extrapolation gives the η→0 limit.
        limit = 2 * dw_over_eta(5e-4) - dw_over_eta(1e-3)
        G = to_paper(n, G_kernel[n])
        A0, B0 = pair_paper(p0)
        first_order = -(s**2) * (B0 @ B0.T @ G + G @ A0.T @ A0)
        np.testing.assert_allclose(limit, first_order, rtol=1e-7, atol=1e-9 * np.abs(first_order).max())
        c = {"gd": 1 / s, "unit": 1.0, "stable": OUT_FEATURES[n] ** 0.25 / np.sqrt(16.0)}[scale]
        want = -(s**2) * c**2 * truncated(G, 2 * rank)
        err = np.abs(limit - want).max() / np.abs(want).max()
        assert err < 1e-6, (n, err)
        # ... and it is NOT the full gradient (rank 2r < min(m, n) here), so the check has teeth.
        assert np.abs(-(s**2) * c**2 * G - want).max() / np.abs(want).max() > 1e-3


@pytest.mark.parametrize("direction", ["ArB2r", "ArBr", "A2rBr", "random"])
def test_directions_pick_the_documented_singular_vectors(x64, direction):
    rank = 2
    m = _model(rank=rank, dtype=jnp.float64)
    batch = make_batches(1, 6, seed=6, dtype=np.float64)[0]
    _, G_kernel = np_loss_and_grads(weights(m), *batch)
    rec = lora_ga_init(m, estimate_full_gradients(m, loss_fn, [batch]), direction=direction, scale_mode="unit",
                       svd="full", key=1)
    expected = {
        "ArB2r": ([0, 1], [2, 3]),
        "ArBr": ([1, 3], [0, 2]),
        "A2rBr": ([2, 3], [0, 1]),
    }
    for n in NAMES:
        U, S, Vt = np.linalg.svd(to_paper(n, G_kernel[n]))
        assert np.all(np.diff(S[: 2 * rank + 1]) < -1e-8)  # distinct singular values: subspaces well defined
        A0, B0 = pair_paper(rec[n])
        np.testing.assert_allclose(A0 @ A0.T, np.eye(rank), atol=1e-10)  # orthonormal rows ("unit")
        np.testing.assert_allclose(B0.T @ B0, np.eye(rank), atol=1e-10)
        # Which singular vectors: |v_iᵀ a_j| and |u_iᵀ b_j| are 1 on the chosen indices.
        ia = sorted(np.argmax(np.abs(Vt[: 2 * rank] @ A0.T), axis=0).tolist())
        ib = sorted(np.argmax(np.abs(U[:, : 2 * rank].T @ B0), axis=0).tolist())
        np.testing.assert_allclose(np.abs(Vt[ia] @ A0.T).max(axis=0), 1.0, atol=1e-8)
        np.testing.assert_allclose(np.abs(U[:, ib].T @ B0).max(axis=0), 1.0, atol=1e-8)
        if direction == "random":
            assert sorted(ia + ib) == list(range(2 * rank))
        else:
            assert (ia, ib) == expected[direction], (n, ia, ib)


def test_rslora_and_rank_overrides_scales_are_used(x64):
    alpha = 4.0
    m = _model(rank=2, alpha=alpha, dtype=jnp.float64, rslora=True, rank_overrides={"gen": 3})
    rec = lora_ga_init(m, estimate_full_gradients(m, loss_fn, make_batches(1, 4, dtype=np.float64)), scale_mode="gd",
                       svd="full")
    for n, r in (("fc", 2), ("gen", 3), ("ein", 2)):
        s = alpha / np.sqrt(r)  # rsLoRA: alpha / sqrt(r), by hand
        assert rec[n].scale == pytest.approx(s, rel=1e-12)
        A0, B0 = pair_paper(rec[n])
        # "gd": c = 1/s, so A0 A0ᵀ = B0ᵀ B0 = I / s².
        np.testing.assert_allclose(A0 @ A0.T, np.eye(r) / s**2, atol=1e-10)
        np.testing.assert_allclose(B0.T @ B0, np.eye(r) / s**2, atol=1e-10)
    m = _model(rank=2, alpha=alpha, dtype=jnp.float64, rslora=False)
    rec = lora_ga_init(m, estimate_full_gradients(m, loss_fn, make_batches(1, 4, dtype=np.float64)), scale_mode="gd",
                       svd="full")
    A0, _ = pair_paper(rec["fc"])
    np.testing.assert_allclose(A0 @ A0.T, np.eye(2) / (alpha / 2) ** 2, atol=1e-10)


def test_apply_lora_ga_train_then_export_reproduces_trained_weights_from_original():
    original = weights(Net(nnx.Rngs(0)))  # same seed -> the original base weights
    m = Net(nnx.Rngs(0))
    batches = make_batches(4, 4, seed=9)
    cfg = lp.LoraConfig(rank=2, alpha=4.0, targets=list(NAMES), rslora=True)
    m, rec = apply_lora_ga(m, cfg, loss_fn, batches, rngs=nnx.Rngs(1), layer_by_layer=True)
    # The record recovers the original kernels from W0'.
    orig_k = lora_ga_original_kernels(m, rec)
    for n in NAMES:
        np.testing.assert_allclose(np.asarray(orig_k[n]), original[n][0], atol=2e-6)

    # Adam on the LoRA factors. (A functional optax loop: nnx.Optimizer currently turns the LoraPair nodes of
    # Adam's moments into State dicts on its second update, see tests/rank/test_rank_alora.py.)
    tx = optax.adam(1e-2)
    opt_state = tx.init(nnx.as_pure(nnx.state(m, lp.LoRAParam)))

    @nnx.jit
    def step(model, opt_state, batch):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lp.LoRAParam))(model, batch)
        params = nnx.as_pure(nnx.state(model, lp.LoRAParam))
        updates, opt_state = tx.update(nnx.as_pure(g), opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, opt_state

    losses = []
    for b in batches * 2:
        loss, opt_state = step(m, opt_state, tuple(map(jnp.asarray, b)))
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    export = lora_ga_export(m, rec)
    x = jnp.asarray(make_batches(1, 5, seed=13)[0][0])
    y_trained = np.asarray(m(x))
    fresh = Net(nnx.Rngs(0))
    for n in NAMES:
        layer = getattr(m, n)
        p = export[n]
        assert p.a.shape[-1] == 4 and p.b.shape[0] == 4  # rank 2r
        assert p.scale == pytest.approx(4.0 / np.sqrt(2))
        # Trained effective kernel W0' + s a b (by hand) == ORIGINAL + exported delta (by hand).
        trained = np.asarray(layer.base.kernel[...], np.float64) + _kernel_from_flax_matrix(n, _flax_delta(layer.pair))
        via_export = original[n][0] + _kernel_from_flax_matrix(n, _flax_delta(p))
        np.testing.assert_allclose(via_export, trained, atol=2e-6)
        np.testing.assert_allclose(np.asarray(lora_ga_delta_kernel(layer, rec[n])), via_export - original[n][0],
                                   atol=2e-6)
        getattr(fresh, n).kernel[...] = jnp.asarray(via_export, jnp.float32)
    np.testing.assert_allclose(np.asarray(fresh(x)), y_trained, atol=1e-5)


def test_errors_name_the_layer():
    m = _model(rank=4)  # 2r = 8 > min(6, 8) for "ein"
    grads = estimate_full_gradients(m, loss_fn, make_batches(1, 4))
    with pytest.raises(ValueError, match=r"'ein'.*2 r <= min\(m, n\).*r = 4 for an 6 x 8"):
        lora_ga_init(m, {"ein": grads["ein"]})
    m = _model()
    grads = estimate_full_gradients(m, loss_fn, make_batches(1, 4))
    with pytest.raises(ValueError, match="'nope' is not a LoRA layer"):
        lora_ga_init(m, {"nope": grads["fc"]})
    with pytest.raises(ValueError, match="'fc' is identically zero"):
        lora_ga_init(m, {"fc": jnp.zeros_like(grads["fc"])})
    with pytest.raises(ValueError, match="'fc' has non-finite"):
        lora_ga_init(m, {"fc": grads["fc"].at[0, 0].set(jnp.nan)})
    with pytest.raises(ValueError, match="direction must be one of"):
        lora_ga_init(m, grads, direction="BrA2r")
    with pytest.raises(ValueError, match="scale_mode must be one of"):
        lora_ga_init(m, grads, scale_mode="weightS")
    rec = lora_ga_init(m, {"fc": grads["fc"]})
    with pytest.raises(ValueError, match="does not match the initial pair"):
        lora_ga_delta(m.gen, rec["fc"])
    lp.merge_lora(m)
    with pytest.raises(ValueError, match="'gen' is merged"):
        lora_ga_init(m, {"gen": grads["gen"]})
