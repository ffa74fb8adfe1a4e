"""A scan-over-layers Llama with LoRA-Pro (full form) on 8 simulated CPU devices; prints one JSON line.

Started by test_scan_llama_mesh.py with XLA_FLAGS set. The same 3 training steps run on one device and
on a (data=2, model=4) mesh (FSDP over "data", tensor parallel over "model"; the stacked layer axis
replicated); the test compares the factors and moments and inspects the compiled step's collectives.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "models"))

import lorapro_jax as lp  # noqa: E402
from _mesh_worker import collectives, full_spec, relerr  # noqa: E402
from experiments.sharded_train import train_single_device  # noqa: E402
from hf_tiny import tiny_llama_config  # noqa: E402
from lorapro_jax import sharding as sh  # noqa: E402
from lorapro_jax.models import DEFAULT_LORA_TARGETS, LlamaForCausalLM  # noqa: E402
from lorapro_jax.parallel import make_train_step, shard_for_training  # noqa: E402

RANK, BATCH, SEQ, STEPS = 4, 8, 8, 3
COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
ROW = r"(o_proj|down_proj)"


def rules():
    """Stacked kernels (layers, in, out): layer axis replicated, Megatron column/row split + FSDP."""
    return [
        (rf".*\.{COLUMN}\.kernel", sh.P(None, "data", "model")),
        (rf".*\.{ROW}\.kernel", sh.P(None, "model", "data")),
    ]


def model(dtype):
    cfg = tiny_llama_config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    m = LlamaForCausalLM(cfg, scan_layers=True, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=RANK, alpha=8.0, targets=DEFAULT_LORA_TARGETS["llama"],
                                   param_dtype=jnp.dtype(dtype).name), rngs=nnx.Rngs(1))
    key = jax.random.key(3)
    for i, layer in enumerate(lp.lora_layers(m).values()):  # B != 0: the general case
        p = layer.pair
        layer.lora.set_value(p.replace(b=0.1 * jax.random.normal(jax.random.fold_in(key, i), p.b.shape, dtype)))
    return m


def loss_fn(m, batch):
    ids = batch["input_ids"]
    return optax.softmax_cross_entropy_with_integer_labels(m(ids)[:, :-1], ids[:, 1:]).mean()


def batches(vocab):
    rng = np.random.default_rng(5)
    return [{"input_ids": jnp.asarray(rng.integers(1, vocab, (BATCH, SEQ)), jnp.int32)} for _ in range(STEPS)]


def single_device(tx, data, dtype):
    return train_single_device(model(dtype), loss_fn, tx, data)


def sharded(tx, data, dtype):
    mesh = sh.make_mesh(data=2, model=4, axis_types="explicit")
    graphdef, state, specs = shard_for_training(model(dtype), tx, mesh, rules())
    step = make_train_step(graphdef, loss_fn, tx, mesh, specs, donate=False)
    bsh = sh.named_shardings({"input_ids": sh.batch_spec(2)}, mesh)
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, jax.device_put(data[0], bsh)).compile()
        for b in data:
            state, _ = compiled(state, jax.device_put(b, bsh))
    return state, compiled.as_text()


def pair_specs(lora) -> dict:
    out = {}
    for kp, pair in jax.tree_util.tree_flatten_with_path(lora, is_leaf=lp.is_lora_pair)[0]:
        if lp.is_lora_pair(pair):
            out[sh.path_str(kp)] = {"a": full_spec(pair.a), "b": full_spec(pair.b),
                                    "a_shape": list(pair.a.shape), "b_shape": list(pair.b.shape)}
    return out


def main():
    tx = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full")
    out = {"devices": jax.device_count()}
    for name, dtype in (("fp32", jnp.float32), ("f64", jnp.float64)):
        with jax.enable_x64(dtype == jnp.float64):
            data = batches(53)
            ref_lora, ref_opt = single_device(tx, data, dtype)
            state, hlo = sharded(tx, data, dtype)
            err = {"lora": max(jax.tree.leaves(jax.tree.map(relerr, state.lora, ref_lora))),
                   "opt": max(jax.tree.leaves(jax.tree.map(relerr, state.opt_state, ref_opt)))}
            out[name] = {"err": err}
            if name == "fp32":
                out["collectives"] = collectives(hlo)
                out["specs"] = pair_specs(state.lora)
                kernels = set()
                for kp, x in jax.tree_util.tree_flatten_with_path(state.frozen)[0]:
                    if sh.path_str(kp).endswith("kernel") and "layers" in sh.path_str(kp):
                        kernels.add(tuple(x.shape))
                out["kernel_shapes"] = sorted(kernels)
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
