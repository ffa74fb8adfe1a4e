"""LoRA-GA on a scan-over-layers model: per-slice gradient SVD equals the unrolled twin's, slice by slice."""

import jax
import jax.numpy as jnp
import numpy as np
from _stacked_models import D, L, twins

import lorapro_jax as lp
from lorapro_jax.init import estimate_full_gradients, lora_ga_export, lora_ga_init, paper_gradient


def _loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def _batches():
    k = jax.random.key(0)
    return [(jax.random.normal(jax.random.fold_in(k, i), (8, D)), jax.random.normal(jax.random.fold_in(k, 9 + i), (8, D)))
            for i in range(2)]


def test_stacked_lora_ga_equals_per_slice_svd_of_unrolled_gradients():
    scanned, unrolled = twins(seed=0, targets=("q", "g"))
    gs = estimate_full_gradients(scanned, _loss, _batches())
    gu = estimate_full_gradients(unrolled, _loss, _batches())
    assert gs["layers.q"].shape == (L, D, D)
    for path in ("q", "g"):
        for i in range(L):
            np.testing.assert_allclose(np.asarray(gs[f"layers.{path}"][i]), np.asarray(gu[f"layers.{i}.{path}"]),
                                       rtol=1e-4, atol=1e-6)
    layer = lp.lora_layers(scanned)["layers.q"]
    assert paper_gradient(layer, gs["layers.q"]).shape == (L, D, D)
    # exact SVD: the factors are a function of each slice's G alone (the randomised sketch would use other keys)
    rec_s = lora_ga_init(scanned, gs, svd="full")
    rec_u = lora_ga_init(unrolled, {f"layers.{i}.{p}": gs[f"layers.{p}"][i] for p in ("q", "g") for i in range(L)},
                         svd="full")
    for path in ("q", "g"):
        st = lp.lora_layers(scanned)[f"layers.{path}"]
        assert rec_s[f"layers.{path}"].stack_shape == (L,)
        for i in range(L):
            un = lp.lora_layers(unrolled)[f"layers.{i}.{path}"]
            np.testing.assert_allclose(np.asarray(st.pair.a[i]), np.asarray(un.pair.a), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(st.pair.b[i]), np.asarray(un.pair.b), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(st.base.kernel[...][i]), np.asarray(un.base.kernel[...]),
                                       rtol=1e-5, atol=1e-6)
    # the model is unchanged by the init (W0' = W0 - s B0 A0), per slice
    x = _batches()[0][0]
    np.testing.assert_allclose(np.asarray(scanned(x)), np.asarray(unrolled(x)), rtol=1e-5, atol=1e-5)
    # the rank-2r export is stacked too and is zero right after the init
    delta = lora_ga_export(scanned, rec_s)["layers.q"]
    assert delta.a.shape == (L, D, 4) and delta.b.shape == (L, 4, D) and delta.stack_shape == (L,)
    np.testing.assert_allclose(np.asarray(delta.delta()), 0.0, atol=1e-6)
