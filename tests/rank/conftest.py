"""Shared toy model and an independent NumPy forward pass for the rank-allocation tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorapro_jax import lora_layers


class ToyMLP(nnx.Module):
    """``layers.{i}``: nnx.Linear layers with tanh between them (HF-like paths for PRILoRA's layer regex)."""

    def __init__(self, dims, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(dims[:-1], dims[1:])])

    def __call__(self, x):
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = jnp.tanh(x)
        return x


def np_forward(model, x, *, a=None, gate=None, a_mask=None):
    """NumPy forward of a ToyMLP with LoRA layers: ``x W + bias + s ((x (a * a_mask)) * gate) b`` per layer.

    ``a`` / ``gate`` / ``a_mask`` optionally override the model's values ``{path: array}`` (e.g. with a
    reference mask computed independently). Float64 throughout.
    """
    layers = lora_layers(model)
    a, gate, a_mask = a or {}, gate or {}, a_mask or {}
    h = np.asarray(x, np.float64)
    for k, (path, layer) in enumerate(layers.items()):
        w = np.asarray(layer.base.kernel[...], np.float64)
        bias = np.asarray(layer.base.bias[...], np.float64)
        pair = layer.pair
        aa = np.asarray(a.get(path, pair.a), np.float64)
        mm = a_mask.get(path, None if layer.a_mask is None else layer.a_mask[...])
        if mm is not None:
            aa = aa * np.asarray(mm, np.float64)
        g = np.asarray(gate.get(path, layer.gate[...]), np.float64)
        h = h @ w + bias + pair.scale * ((h @ aa) * g) @ np.asarray(pair.b, np.float64)
        if k < len(layers) - 1:
            h = np.tanh(h)
    return h


@nnx.jit(static_argnames="std")
def randomize_b(model, key, std=0.3):
    """Non-zero B on the active slots (B = 0 at init would hide every bug in A)."""
    for i, layer in enumerate(lora_layers(model).values()):
        p = layer.pair
        b = jax.random.normal(jax.random.fold_in(key, i), p.b.shape, p.b.dtype) * std
        b = b * (layer.gate[...] != 0)[:, None]
        layer.lora.set_value(type(p)(p.a, b, p.scale))


@nnx.jit
def forward(model, x):
    """The model's forward pass, jitted (one compile per model instead of one per eager op and shape)."""
    return model(x)


@pytest.fixture
def toy():
    class NS:
        pass

    ns = NS()
    ns.ToyMLP, ns.np_forward, ns.randomize_b, ns.forward = ToyMLP, np_forward, randomize_b, forward
    return ns
