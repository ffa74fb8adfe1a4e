"""The NNX module transform: forward, gradients, merge/unmerge, errors — checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 10, rngs=rngs)
        self.gen = nnx.LinearGeneral(10, (2, 4), rngs=rngs)  # kernel (10, 2, 4)
        self.ein = nnx.Einsum("bhd,dho->bo", (4, 2, 6), (6,), rngs=rngs)  # kernel axes interleave in/out
        self.emb = nnx.Embed(5, 3, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.fc1(x))
        h = self.gen(h)  # (b, 2, 4)
        h = self.ein(h)  # (b, 6)
        return self.head(h)


def _adapted(rank=2, alpha=3.0, targets=r"fc1|gen|ein", **kw):
    m = Net(nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=rank, alpha=alpha, targets=targets, **kw), rngs=nnx.Rngs(1))
    # Give B non-zero values so the LoRA branch matters.
    for i, layer in enumerate(lp.lora_layers(m).values()):
        p = layer.pair
        b = jax.random.normal(jax.random.key(10 + i), p.b.shape) * 0.3
        layer.lora.set_value(lp.LoraPair(p.a, b, p.scale))
    return m


def _x(b=5):
    return jax.random.normal(jax.random.key(3), (b, 12))


def test_initial_output_unchanged_with_zero_b():
    m = Net(nnx.Rngs(0))
    x = _x()
    y0 = np.asarray(m(x))
    lp.apply_lora(m, lp.LoraConfig(rank=2, targets=r"fc1|gen|ein"), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(m(x)), y0)


def test_forward_matches_numpy_for_linear_general_and_einsum():
    m = _adapted()
    x = np.asarray(_x())
    L = lp.lora_layers(m)

    def npy(layer):
        p = layer.pair
        return np.asarray(p.a), np.asarray(p.b), p.scale, np.asarray(layer.base.kernel[...]), np.asarray(layer.base.bias[...])

    a, b, s, w, bias = npy(L["fc1"])
    h = np.tanh(x @ w + bias + s * (x @ a) @ b)
    a, b, s, w, bias = npy(L["gen"])  # w (10,2,4), a (10,r), b (r,2,4)
    h = np.einsum("bi,ihd->bhd", h, w) + bias + s * np.einsum("br,rhd->bhd", h @ a, b)
    a, b, s, w, bias = npy(L["ein"])  # w (4,2,6) 'dho'; in letters 'dh' (kernel order), a (4,2,r), b (r,6)
    h = np.einsum("bhd,dho->bo", h, w) + bias + s * np.einsum("bhd,dhr,ro->bo", h, a, b)
    want = h @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
    np.testing.assert_allclose(np.asarray(m(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_forward_and_unmerge_restores_kernels():
    m = _adapted()
    x = _x()
    y = np.asarray(m(x))
    kernels = {p: np.asarray(l.base.kernel[...]) for p, l in lp.lora_layers(m).items()}
    lp.merge_lora(m)
    for p, l in lp.lora_layers(m).items():
        pr = l.pair
        a2 = np.asarray(pr.a).reshape(-1, pr.rank)
        b2 = np.asarray(pr.b).reshape(pr.rank, -1)
        # For "ein" the kernel order 'dho' is (in d, in h, out o), i.e. already (in..., out...).
        delta = (pr.scale * a2 @ b2).reshape(pr.in_shape + pr.out_shape)
        np.testing.assert_allclose(np.asarray(l.base.kernel[...]), kernels[p] + delta, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m(x)), y, atol=2e-6)
    with pytest.raises(ValueError, match="already merged"):
        lp.merge_lora(m)
    lp.unmerge_lora(m)
    for p, l in lp.lora_layers(m).items():
        np.testing.assert_allclose(np.asarray(l.base.kernel[...]), kernels[p], atol=1e-6)
    np.testing.assert_allclose(np.asarray(m(x)), y, atol=2e-6)


def test_einsum_with_interleaved_kernel_axes_merges_in_kernel_order():
    class E(nnx.Module):
        def __init__(self, rngs):
            self.e = nnx.Einsum("bd,odh->boh", (3, 5, 2), rngs=rngs)  # kernel 'odh': out o, in d, out h

        def __call__(self, x):
            return self.e(x)

    m = E(nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["e"]), rngs=nnx.Rngs(1))
    layer = lp.lora_layers(m)["e"]
    assert layer.pair.a.shape == (5, 2) and layer.pair.b.shape == (2, 3, 2)
    p = layer.pair
    layer.lora.set_value(lp.LoraPair(p.a, jnp.ones(p.b.shape), p.scale))
    x = jax.random.normal(jax.random.key(0), (4, 5))
    y = np.asarray(m(x))
    k = np.asarray(layer.base.kernel[...])
    a, b = np.asarray(layer.pair.a), np.asarray(layer.pair.b)
    want = np.einsum("bd,odh->boh", np.asarray(x), k + p.scale * np.einsum("dr,roh->odh", a, b))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    lp.merge_and_unwrap(m)
    assert isinstance(m.e, nnx.Einsum)
    np.testing.assert_allclose(np.asarray(m(x)), want, rtol=1e-5, atol=1e-5)


def test_lora_grads_from_autodiff_equal_formula_and_finite_differences():
    # g_a (Flax) = s · G bᵀ and g_b = s · aᵀ G with G = dL/dW0 (Flax layout, (in, out)).
    m = _adapted(targets=["fc1"])
    layer = lp.lora_layers(m)["fc1"]
    x = _x()
    c = jax.random.normal(jax.random.key(7), (5, 3))

    def loss(model):
        return jnp.sum(model(x) * c)

    g_lora = nnx.grad(loss, argnums=nnx.DiffState(0, lp.LoRAParam))(m)
    g_pair = g_lora["fc1"]["lora"].get_value()
    g_full = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("base"))))(m)
    G = np.asarray(g_full["fc1"]["base"]["kernel"][...])
    p = layer.pair
    a, b, s = np.asarray(p.a), np.asarray(p.b), p.scale
    np.testing.assert_allclose(np.asarray(g_pair.a), s * G @ b.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_pair.b), s * a.T @ G, rtol=1e-4, atol=1e-5)

    # Finite differences on two entries of a (float64 would be tighter; fp32 with h=1e-2 on a linear-in-a branch).
    for idx in [(0, 0), (3, 1)]:
        h = 1e-2
        vals = []
        for sign in (1, -1):
            a2 = p.a.at[idx].add(sign * h)
            layer.lora.set_value(lp.LoraPair(a2, p.b, s))
            vals.append(float(loss(m)))
        layer.lora.set_value(p)
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(fd - float(g_pair.a[idx])) < 2e-2 * max(1.0, abs(fd))


def test_scale_and_rslora():
    m = _adapted(rank=4, alpha=8.0, targets=["fc1"])
    assert lp.lora_layers(m)["fc1"].pair.scale == pytest.approx(2.0)
    m = _adapted(rank=4, alpha=8.0, targets=["fc1"], rslora=True)
    assert lp.lora_layers(m)["fc1"].pair.scale == pytest.approx(4.0)


def test_rank_overrides_and_a_mask_and_gate():
    m = _adapted(rank=2, targets=r"fc1|gen", rank_overrides={"gen": 3}, a_mask=True)
    L = lp.lora_layers(m)
    assert L["fc1"].pair.rank == 2 and L["gen"].pair.rank == 3
    assert L["gen"].pair.scale == pytest.approx(3.0 / 3)
    x = _x()
    layer = L["fc1"]
    layer.a_mask[...] = jnp.zeros_like(layer.a_mask[...])
    layer.gate[...] = jnp.array([1.0, 0.0])
    # With A fully masked, fc1 behaves as its base.
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer.base(x)))
    # With the mask on and one rank gated off, the branch uses rank 0 only.
    layer.a_mask[...] = jnp.ones_like(layer.a_mask[...])
    p = layer.pair
    a, b = np.asarray(p.a), np.asarray(p.b)
    want = np.asarray(layer.base(x)) + p.scale * (np.asarray(x) @ a[:, :1]) @ b[:1]
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-6)


def test_dropout_only_when_not_deterministic():
    m = _adapted(targets=["fc1"], dropout=0.5)
    x = _x()
    layer = lp.lora_layers(m)["fc1"]
    m.eval()
    y1, y2 = np.asarray(layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(y1, y2)
    m.train()
    y3 = np.asarray(layer(x))
    assert not np.allclose(y3, y1)


def test_input_norm_tracking_matches_numpy():
    m = _adapted(targets=["fc1"], track_input_norm=True, input_norm_decay=0.5)
    layer = lp.lora_layers(m)["fc1"]
    x = np.asarray(_x())
    layer(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(layer.input_norm[...]), 0.5 * np.linalg.norm(x, axis=0), rtol=1e-5)


def test_errors_name_paths():
    m = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"match no adaptable layer.*fc1"):
        lp.apply_lora(m, lp.LoraConfig(rank=2, targets=r"nothing_here"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"'nope' matches no adaptable layer"):
        lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["fc1", "nope"]), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"emb \(Embed\)"):
        lp.apply_lora(m, lp.LoraConfig(rank=2, targets=r"emb|fc1"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"rank 7 for 'head' exceeds min\(m, n\) = min\(3, 6\)"):
        lp.apply_lora(m, lp.LoraConfig(rank=7, targets=["head"]), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="not a valid regex"):
        lp.LoraConfig(targets="(")


def test_only_lora_params_are_trained():
    m = _adapted(targets=["fc1"])
    k0 = np.asarray(m.fc1.base.kernel[...])
    head0 = np.asarray(m.head.kernel[...])
    opt = nnx.Optimizer(m, lp.lora_pro_adamw(1e-2), wrt=lp.LoRAParam)
    x = _x()

    @nnx.jit
    def step(m, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, lp.LoRAParam))(m)
        opt.update(m, g)
        return loss

    p0 = m.fc1.pair
    for _ in range(3):
        step(m, opt)
    np.testing.assert_array_equal(np.asarray(m.fc1.base.kernel[...]), k0)
    np.testing.assert_array_equal(np.asarray(m.head.kernel[...]), head0)
    assert not np.allclose(np.asarray(m.fc1.pair.b), np.asarray(p0.b))


def _tiny_adapted():
    m = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(2)))
    lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["layers.0", "layers.1"]), rngs=nnx.Rngs(1))
    for layer in lp.lora_layers(m).values():
        layer.lora.set_value(layer.pair.replace(b=jnp.full(layer.pair.b.shape, 0.5)))
    return m


def test_flax_lora_param_filter_selects_native_adapters():
    # lp.LoRAParam subclasses flax's nnx.LoRAParam: one filter serves native, nnx.LoRA and qwix trees.
    assert issubclass(lp.LoRAParam, nnx.LoRAParam) and issubclass(lp.LoRAParam, nnx.Param)
    m = _tiny_adapted()
    native = nnx.to_flat_state(nnx.state(m, lp.LoRAParam))
    flax_ = nnx.to_flat_state(nnx.state(m, nnx.LoRAParam))
    assert [p for p, _ in native] == [p for p, _ in flax_] == [("layers", 0, "lora"), ("layers", 1, "lora")]
    assert all(isinstance(v.get_value(), lp.LoraPair) for _, v in flax_)
    # beside a flax nnx.LoRALinear: nnx.LoRAParam picks both kinds, lp.LoRAParam only the native ones
    m.extra = nnx.LoRALinear(3, 3, lora_rank=2, rngs=nnx.Rngs(4))
    paths = lambda f: sorted(p for p, _ in nnx.to_flat_state(nnx.state(m, f)))
    assert paths(nnx.LoRAParam) == sorted(paths(lp.LoRAParam) + [("extra", "lora", "lora_a"), ("extra", "lora", "lora_b")])
    assert ("extra", "lora", "lora_a") not in paths(lp.LoRAParam)
    # training with wrt=nnx.LoRAParam is training with wrt=lp.LoRAParam: same leaves move, kernels stay
    x = jax.random.normal(jax.random.key(3), (4, 5))
    results = []
    for wrt in (lp.LoRAParam, nnx.LoRAParam):
        tiny = _tiny_adapted()
        kernels = [np.asarray(layer.base.kernel[...]) for layer in lp.lora_layers(tiny).values()]
        b0 = np.asarray(tiny.layers[0].pair.b)
        opt = nnx.Optimizer(tiny, optax.sgd(0.1), wrt=wrt)
        opt.update(tiny, nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, wrt))(tiny))
        for layer, k0 in zip(lp.lora_layers(tiny).values(), kernels):
            np.testing.assert_array_equal(np.asarray(layer.base.kernel[...]), k0)
        assert not np.array_equal(np.asarray(tiny.layers[0].pair.b), b0)
        results.append(jax.tree.map(np.asarray, nnx.state(tiny, nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


def test_decay_base_weights_scales_kernels_and_refuses_merged_layers():
    m = _adapted(targets=["fc1"])
    k0, head0 = np.asarray(m.fc1.base.kernel[...]), np.asarray(m.head.kernel[...])
    lp.decay_base_weights(m, 0.9)
    np.testing.assert_allclose(np.asarray(m.fc1.base.kernel[...]), 0.9 * k0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.head.kernel[...]), head0)  # not adapted: untouched
    lp.merge_lora(m)
    with pytest.raises(ValueError, match="'fc1' is merged"):
        lp.decay_base_weights(m, 0.9)
