"""Runs on 8 simulated CPU devices (started by test_mesh.py with XLA_FLAGS set); prints one JSON line.

Everything the tests assert on is measured here; the expectations live in test_mesh.py.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import lorapro_jax as lp
from experiments.sharded_train import (
    TinyTransformer,
    classification_loss,
    synthetic_batches,
)
from lorapro_jax import sharding as sh
from lorapro_jax.parallel import make_train_step, shard_for_training

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(?:f16|bf16|f32|f64|s32|u32|s64|u64|pred)\[([0-9,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[list[int]]]]:
    """``[(op, [output shapes])]`` for every collective instruction of a compiled HLO module."""
    out = []
    for line in hlo.splitlines():
        m = _OP.search(line)
        if m:
            shapes = [[int(d) for d in s.split(",") if d] for s in _SHAPE.findall(m.group(1))]
            out.append((m.group(2), shapes))
    return out


def all_shapes(hlo: str) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(hlo)}


def relerr(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


def full_spec(x) -> list:
    """The spec of ``x``'s type (explicit axes) or of its concrete sharding, padded to its rank."""
    spec = jax.typeof(x).sharding.spec
    if all(e is None for e in spec) and hasattr(x, "sharding"):
        spec = x.sharding.spec
    entries = list(spec) + [None] * (x.ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def pair_specs_report(state) -> dict:
    """``{layer: {"a": spec, "b": spec, "mu": spec, "nu": spec}}`` of a TrainState."""
    adam = state.opt_state[0]
    rep = {}
    for kp, pair in jax.tree_util.tree_flatten_with_path(state.lora, is_leaf=lp.is_lora_pair)[0]:
        path = sh.path_str(kp)
        rep[path] = {"a": full_spec(pair.a), "b": full_spec(pair.b)}
    for name in ("mu", "nu"):
        for kp, x in jax.tree_util.tree_flatten_with_path(getattr(adam, name))[0]:
            rep[sh.path_str(kp)][name] = full_spec(x)
            rep[sh.path_str(kp)][name + "_shape"] = list(x.shape)
    return rep


D, FF, HEADS, SEQ, VOCAB, CLASSES, BATCH, RANK = 24, 40, 4, 8, 64, 4, 8, 4


def tiny(dtype):
    m = TinyTransformer(VOCAB, SEQ, D, HEADS, FF, 1, CLASSES, param_dtype=dtype, rngs=nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=RANK, alpha=8.0, targets=r".*\.(query|key|value|out|fc1|fc2)",
                                   param_dtype=jnp.dtype(dtype).name), rngs=nnx.Rngs(1))
    return m


def rules(fsdp):
    return sh.tensor_parallel_rules(column=("query", "key", "value", "fc1"), row=("out", "fc2"), fsdp_axis=fsdp)


def single_device_run(tx, batches, dtype):
    g, lora, frozen = nnx.split(tiny(dtype), lp.LoRAParam, ...)
    lora, frozen = nnx.as_pure(lora), nnx.as_pure(frozen)
    opt = tx.init(lora)
    dev = jax.devices()[0]

    @jax.jit
    def step(lora, opt, batch):
        loss, grads = jax.value_and_grad(lambda p: classification_loss(nnx.merge(g, p, frozen), batch))(lora)
        upd, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, upd), opt, loss

    lora, opt = jax.device_put((lora, opt), dev)
    losses = []
    for b in batches:
        lora, opt, loss = step(lora, opt, jax.device_put(b, dev))
        losses.append(float(loss))
    return lora, opt, losses


def sharded_run(tx, batches, dtype, axis_types, fsdp):
    mesh = sh.make_mesh(data=2, model=4, axis_types=axis_types)
    graphdef, state, specs = shard_for_training(tiny(dtype), tx, mesh, rules(fsdp))
    step = make_train_step(graphdef, classification_loss, tx, mesh, specs, donate=False)
    bsh = sh.named_shardings(sh.batch_spec(1), mesh)
    specs_per_step = [pair_specs_report(state)]
    losses = []
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, jax.device_put(batches[0], bsh)).compile()  # = what step() runs
        for b in batches:
            state, loss = compiled(state, jax.device_put(b, bsh))
            losses.append(float(loss))
            specs_per_step.append(pair_specs_report(state))
    return state, losses, specs_per_step, compiled.as_text()


def compare(state, ref_lora, ref_opt):
    return {
        "lora": max(jax.tree.leaves(jax.tree.map(relerr, state.lora, ref_lora))),
        "mu": max(jax.tree.leaves(jax.tree.map(relerr, state.opt_state[0].mu, ref_opt[0].mu))),
        "nu": max(jax.tree.leaves(jax.tree.map(relerr, state.opt_state[0].nu, ref_opt[0].nu))),
    }


def transformer_checks(out):
    tx = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full", on_nonfinite="ignore")
    batches = synthetic_batches(3, BATCH, SEQ, VOCAB, CLASSES, seed=3)
    ref_lora, ref_opt, ref_losses = single_device_run(tx, batches, jnp.float32)
    out["ref_losses"] = ref_losses
    out["kernel_shapes"] = [[D, D], [D, FF], [FF, D]]
    for name, axis_types, fsdp in (("explicit_tp", "explicit", None), ("auto_fsdp_tp", "auto", "data")):
        state, losses, specs, hlo = sharded_run(tx, batches, jnp.float32, axis_types, fsdp)
        out[name] = {"losses": losses, "err": compare(state, ref_lora, ref_opt), "specs": specs,
                     "collectives": collectives(hlo)}
    with jax.enable_x64(True):
        ref_lora, ref_opt, _ = single_device_run(tx, batches, jnp.float64)
        state, _, specs, _ = sharded_run(tx, batches, jnp.float64, "explicit", "data")
        out["x64_explicit_fsdp_tp"] = {"err": compare(state, ref_lora, ref_opt),
                                       "dtype": str(state.opt_state[0].mu["layers"][0]["fc1"]["lora"].dtype)}


