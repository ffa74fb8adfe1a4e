"""apply_lora on stacked kernels: nnx.vmap layer axes (run under nnx.scan) and LinearGeneral/Einsum batch axes.

Checked against an unrolled twin (the same weights in separate layers) and against NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _stacked_models import D, L, Scanned, copy_slices, twins
from flax import nnx

from lorapro_jax import LoraConfig, LoRALayer, apply_lora, lora_layers, merge_and_unwrap, merge_lora, unmerge_lora


def _x(seed=3, batch=5):
    return jax.random.normal(jax.random.key(seed), (batch, D))


def test_apply_lora_reads_layer_axes_from_the_module():
    m = apply_lora(Scanned(nnx.Rngs(0)), LoraConfig(rank=2, targets=("q", "g", "e")), rngs=nnx.Rngs(1))
    layers = lora_layers(m)
    q, g, e = layers["layers.q"], layers["layers.g"], layers["layers.e"]
    assert q.pair.a.shape == (L, D, 2) and q.pair.b.shape == (L, 2, D) and q.pair.stack_shape == (L,)
    assert g.pair.a.shape == (L, D, 2) and g.pair.b.shape == (L, 2, 2, D // 2)
    # Einsum "bhd,hdk->bhk": h is a batch axis of the module itself, stacked after the layer axis.
    assert e.pair.a.shape == (L, 2, D // 2, 2) and e.pair.b.shape == (L, 2, 2, D // 2)
    assert e.pair.stack_shape == (L, 2) and e.pair.in_shape == (D // 2,)
    assert q.gate[...].shape == (L, 2) and e.gate[...].shape == (L, 2, 2)
    for layer in (q, g, e):
        assert layer.pair.kernel_shape[: layer.pair.stack_ndim] == layer.pair.stack_shape
        assert layer.spec.layer_shape == (L,)


@pytest.mark.parametrize("extra", [{}, {"a_mask": True}])
def test_scanned_forward_equals_unrolled_twin(extra):
    scanned, unrolled = twins(**extra)
    x = _x()
    ys, yu = scanned(x), unrolled(x)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(yu), rtol=1e-5, atol=1e-5)
    # the adapters matter: without them the outputs differ
    for layer in lora_layers(unrolled).values():
        layer.lora.set_value(layer.pair.replace(b=layer.pair.b * 0))
    assert not np.allclose(np.asarray(ys), np.asarray(unrolled(x)), atol=1e-4)


def test_scanned_forward_under_jit_and_grad_match_unrolled():
    scanned, unrolled = twins(seed=1)
    x = _x(4)

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    from lorapro_jax import LoRAParam

    gs = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(scanned, x)
    gu = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(unrolled, x)
    ls = jax.tree_util.tree_leaves(gs)
    for i in range(L):
        lu = jax.tree_util.tree_leaves(gu["layers"][i])
        assert len(lu) == len(ls)
        for s, u in zip(ls, lu):
            np.testing.assert_allclose(np.asarray(s[i]), np.asarray(u), rtol=1e-4, atol=1e-5)
    ys = nnx.jit(lambda m, x: m(x))(scanned, x)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(unrolled(x)), rtol=1e-5, atol=1e-5)


def test_input_norm_stats_per_slice_match_unrolled():
    scanned, unrolled = twins(seed=2, track_input_norm=True)
    x = _x(5)
    scanned(x), unrolled(x)
    for path in ("q", "g", "e"):
        s = np.asarray(lora_layers(scanned)[f"layers.{path}"].input_norm[...])
        for i in range(L):
            u = np.asarray(lora_layers(unrolled)[f"layers.{i}.{path}"].input_norm[...])
            assert np.abs(u).max() > 0
            np.testing.assert_allclose(s[i], u, rtol=1e-5, atol=1e-6)


def test_effective_pair_and_delta_kernel_per_slice():
    scanned, unrolled = twins(seed=3, a_mask=True)
    for path in ("q", "g", "e"):
        st = lora_layers(scanned)[f"layers.{path}"]
        dk = np.asarray(st.delta_kernel())
        assert dk.shape == st.base.kernel.shape
        ep = st.effective_pair()
        for i in range(L):
            un = lora_layers(unrolled)[f"layers.{i}.{path}"]
            np.testing.assert_allclose(dk[i], np.asarray(un.delta_kernel()), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(ep.a[i]), np.asarray(un.effective_pair().a), rtol=1e-6)


def test_merge_unmerge_and_unwrap_per_slice():
    scanned, unrolled = twins(seed=4)
    x = _x(6)
    y0 = np.asarray(scanned(x))
    k0 = {p: np.asarray(l.base.kernel[...]) for p, l in lora_layers(scanned).items()}
    merge_lora(scanned), merge_lora(unrolled)
    np.testing.assert_allclose(np.asarray(scanned(x)), y0, rtol=1e-5, atol=1e-5)
    for path in ("q", "g", "e"):
        ks = np.asarray(lora_layers(scanned)[f"layers.{path}"].base.kernel[...])
        for i in range(L):
            ku = np.asarray(lora_layers(unrolled)[f"layers.{i}.{path}"].base.kernel[...])
            np.testing.assert_allclose(ks[i], ku, rtol=1e-6, atol=1e-6)
    unmerge_lora(scanned)
    for p, l in lora_layers(scanned).items():
        np.testing.assert_allclose(np.asarray(l.base.kernel[...]), k0[p], rtol=1e-6, atol=1e-6)
    merge_and_unwrap(scanned)
    assert not lora_layers(scanned) and isinstance(scanned.layers.q, nnx.Linear)
    np.testing.assert_allclose(np.asarray(scanned(x)), y0, rtol=1e-5, atol=1e-5)


def test_calling_a_stacked_layer_outside_scan_is_an_error():
    scanned, _ = twins(seed=5)
    with pytest.raises(ValueError, match=r"layers\.q.*stacked over layer axes \(4,\)"):
        scanned.layers.q(_x())


def test_dropout_on_stacked_layers_runs_under_scan():
    scanned, _ = twins(seed=6, dropout=0.5)
    x = _x(7)
    y1, y2 = np.asarray(scanned(x)), np.asarray(scanned(x))
    assert y1.shape == (5, D) and not np.allclose(y1, y2)  # fresh masks each call, one stream per layer


# -- module batch axes: checked against NumPy ---------------------------------------------------------
def _np_branch(x, a, b, gate, scale):
    return scale * ((x @ a) * gate) @ b


def test_linear_general_batch_axis_matches_numpy():
    base = nnx.LinearGeneral((4,), (3,), batch_axis={0: 2}, rngs=nnx.Rngs(0))
    m = nnx.Dict(lin=base)
    apply_lora(m, LoraConfig(rank=2, alpha=2.0, targets=("lin",)), rngs=nnx.Rngs(1))
    layer = m["lin"]
    assert layer.pair.a.shape == (2, 4, 2) and layer.pair.b.shape == (2, 2, 3) and layer.gate[...].shape == (2, 2)
    rng = np.random.default_rng(0)
    layer.lora.set_value(layer.pair.replace(b=jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)))
    layer.gate[...] = jnp.asarray(rng.uniform(size=(2, 2)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)  # batch axis 0 of size 2
    y = np.asarray(layer(x))
    k = np.asarray(base.kernel[...])
    a, b, g, s = (np.asarray(v) for v in (layer.pair.a, layer.pair.b, layer.gate[...], layer.pair.scale))
    for j in range(2):
        ref = np.asarray(x[j]) @ k[j] + np.asarray(base.bias[...][j]) + _np_branch(np.asarray(x[j]), a[j], b[j], g[j], s)
        np.testing.assert_allclose(y[j], ref, rtol=1e-5, atol=1e-5)
    merge_lora(m)
    np.testing.assert_allclose(np.asarray(layer(x)), y, rtol=1e-5, atol=1e-5)


def test_einsum_batch_letter_matches_numpy():
    base = nnx.Einsum("ecd,edf->ecf", (3, 4, 5), (3, 5), rngs=nnx.Rngs(0))
    m = nnx.Dict(moe=base)
    apply_lora(m, LoraConfig(rank=2, alpha=2.0, targets=("moe",), track_input_norm=True), rngs=nnx.Rngs(1))
    layer = m["moe"]
    assert layer.pair.a.shape == (3, 4, 2) and layer.pair.b.shape == (3, 2, 5)
    rng = np.random.default_rng(1)
    layer.lora.set_value(layer.pair.replace(b=jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)))
    layer.gate[...] = jnp.asarray(rng.uniform(size=(3, 2)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    y = np.asarray(layer(x))
    k, bias = np.asarray(base.kernel[...]), np.asarray(base.bias[...])
    a, b, g, s = (np.asarray(v) for v in (layer.pair.a, layer.pair.b, layer.gate[...], layer.pair.scale))
    for j in range(3):
        xj = np.asarray(x[j])
        ref = xj @ k[j] + bias[j] + _np_branch(xj, a[j], b[j], g[j], s)
        np.testing.assert_allclose(y[j], ref, rtol=1e-5, atol=1e-5)
    norms = 0.1 * np.sqrt((np.asarray(x) ** 2).sum(axis=1))  # (e, d): one EMA step from zero
    np.testing.assert_allclose(np.asarray(layer.input_norm[...]), norms, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.delta_kernel())[1], s * (a[1] * g[1]) @ b[1], rtol=1e-5, atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------------
def test_unreadable_stacked_kernel_names_path_and_shape():
    class Odd(nnx.Module):
        def __init__(self):
            self.q = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
            # a stack axis that is not leading (nnx.vmap(out_axes=1)): the kernel no longer ends in (16, 16)
            self.q.kernel = nnx.Param(jnp.zeros((16, 4, 16)))

    with pytest.raises(ValueError, match=r"'q'.*\(16, 4, 16\).*\(16, 16\)"):
        apply_lora(Odd(), LoraConfig(rank=2, targets=("q",)), rngs=nnx.Rngs(1))


def test_unstacked_pairs_are_unchanged():
    m = nnx.Dict(q=nnx.Linear(8, 6, rngs=nnx.Rngs(0)))
    apply_lora(m, LoraConfig(rank=2, targets=("q",)), rngs=nnx.Rngs(1))
    p = m["q"].pair
    assert p.in_ndim is None and p.a.shape == (8, 2) and m["q"].gate[...].shape == (2,)
    assert isinstance(m["q"], LoRALayer)


def test_copy_slices_helper_copies_base_weights():
    s = Scanned(nnx.Rngs(0))
    from _stacked_models import Unrolled

    u = Unrolled(nnx.Rngs(9))
    copy_slices(s, u)
    np.testing.assert_array_equal(np.asarray(u.layers[2].q.kernel[...]), np.asarray(s.layers.q.kernel[...][2]))
