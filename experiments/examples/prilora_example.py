"""PRILoRA on a tiny residual MLP: linearly increasing ranks (static shapes) + pruning of A.

Task (synthetic but learnable): a "teacher" equals the frozen base model plus low-rank changes of its
hidden layers, with deeper layers changed more (ranks 1 → 6). The student adapts the base with LoRA and
regresses the teacher's outputs. Uniform LoRA (rank 4 everywhere) and PRILoRA (ranks 2 → 6, the same
budget; A pruned to 50 % sparsity per row during training) are trained with LoRA-Pro AdamW for the same
number of steps. Runs in seconds on CPU:

    python experiments/examples/prilora_example.py
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.rank import (
    active_ranks,
    apply_prilora,
    prilora_prune,
    prilora_pruning_schedule,
    zero_masked_factors,
)

D_IN, D, D_OUT, LAYERS = 16, 32, 8, 6
TEACHER_RANKS = [1, 2, 3, 4, 5, 6]  # deeper layers need more rank


class Block(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.dense(h))


class Net(nnx.Module):
    """``embed`` → ``layers.{i}.dense`` (residual tanh blocks) → ``head``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(D_IN, D, rngs=rngs)
        self.layers = nnx.List([Block(D, rngs=rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(D, D_OUT, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def teacher(key, ranks=TEACHER_RANKS) -> Net:
    """The base model (same seed as the student's) with a random rank-``ranks[i]`` change in layer ``i``."""
    t = Net(rngs=nnx.Rngs(0))
    for i, (block, r) in enumerate(zip(t.layers, ranks)):
        if r == 0:
            continue
        ku, kv = jax.random.split(jax.random.fold_in(key, i))
        delta = jax.random.normal(ku, (D, r)) @ jax.random.normal(kv, (r, D)) / D
        block.dense.kernel[...] = block.dense.kernel[...] + 1.5 * delta
    return t


TARGETS = r"layers\.\d+\.dense"


def make_data(ranks, seed: int = 0):
    """``((x, y), (x_val, y_val))`` with ``y = teacher(x)``; prints the un-adapted base model's val MSE."""
    kx, kv, kt = jax.random.split(jax.random.key(seed), 3)
    x, xv = jax.random.normal(kx, (1024, D_IN)), jax.random.normal(kv, (256, D_IN))
    tch = teacher(kt, ranks)
    yv = tch(xv)
    print(f"base model (no adaptation) val MSE  {float(jnp.mean((Net(rngs=nnx.Rngs(0))(xv) - yv) ** 2)):.4f}")
    return (x, tch(x)), (xv, yv)


def train(model: Net, data, *, steps: int, lr: float, on_step: Callable[[int, Net], None] | None = None) -> float:
    """LoRA-Pro AdamW on minibatches of 64; ``on_step(step, model)`` runs after every update. Returns val MSE."""
    (x, y), (xv, yv) = data
    opt = nnx.Optimizer(model, lp.lora_pro_adamw(lr), wrt=lp.LoRAParam)

    @nnx.jit
    def train_step(model, opt, xb, yb):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(xb) - yb) ** 2), argnums=nnx.DiffState(0, lp.LoRAParam)
        )(model)
        opt.update(model, grads)
        zero_masked_factors(model)  # raw A stays equal to the masked (effective) A under LoRA-Pro
        return loss

    key = jax.random.key(42)
    for step in range(steps):
        idx = jax.random.choice(jax.random.fold_in(key, step), x.shape[0], (64,), replace=False)
        train_step(model, opt, x[idx], y[idx])
        if on_step is not None:
            on_step(step, model)
    return float(jnp.mean((model(xv) - yv) ** 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    t0 = time.time()
    data = make_data(TEACHER_RANKS)
    targets = TARGETS

    lora = Net(rngs=nnx.Rngs(0))
    lp.apply_lora(lora, lp.LoraConfig(rank=4, alpha=8.0, targets=targets), rngs=nnx.Rngs(1))
    mse_lora = train(lora, data, steps=args.steps, lr=args.lr)
    print(f"uniform LoRA r=4                   val MSE  {mse_lora:.4f}")

    pri = Net(rngs=nnx.Rngs(0))
    cfg = lp.LoraConfig(rank=4, alpha=8.0, targets=targets, input_norm_decay=0.9)
    ranks = apply_prilora(pri, cfg, rngs=nnx.Rngs(1))  # static shapes: all at rank 6, gates mask the rest
    schedule = dict(start=50, end=int(0.6 * args.steps), every=25, final_fraction=0.5)
    prune = nnx.jit(lambda m, f: prilora_prune(m, fraction=f))  # one compile; the fraction is data

    def on_step(step, model):
        do, frac = prilora_pruning_schedule(step, **schedule)
        if do:
            prune(model, jnp.float32(frac))

    mse_pri = train(pri, data, steps=args.steps, lr=args.lr, on_step=on_step)
    print(f"PRILoRA ranks {list(ranks.values())} (sum {sum(ranks.values())} = 6 x 4) val MSE  {mse_pri:.4f}")
    for path, layer in lp.lora_layers(pri).items():
        r = active_ranks(pri)[path]
        kept = float(jnp.mean(layer.a_mask[...][:, :r]))
        print(f"  {path:16s} rank {r}  A entries kept {kept:.0%}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
