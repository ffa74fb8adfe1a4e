"""ALoRA on a tiny residual MLP: AB-LoRA ablation importance moves the rank budget where it is needed.

Task: the teacher changes the hidden layers of the frozen base by random low-rank deltas of very uneven
ranks (0, 0, 5, 1, 5, 1; 12 in total); the student regresses the teacher's outputs. Uniform LoRA uses rank
2 in each of the 6 layers (budget 12). ALoRA starts from the same rank-2 LoRA, allocated at 6 slots per
layer with 4 gated off, and every 40 steps prunes the 2 least important (or harmful) slots by validation
ablation and re-enables 2 slots in the modules whose slots all survived, keeping the budget at 12.
Trained with LoRA-Pro AdamW. Runs in seconds on CPU:

    python experiments/examples/alora_example.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.rank import active_budget, active_ranks, alora_schedule, alora_step, apply_alora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prilora_example import TARGETS, Net, make_data, train  # noqa: E402  (the shared toy model and loop)

TEACHER_RANKS = [0, 0, 5, 1, 5, 1]


def _slots(slots):
    """``[("layers.2.dense", 3), ...]`` -> ``["L2:3", ...]``."""
    return [f"L{path.split('.')[1]}:{i}" for path, i in slots]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    t0 = time.time()
    (x, y), val = make_data(TEACHER_RANKS)
    data = ((x[:-256], y[:-256]), val)  # train on 768 examples; report MSE on the 256 validation examples
    dev = (x[-256:], y[-256:])  # AB-LoRA scores on a held-out dev split (not trained on, not reported)

    lora = Net(rngs=nnx.Rngs(0))
    lp.apply_lora(lora, lp.LoraConfig(rank=2, alpha=4.0, targets=TARGETS), rngs=nnx.Rngs(1))
    print(f"uniform LoRA r=2 (budget 12)        val MSE  {train(lora, data, steps=args.steps, lr=args.lr):.4f}")

    model = Net(rngs=nnx.Rngs(0))
    apply_alora(model, lp.LoraConfig(rank=2, alpha=4.0, targets=TARGETS), max_rank=6, rngs=nnx.Rngs(1))
    budget = active_budget(model)

    def neg_mse(model, batch):  # the validation score: higher is better
        xb, yb = batch
        return -jnp.mean((model(xb) - yb) ** 2)

    def on_step(step, model):
        n = alora_schedule(step, start=40, end=int(0.75 * args.steps), every=40, n_prune=2)
        if n:
            info = alora_step(model, neg_mse, dev, n_prune=n, key=jax.random.key(step))
            assert info.budget == budget
            print(f"  step {step:3d}: pruned {_slots(info.realloc.pruned)} grew {_slots(info.realloc.grown)} "
                  f"-> ranks {list(active_ranks(model).values())}")

    mse = train(model, data, steps=args.steps, lr=args.lr, on_step=on_step)
    print(f"ALoRA (budget {active_budget(model)})                 val MSE  {mse:.4f}")
    print(f"final ranks {list(active_ranks(model).values())}   teacher's delta ranks {TEACHER_RANKS}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