class TwoLayer(nnx.Module):
    def __init__(self, n, m, rngs):
        self.col = nnx.Linear(n, m, rngs=rngs)
        self.row = nnx.Linear(m, n, rngs=rngs)
        self.gen = nnx.LinearGeneral(n, (4, m // 4), rngs=rngs)  # (n, heads, head_dim), heads over "model"


def optimizer_checks(out):
    """The LoRA-Pro full-form update alone, on (data=2, model=4), kernels 64 x 96, 96 x 64, 64 x (4, 24), r = 4."""
    n, m, r = 64, 96, 4
    out["update_dims"] = {"n": n, "m": m, "r": r}
    tx = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full", on_nonfinite="ignore")
    model = TwoLayer(n, m, nnx.Rngs(0))
    lp.apply_lora(model, lp.LoraConfig(rank=r, alpha=8.0, targets=["col", "row", "gen"]), rngs=nnx.Rngs(1))
    key = jax.random.key(5)
    for i, layer in enumerate(lp.lora_layers(model).values()):  # B != 0: the general case
        p = layer.pair
        layer.lora.set_value(lp.LoraPair(p.a, 0.1 * jax.random.normal(jax.random.fold_in(key, i), p.b.shape), p.scale))
    rule_set = sh.tensor_parallel_rules(column=("col",), row=("row",), fsdp_axis="data")
    rule_set.append((r"gen\.kernel", sh.P("data", "model", None)))
    lspecs = nnx.as_pure(sh.lora_partition_specs(model, rule_set, wrt=lp.LoRAParam))
    params = nnx.as_pure(lp.lora_state(model))
    grads = [jax.tree.map(lambda x, k=k: jax.random.normal(jax.random.fold_in(key, 100 + k), x.shape), params)
             for k in range(3)]

    # single-device reference: three updates
    ref_state, ref_upds, p_ref = tx.init(params), [], params
    upd_fn = jax.jit(tx.update)
    for g in grads:
        u, ref_state = upd_fn(g, ref_state, p_ref)
        ref_upds.append(u)
        p_ref = optax.apply_updates(p_ref, u)

    res = {}
    for axis_types in ("explicit", "auto"):
        mesh = sh.make_mesh(data=2, model=4, axis_types=axis_types)
        stx = sh.shard_optimizer(tx, lspecs, mesh)
        with jax.set_mesh(mesh):
            p = sh.shard_tree(params, mesh, lspecs)
            state = stx.init(p)  # eager: one jit with out_shardings
            mu_spec_init = full_spec(state[0].mu["col"]["lora"])
            gsh = [sh.shard_tree(g, mesh, lspecs) for g in grads]
            f = jax.jit(stx.update).lower(gsh[0], state, p).compile()
            hlo = f.as_text()
            errs = []
            for g, ref_u in zip(gsh, ref_upds):
                u, state = f(g, state, p)
                p = jax.jit(optax.apply_updates)(p, u)
                errs.append(max(jax.tree.leaves(jax.tree.map(relerr, u, ref_u))))
        res[axis_types] = {
            "update_err": errs,
            "state_err": {k: max(jax.tree.leaves(jax.tree.map(relerr, getattr(state[0], k), getattr(ref_state[0], k))))
                          for k in ("mu", "nu")},
            "mu_spec_init": mu_spec_init,
            "specs_after": {lay: {"a": full_spec(p[lay]["lora"].a), "b": full_spec(p[lay]["lora"].b),
                                  "mu": full_spec(state[0].mu[lay]["lora"]), "nu": full_spec(state[0].nu[lay]["lora"])}
                            for lay in ("col", "row", "gen")},
            "collectives": collectives(hlo),
            "all_shapes": sorted(all_shapes(hlo)),
        }
    out["update"] = res

    # nnx.Optimizer with the sharded wrapper on an Explicit mesh.
    mesh = sh.make_mesh(data=2, model=4)
    with jax.set_mesh(mesh):
        model2 = TwoLayer(n, m, nnx.Rngs(0))
        lp.apply_lora(model2, lp.LoraConfig(rank=r, alpha=8.0, targets=["col", "row"]), rngs=nnx.Rngs(1))
        sh.shard_model(model2, mesh, rules=rule_set)
        opt = nnx.Optimizer(model2, sh.shard_optimizer(tx, sh.lora_partition_specs(model2, rule_set, wrt=lp.LoRAParam)),
                            wrt=lp.LoRAParam)
        before = full_spec(opt.opt_state[0].mu["col"]["lora"][...])
        g_state = jax.tree.map(lambda x: jnp.ones_like(x) * 0.01, nnx.state(model2, lp.LoRAParam))

        @nnx.jit
        def upd(opt, model, g):
            opt.update(model, g)

        upd(opt, model2, g_state)
        out["nnx_optimizer"] = {
            "mu_before": before,
            "mu_after": full_spec(opt.opt_state[0].mu["col"]["lora"][...]),
            "nu_after": full_spec(opt.opt_state[0].nu["row"]["lora"][...]),
            "a_after": full_spec(model2.col.lora.get_value().a),
            "b_after": full_spec(model2.col.lora.get_value().b),
            "kernel": full_spec(model2.col.base.kernel[...]),
        }


def main():
    out = {"devices": jax.device_count()}
    what = sys.argv[1:] or ["transformer", "optimizer"]
    if "transformer" in what:
        transformer_checks(out)
    if "optimizer" in what:
        optimizer_checks(out)
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
