"""One process of the 2-process test (test_multiprocess.py), or the single-process reference.

usage: _mp_worker.py worker <process_id> <num_processes> <port> <out.npz>
       _mp_worker.py single <out.npz>

Both modes run the same computation on the same global data:
  * 3 LoRA-Pro (AdamW, full form) steps of a tiny transformer on a global batch of 8;
    the workers use a ("data"=2, "model"=2) mesh over 2 processes x 2 CPU devices, each process feeding
    only its half of every batch; the reference uses one device and the whole batch;
  * the LoRA-GA full-gradient estimate (mean over 2 batches of dL/dW0 of every adapted kernel).
Results (gathered to every process) are written to <out.npz>.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

MODE = sys.argv[1]
if MODE == "worker":
    from lorapro_jax.parallel import distributed

    distributed.initialize(
        f"127.0.0.1:{int(sys.argv[4])}",
        num_processes=int(sys.argv[3]),
        process_id=int(sys.argv[2]),
        cpu_collectives="gloo",
        local_cpu_devices=2,
        initialization_timeout=60,
    )

import jax
import numpy as np
import optax
from flax import nnx

import lorapro_jax as lp
from experiments.sharded_train import (
    TinyTransformer,
    classification_loss,
    synthetic_batches,
)
from lorapro_jax import sharding as sh
from lorapro_jax.parallel import (
    global_batch,
    make_train_step,
    process_batch_slice,
    shard_for_training,
)

D, FF, HEADS, SEQ, VOCAB, CLASSES, BATCH, RANK = 16, 32, 2, 8, 64, 4, 8, 2
RULES = sh.tensor_parallel_rules(column=("query", "key", "value", "fc1"), row=("out", "fc2"))


def model():
    m = TinyTransformer(VOCAB, SEQ, D, HEADS, FF, 1, CLASSES, rngs=nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=RANK, alpha=4.0, targets=r".*\.(query|key|value|out|fc1|fc2)"),
                  rngs=nnx.Rngs(1))
    return m


def flat(tree) -> dict[str, np.ndarray]:
    return {sh.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main():
    tx = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full", on_nonfinite="ignore")
    batches = synthetic_batches(3, BATCH, SEQ, VOCAB, CLASSES, seed=11)  # identical in every process
    out: dict[str, np.ndarray] = {}
    if MODE == "worker":
        from jax.experimental import multihost_utils

        mesh = sh.make_mesh(data=2, model=2)
        rows = process_batch_slice(BATCH, mesh)
        graphdef, state, specs = shard_for_training(model(), tx, mesh, RULES)
        step = make_train_step(graphdef, classification_loss, tx, mesh, specs, donate=False)
        losses = []
        for b in batches:
            local = jax.tree.map(lambda x: x[rows], b)  # this process's half of the global batch
            state, loss = step(state, global_batch(local, mesh))
            losses.append(float(loss))
        gathered = multihost_utils.process_allgather((state.lora, state.opt_state[0].mu), tiled=True)
        out.update({f"lora/{k}": v for k, v in flat(gathered[0]).items()})
        out.update({f"mu/{k}": v for k, v in flat(gathered[1]).items()})
        out["losses"] = np.asarray(losses)
        out["rows"] = np.asarray([rows.start, rows.stop])
        out["process_count"] = np.asarray(jax.process_count())
        out["device_count"] = np.asarray(jax.device_count())
        mu0 = state.opt_state[0].mu["layers"][0]["fc1"]["lora"]
        out["mu_fc1_local_shard_shape"] = np.asarray(mu0.addressable_shards[0].data.shape)

        from lorapro_jax.init import estimate_full_gradients

        # estimate_full_gradients runs the model with plain jit: use Auto axes (an Explicit mesh would need
        # sharding-annotated model code, e.g. for the embedding gather).
        ga_mesh = sh.make_mesh(data=2, model=2, axis_types="auto")
        ga_batches = [global_batch(jax.tree.map(lambda x: x[rows], b), ga_mesh) for b in batches[:2]]
        grads = estimate_full_gradients(model(), classification_loss, ga_batches, mesh=ga_mesh, batch_axis="data")
        grads = multihost_utils.process_allgather(grads, tiled=True)
        out.update({f"ga/{k}": np.asarray(v) for k, v in grads.items()})
    else:
        g, lora, frozen = nnx.split(model(), lp.LoRAParam, ...)
        lora, frozen = nnx.as_pure(lora), nnx.as_pure(frozen)
        opt = tx.init(lora)

        @jax.jit
        def ref_step(lora, opt, batch):
            loss, grads = jax.value_and_grad(lambda p: classification_loss(nnx.merge(g, p, frozen), batch))(lora)
            upd, opt = tx.update(grads, opt, lora)
            return optax.apply_updates(lora, upd), opt, loss

        losses = []
        for b in batches:
            lora, opt, loss = ref_step(lora, opt, b)
            losses.append(float(loss))
        out.update({f"lora/{k}": v for k, v in flat(lora).items()})
        out.update({f"mu/{k}": v for k, v in flat(opt[0].mu).items()})
        out["losses"] = np.asarray(losses)

        from lorapro_jax.init import estimate_full_gradients

        grads = estimate_full_gradients(model(), classification_loss, batches[:2])
        out.update({f"ga/{k}": np.asarray(v) for k, v in grads.items()})
    np.savez(sys.argv[-1], **out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
    if MODE == "worker":
        jax.distributed.shutdown()
