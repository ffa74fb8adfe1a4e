"""8 simulated CPU devices: a scan-over-layers LoRA model sharded over a (layers=2, model=4) mesh.

Prints one line ``RESULT {json}``: max relative differences (sharded vs one device) of the forward and of
the LoRA params after 2 Adam steps, and the shardings the stacked pairs got.
"""

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _stacked_models import D, twins  # noqa: E402
from flax import nnx  # noqa: E402

import lorapro_jax as lp  # noqa: E402
from lorapro_jax import sharding as sh  # noqa: E402


def train(model, tx, steps, x, y):
    opt = lp.LoraOptimizer(model, tx, wrt=lp.LoRAParam)

    @nnx.jit
    def step(model, opt, x, y):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, lp.LoRAParam))(model)
        opt.update(model, g)
        return loss

    for _ in range(steps):
        step(model, opt, x, y)
    return model


def spec(x):
    """The array's PartitionSpec entries, padded with None to its rank (specs drop trailing Nones)."""
    s = list(x.sharding.spec)
    return s + [None] * (x.ndim - len(s))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main():
    x = jax.random.normal(jax.random.key(0), (8, D))
    y = jax.random.normal(jax.random.key(1), (8, D))
    ref, _ = twins(seed=0)
    y_ref = np.asarray(ref(x))
    ref = train(ref, optax.adam(1e-2), 2, x, y)

    mesh = jax.make_mesh((2, 4), ("layers", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model, _ = twins(seed=0)
    rules = sh.tensor_parallel_rules(column=("q",), row=()) + [(r".*\.g\.kernel", sh.P("layers", None, None, "model"))]
    specs = sh.lora_partition_specs(model, rules, stack_axis="layers")
    pspecs = sh.lora_partition_specs(model, rules, stack_axis="layers", wrt=lp.LoRAParam)
    with jax.set_mesh(mesh):
        sh.shard_model(model, mesh, specs)
        y_sh = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
        model = train(model, sh.shard_optimizer(optax.adam(1e-2), pspecs, mesh), 2, x, y)
    layers = lp.lora_layers(model)
    out = {
        "forward": rel(y_sh, y_ref),
        "params": max(rel(s, r) for s, r in zip(jax.tree_util.tree_leaves(nnx.state(model, lp.LoRAParam)),
                                                jax.tree_util.tree_leaves(nnx.state(ref, lp.LoRAParam)))),
        "q_a": spec(layers["layers.q"].pair.a),
        "q_b": spec(layers["layers.q"].pair.b),
        "q_kernel": spec(layers["layers.q"].base.kernel[...]),
        "g_b": spec(layers["layers.g"].pair.b),
        "g_gate": spec(layers["layers.g"].gate[...]),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
