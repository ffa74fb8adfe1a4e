"""LoRA+ on a tiny MLP: B learns λ = 16 times faster than A, with AdamW and with LoRA-Pro AdamW.

Same teacher-student task as ``lora_ga_example.py`` (the base MLP plus low-rank changes of its hidden layers;
LoRA rank 4 on the four hidden layers). Four runs with the same learning rate η for A and the same steps:
AdamW, LoRA+ AdamW (B at 16 η), LoRA-Pro AdamW, and LoRA-Pro AdamW chained with LoRA+. Runs in seconds on CPU:

    python experiments/examples/lora_plus_example.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import optax
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.optim.lora_plus import lora_plus_adamw, scale_by_lora_plus

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_ga_example import MLP, TARGETS, make_data, train  # noqa: E402  (the shared toy task and loop)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ratio", type=float, default=16.0)
    args = ap.parse_args()
    t0 = time.time()
    data, val = make_data()
    config = lp.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    lr, lam = args.lr, args.ratio
    runs = {
        "AdamW": optax.adamw(lr, weight_decay=0.0),
        f"LoRA+ AdamW (λ={lam:g})": lora_plus_adamw(lr, lam),
        "LoRA-Pro AdamW": lp.lora_pro_adamw(lr),
        f"LoRA-Pro + LoRA+ (λ={lam:g})": optax.chain(lp.lora_pro_adamw(lr), scale_by_lora_plus(lam)),
    }
    log = max(args.steps // 5, 1)
    histories = {}
    for name, tx in runs.items():
        model = MLP(rngs=nnx.Rngs(0))
        lp.apply_lora(model, config, rngs=nnx.Rngs(1))
        histories[name] = train(model, tx, data, val, steps=args.steps, log_every=log)
    names = list(histories)
    print("val MSE".ljust(6) + "".join(f"{n:>30}" for n in names))
    for i, (t, _) in enumerate(histories[names[0]]):
        print(f"{t:6d}" + "".join(f"{histories[n][i][1]:30.4f}" for n in names))
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
