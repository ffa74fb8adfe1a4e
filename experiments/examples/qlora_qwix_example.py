"""QLoRA with qwix, trained by LoRA-Pro: an int8 weight-only base + qwix LoRA + ``lp.paired(lora_pro_adamw)``.

Same teacher-student task as ``lora_ga_example.py`` (the base MLP plus low-rank changes of its hidden layers).
qwix quantizes the frozen base kernels to int8 (weight-only, runs on CPU) and adds ``kernel_lora_a`` /
``kernel_lora_b`` (rank 4) to the four hidden layers; ``lp.qwix_pairing(provider)`` pairs them so LoRA-Pro
AdamW (full and efficient forms) and plain AdamW train the same adapters in ``nnx.Optimizer``. Needs qwix
(``pip install qwix``). Runs in seconds on CPU:

    python experiments/examples/qlora_qwix_example.py
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorapro_jax as lp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_ga_example import MLP, batches_of, make_data, mse  # noqa: E402  (the shared toy task)


def qlora_model(rank: int = 4, alpha: float = 8.0):
    """The base MLP with int8 weight-only kernels and qwix LoRA on its hidden layers; returns (model, provider)."""
    import qwix

    provider = qwix.LoraProvider(module_path=r"layers/[0-3]", rank=rank, alpha=alpha, weight_qtype="int8")
    model = MLP(rngs=nnx.Rngs(0))
    x = jnp.zeros((1, model.layers[0].kernel[...].shape[0]))
    return qwix.apply_lora_to_model(model, provider, x, rngs=nnx.Rngs(1)), provider


def run(tx, data, val, *, steps: int, batch_size: int = 64) -> tuple[float, float]:
    """Trains a fresh QLoRA model with ``paired(tx, qwix_pairing(provider))``; returns (val MSE before, after)."""
    model, provider = qlora_model()
    opt = nnx.Optimizer(model, lp.paired(tx, lp.qwix_pairing(provider)), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(mse, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
        opt.update(model, grads)
        return loss

    evaluate = nnx.jit(mse)
    before = float(evaluate(model, val))
    batches = batches_of(data, batch_size)
    for i in range(steps):
        step(model, opt, batches[i % len(batches)])
    return before, float(evaluate(model, val))


def main(argv=None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args(argv)
    data, val = make_data()
    txs = {
        "LoRA-Pro AdamW (full)": lp.lora_pro_adamw(args.lr, form="full"),
        "LoRA-Pro AdamW (efficient)": lp.lora_pro_adamw(args.lr, form="efficient"),
        "AdamW": optax.adamw(args.lr),
    }
    print(f"qwix QLoRA (int8 base, rank-4 LoRA), {args.steps} steps, lr {args.lr}, on {jax.devices()[0].platform}")
    results = {}
    for name, tx in txs.items():
        results[name] = run(tx, data, val, steps=args.steps)
        print(f"  {name:28s} val MSE {results[name][0]:.4f} -> {results[name][1]:.4f}")
    return results


if __name__ == "__main__":
    main()
