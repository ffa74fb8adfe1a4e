"""LoraOptimizer: nnx training with optimizers whose state holds LoraPair values, vs a functional optax loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(8, 2, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc(x)))


def _model():
    m = Net(nnx.Rngs(0))
    return lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["fc"], param_dtype="float64"), rngs=nnx.Rngs(1))


TXS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "lora_pro_efficient": lambda: lp.lora_pro_adamw(1e-2, form="efficient"),
    "lora_pro_lean": lambda: lp.lora_pro_adamw(1e-2, form="lean"),
    "lora_pro_full": lambda: lp.lora_pro_adamw(1e-2, form="full"),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_matches_functional_optax_loop_over_steps(x64, name):
    # float64: LoRA-Pro near B = 0 (ĝ_A ≈ B⁺ g / s, then Adam's per-entry normalisation) turns fp32
    # rounding differences between two differently fused programs into ~1e-4 parameter differences.
    x = jax.random.normal(jax.random.key(2), (16, 6), jnp.float64)
    y = jax.random.normal(jax.random.key(3), (16, 2), jnp.float64)
    wrt = nnx.Any(lp.LoRAParam, nnx.PathContains("head"))

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    # nnx path
    model = _model()
    opt = lp.LoraOptimizer(model, TXS[name](), wrt=wrt)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, g)
        return loss

    # functional path on the same initial values
    ref = _model()
    graphdef, params, rest = nnx.split(ref, wrt, ...)
    pure = nnx.as_pure(params)
    tx = TXS[name]()
    st = tx.init(pure)

    def f_loss(p):
        return loss_fn(nnx.merge(graphdef, p, rest))

    @jax.jit
    def f_step(p, st):
        loss, g = jax.value_and_grad(f_loss)(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, loss

    for _ in range(4):
        l1 = step(model, opt)
        pure, st, l2 = f_step(pure, st)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-10)
    got = nnx.as_pure(nnx.state(model, wrt))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(pure)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-10)
    assert int(opt.step[...]) == 4
