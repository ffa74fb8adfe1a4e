"""Runs the alias harness's cases on 8 simulated CPU devices with an explicit-axes mesh; prints one JSON line.

Started by test_alias_harness.py (XLA_FLAGS gives 8 host devices). For every case: the types (shape, dtype,
sharding in the type) and concrete shardings of the optimizer state after ``init``, after a jitted ``update``
and after an eager ``update`` must agree, and so must the updates with the gradients. Any difference or
exception is reported per case; the test asserts there is none.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import lorapro_jax as lp  # noqa: E402
from lorapro_jax import sharding as sh  # noqa: E402
from test_alias_harness import CASES, _make, _tree  # noqa: E402


def _specs(kind):
    # A column-parallel layer: the base kernel (in, out) is P(None, "model"), so a (in, r) is replicated and
    # b (r, out) follows the kernel's out axis; the bias and the head's input axis are sharded too.
    rest = {"bias": P("model"), "head": P("model", None)}
    if kind == "pairs":
        return {"lin": {"lora": lp.LoraPair(P(), P(None, "model"), 2.0)}, **rest}
    return {"lin": {"lora_a": P(), "lora_b": P(None, "model")}, **rest}


def _type(x):
    spec = tuple(x.sharding.spec) if hasattr(x, "sharding") else ()
    spec = spec + (None,) * (x.ndim - len(spec))
    return f"{jax.typeof(x)} {spec}"


def _diff(name_a, a, name_b, b):
    ta, tb = jax.tree.map(_type, a), jax.tree.map(_type, b)
    if jax.tree.structure(ta) != jax.tree.structure(tb):
        return [f"{name_a} vs {name_b}: tree structures differ"]
    out = []
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ta)[0], jax.tree.leaves(tb)):
        if x != y:
            out.append(f"{name_a} vs {name_b} at {jax.tree_util.keystr(path)}: {x} != {y}")
    return out


def check(name, mesh):
    tx, kind = _make(name)
    specs = _specs(kind)
    put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)
    params, grads = put(_tree(kind, 0, jnp.float32)), put(_tree(kind, 1, jnp.float32))
    s0 = tx.init(params)
    s0j = jax.jit(tx.init)(params)
    u1, s1 = jax.jit(tx.update)(grads, s0, params)
    u2, s2 = tx.update(grads, s0, params)
    u3, s3 = jax.jit(tx.update)(grads, s1, params)
    problems = (_diff("init", s0, "jit(init)", s0j) + _diff("init", s0, "jit(update)", s1)
                + _diff("jit(update)", s1, "update", s2) + _diff("jit(update)", s1, "2nd jit(update)", s3)
                + _diff("grads", grads, "jit(update) updates", u1) + _diff("jit updates", u1, "eager updates", u2))
    return problems


def main():
    mesh = sh.make_mesh(data=2, model=4)  # Explicit axes (jax.make_mesh's default)
    out = {"devices": jax.device_count(), "axis_types": str(mesh.axis_types), "cases": {}}
    with jax.set_mesh(mesh):
        for name in sorted(CASES):
            try:
                out["cases"][name] = check(name, mesh)
            except Exception as e:  # reported, not hidden: the test fails on any entry
                out["cases"][name] = [f"error: {type(e).__name__}: {str(e)[:1500]}",
                                      traceback.format_exc()[-1500:]]
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
