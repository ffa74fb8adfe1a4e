"""Trains the installed all-MiniLM-L6-v2 (LoRA r = 8 on query/value) with several optimizers, one after another.

Run as a subprocess (the caller sets a timeout: a LAPACK deadlock on XLA:CPU leaves the process asleep for
ever). One model load is shared by every method; each method starts from the same fresh LoRA init. Prints one
JSON line per method: ``{"method", "losses", "step_s": [per-step wall seconds, compile step excluded]}``.

Usage: ``python _minilm_forms_worker.py --steps 20 --batch 4 --seq 32 lora lean full efficient sgd``
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.models import load_pretrained, minilm_path

LR = 1e-3


def make_tx(method: str) -> optax.GradientTransformation:
    if method == "lora":
        return optax.adamw(LR)
    if method == "sgd":
        return lp.lora_pro_sgd(LR)
    return lp.lora_pro_adamw(LR, form=method)


def train(base_state, graphdef, method: str, steps: int, ids, mask, target) -> dict:
    model = nnx.merge(graphdef, base_state)
    lp.apply_lora(model, lp.LoraConfig(rank=8, alpha=16.0, targets=lp.models.DEFAULT_LORA_TARGETS["bert"]),
                  rngs=nnx.Rngs(0))
    opt = lp.LoraOptimizer(model, make_tx(method), wrt=lp.LoRAParam)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            h = m(ids, mask, deterministic=True).last_hidden_state
            return jnp.mean((h[:, 0] - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lp.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses, times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(model, opt)
        losses.append(float(jax.block_until_ready(loss)))
        if i:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return {"method": method, "losses": losses, "step_s": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    base = load_pretrained("BertModel", minilm_path())
    graphdef, state = nnx.split(base)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq), 1000, 20000)
    mask = jnp.ones_like(ids)
    target = jax.random.normal(jax.random.fold_in(key, 1), (args.batch, 384))
    for method in args.methods:
        print(json.dumps(train(state, graphdef, method, args.steps, ids, mask, target)), flush=True)


if __name__ == "__main__":
    main()
