"""Shared pieces of the interop tests: a small NNX net, its native LoRA twin and a reference training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lp

RANK, ALPHA = 2, 3.0
X = jax.random.normal(jax.random.key(2), (16, 6), jnp.float32)
Y = jax.random.normal(jax.random.key(3), (16, 3), jnp.float32)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(6, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc(x)))


def factors(seed: int = 7) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Non-zero A and B per layer (Flax layout), the same for every implementation under test."""
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "fc": (0.4 * jax.random.normal(k[0], (6, RANK)), 0.3 * jax.random.normal(k[1], (RANK, 8))),
        "head": (0.4 * jax.random.normal(k[2], (8, RANK)), 0.3 * jax.random.normal(k[3], (RANK, 3))),
    }


def native_model(alpha: float = ALPHA, targets=("fc", "head")) -> nnx.Module:
    """``Net`` adapted by our ``apply_lora``, with the factors of :func:`factors`."""
    model = lp.apply_lora(Net(nnx.Rngs(0)), lp.LoraConfig(rank=RANK, alpha=alpha, targets=list(targets)), rngs=nnx.Rngs(1))
    for name, layer in lp.lora_layers(model).items():
        a, b = factors()[name]
        layer.lora.set_value(layer.lora.get_value().replace(a=a, b=b))
    return model


def loss_fn(model):
    return jnp.mean((model(X) - Y) ** 2)


def train_native(model, tx, steps: int = 5, wrt=lp.LoRAParam) -> list[float]:
    """A functional optax loop on the native model's ``wrt`` state (the reference path)."""
    graphdef, params, rest = nnx.split(model, wrt, ...)
    params = nnx.as_pure(params)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    nnx.update(model, params)
    return losses


def train_nnx_optimizer(model, tx, steps: int = 5, wrt=nnx.LoRAParam) -> tuple[list[float], nnx.Optimizer]:
    """The same loop through ``nnx.Optimizer(model, tx, wrt=wrt)`` under ``nnx.jit``."""
    opt = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(m)
        o.update(m, g)
        return loss

    return [float(step(model, opt)) for _ in range(steps)], opt


def native_factors(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: (np.asarray(l.lora.get_value().a), np.asarray(l.lora.get_value().b)) for k, l in lp.lora_layers(model).items()}


TXS = {
    "lora_pro_sgd": lambda: lp.lora_pro_sgd(0.05),
    "full": lambda: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full"),
    "efficient": lambda: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="efficient"),
    "lean": lambda: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="lean"),
    "lora_plus": lambda: lp.lora_plus_adamw(1e-2, ratio=4.0),
}
