"""A scan-over-layers toy model (blocks made with nnx.vmap, run with nnx.scan) and its unrolled twin.

Shared by the stacked-LoRA tests: the twin holds the same weights in separate layers, so every stacked
consumer can be checked against the same consumer run on ordinary (unstacked) layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lorapro_jax import LoraConfig, LoraPair, apply_lora, lora_layers

L, D = 4, 16
TARGETS = ("q", "g", "e")


class Block(nnx.Module):
    """q: Linear (16 -> 16); g: LinearGeneral (16 -> (2, 8)); e: Einsum with a batch letter h."""

    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.Linear(D, D, rngs=rngs)
        self.g = nnx.LinearGeneral(D, (2, D // 2), rngs=rngs)
        self.e = nnx.Einsum("bhd,hdk->bhk", (2, D // 2, D // 2), rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(x + self.q(x))
        x = jnp.tanh(x + self.g(x).reshape(x.shape))
        return x + self.e(x.reshape(x.shape[0], 2, D // 2)).reshape(x.shape)


class Scanned(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.layers)


class Unrolled(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([Block(rngs) for _ in range(L)])

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x


def copy_slices(scanned: Scanned, unrolled: Unrolled) -> None:
    """Copies slice ``i`` of every array of ``scanned.layers`` into ``unrolled.layers[i]``."""
    stacked = jax.tree_util.tree_leaves(nnx.state(scanned.layers))
    for i, block in enumerate(unrolled.layers):
        st = nnx.state(block)
        leaves, treedef = jax.tree_util.tree_flatten(st)
        assert len(leaves) == len(stacked)
        new = [jnp.asarray(s[i], l.dtype) for s, l in zip(stacked, leaves)]
        nnx.update(block, jax.tree_util.tree_unflatten(treedef, new))


def randomize_adapters(model: nnx.Module, seed: int = 0) -> None:
    """Non-zero B, random gates and masks, so that every part of the branch shows in the output."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        p = layer.pair
        layer.lora.set_value(p.replace(b=jnp.asarray(rng.normal(size=p.b.shape) * 0.3, p.b.dtype)))
        layer.gate[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=layer.gate[...].shape), jnp.float32)
        if layer.a_mask is not None:
            layer.a_mask[...] = jnp.asarray(rng.uniform(size=p.a.shape) > 0.3, jnp.float32)


def twins(rank: int = 2, seed: int = 0, targets=TARGETS, **config) -> tuple[Scanned, Unrolled]:
    """A LoRA-adapted scanned model with random adapters and its unrolled twin holding the same numbers."""
    cfg = LoraConfig(rank=rank, alpha=4.0, targets=targets, **config)
    scanned = apply_lora(Scanned(nnx.Rngs(seed)), cfg, rngs=nnx.Rngs(seed + 1))
    randomize_adapters(scanned, seed)
    unrolled = apply_lora(Unrolled(nnx.Rngs(seed + 7)), cfg, rngs=nnx.Rngs(seed + 8))
    copy_slices(scanned, unrolled)
    return scanned, unrolled


def slice_pair(pair: LoraPair, i: int) -> LoraPair:
    return LoraPair(pair.a[i], pair.b[i], pair.scale)
