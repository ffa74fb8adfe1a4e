"""The Linen path: forward vs NumPy, merge, LoRA-Pro training, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lp
from lorapro_jax.lora import apply_linen_lora, init_linen_lora, merge_linen_lora


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(10, name="fc1")(x))
        h = nn.DenseGeneral((2, 3), name="gen")(h)  # kernel (10, 2, 3)
        return nn.Dense(4, name="head")(h.reshape(h.shape[0], -1))


def _setup(targets=r"fc1|gen"):
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (5, 8))
    params = model.init(jax.random.key(1), x)
    lora = init_linen_lora(model, params, lp.LoraConfig(rank=2, alpha=4.0, targets=targets), jax.random.key(2), x)
    lora = {k: lp.LoraPair(v.a, jax.random.normal(jax.random.key(3), v.b.shape) * 0.3, v.scale) for k, v in lora.items()}
    return model, params, lora, x


def test_forward_matches_numpy_and_merge():
    model, params, lora, x = _setup()
    assert set(lora) == {"fc1", "gen"} and lora["gen"].b.shape == (2, 2, 3)
    y = np.asarray(apply_linen_lora(model, params, lora, x))
    P = jax.tree.map(np.asarray, params)["params"]
    xn = np.asarray(x)
    a, b = np.asarray(lora["fc1"].a), np.asarray(lora["fc1"].b)
    h = np.tanh(xn @ P["fc1"]["kernel"] + P["fc1"]["bias"] + 2.0 * (xn @ a) @ b)
    a, b = np.asarray(lora["gen"].a), np.asarray(lora["gen"].b)
    h = np.einsum("bi,ijk->bjk", h, P["gen"]["kernel"]) + P["gen"]["bias"] + 2.0 * np.einsum("br,rjk->bjk", h @ a, b)
    want = h.reshape(5, -1) @ P["head"]["kernel"] + P["head"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    merged = merge_linen_lora(params, lora)
    np.testing.assert_allclose(np.asarray(model.apply(merged, x)), y, atol=1e-5)
    # merging does not modify the original params
    np.testing.assert_array_equal(np.asarray(params["params"]["fc1"]["kernel"]), P["fc1"]["kernel"])


def test_lora_pro_trains_linen_adapters():
    model, params, lora, x = _setup()
    target = jax.random.normal(jax.random.key(9), (5, 4))
    loss = lambda l: jnp.mean((apply_linen_lora(model, params, l, x) - target) ** 2)
    tx = lp.lora_pro_adamw(1e-2)
    st = tx.init(lora)

    @jax.jit
    def step(l, st):
        v, g = jax.value_and_grad(loss)(l)
        u, st = tx.update(g, st, l)
        return optax.apply_updates(l, u), st, v

    l0 = float(loss(lora))
    for _ in range(30):
        lora, st, v = step(lora, st)
    assert float(loss(lora)) < l0


def test_errors():
    model, params, lora, x = _setup()
    with pytest.raises(ValueError, match=r"match no Dense/DenseGeneral.*fc1"):
        init_linen_lora(model, params, lp.LoraConfig(rank=2, targets="nothing"), jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"rank 9 for 'head' exceeds"):
        init_linen_lora(model, params, lp.LoraConfig(rank=9, targets="head"), jax.random.key(0), x)
    bad = dict(lora, ghost=lora["fc1"])
    with pytest.raises(ValueError, match="ghost"):
        apply_linen_lora(model, params, bad, x)
