"""Step-time cost of ``on_nonfinite`` ("ignore" / "raise" / "skip") and of the old per-step host check, side by side.

Model: ``L`` square ``d x d`` layers ``tanh(x (W0 + s a b))`` with LoRA of rank ``r`` on each (pure
functions, float32), MSE loss. Each variant's train step (gradients, ``lora_pro_adamw`` update,
``apply_updates``) is one ``jax.jit`` with params and optimizer state donated. Variants:

* ``ignore``: no check (the reference of every ratio);
* ``raise``: ``on_nonfinite="raise"`` (the alias applies :func:`lorapro_jax.guard_nonfinite` once around its
  whole chain): on-device finiteness flags, host callback only in the failing
  branch of a ``lax.cond``;
* ``skip``: ``on_nonfinite="skip"``: flags, ``jnp.where`` selects of updates and state, skip counters;
* ``legacy``: the 0.1 behaviour, an unconditional ``jax.debug.callback`` with the flags every step.

All variants are compiled and warmed up first; then ``--reps`` rounds each call every variant once in a
random order, timed with ``time.perf_counter`` around the call and ``jax.block_until_ready``. Reported:
median step time and the median over rounds of ``t_variant / t_ignore`` from the same round.

Usage::

    python -m benchmarks.bench_nonfinite --width 512 --rank 8 --layers 4 --reps 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lp
from lorapro_jax.optim._tree import check_finite

from .common import machine_info

VARIANTS = ("ignore", "raise", "skip", "legacy")


def _legacy_check() -> optax.GradientTransformation:
    """The per-step host check of lorapro_jax 0.1 (an unconditional host callback every step), as a chain stage."""

    def update(updates, state, params=None):
        check_finite(updates, "legacy")
        return updates, state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def make_tx(variant: str, form: str) -> optax.GradientTransformation:
    if variant == "legacy":
        return optax.chain(_legacy_check(), lp.lora_pro_adamw(1e-3, form=form, on_nonfinite="ignore"))
    return lp.lora_pro_adamw(1e-3, form=form, on_nonfinite=variant)


def _model(width: int, rank: int, layers: int, seed: int):
    rng = np.random.default_rng(seed)
    base = [jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32) for _ in range(layers)]
    pairs = [
        lp.LoraPair(jnp.asarray(rng.normal(size=(width, rank)) / np.sqrt(width), jnp.float32),
                    jnp.asarray(rng.normal(size=(rank, width)) * 0.01, jnp.float32), 16.0 / rank)
        for _ in range(layers)
    ]
    return base, pairs


def _loss(pairs, base, x, y):
    for w0, p in zip(base, pairs):
        x = jnp.tanh(x @ w0 + p.scale * (x @ p.a) @ p.b)
    return jnp.mean((x - y) ** 2)


def _step_fn(tx):
    def step(pairs, state, base, x, y):
        loss, g = jax.value_and_grad(_loss)(pairs, base, x, y)
        u, state = tx.update(g, state, pairs)
        return optax.apply_updates(pairs, u), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def run(width: int, rank: int, layers: int, batch: int, reps: int, form: str, seed: int) -> dict:
    base, pairs0 = _model(width, rank, layers, seed)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    runs = {}
    for v in VARIANTS:
        tx = make_tx(v, form)
        pairs = jax.tree.map(jnp.copy, pairs0)
        state = tx.init(pairs)
        step = _step_fn(tx)
        for _ in range(3):  # compile + warm-up
            pairs, state, loss = step(pairs, state, base, x, y)
        jax.block_until_ready((pairs, state))
        runs[v] = [step, pairs, state, []]
    order = list(VARIANTS)
    shuffle = random.Random(seed)
    for _ in range(reps):
        shuffle.shuffle(order)
        for v in order:
            step, pairs, state, times = runs[v]
            t0 = time.perf_counter()
            pairs, state, loss = step(pairs, state, base, x, y)
            jax.block_until_ready((pairs, state, loss))
            times.append(time.perf_counter() - t0)
            runs[v][1:3] = [pairs, state]
    ref = runs["ignore"][3]
    rows = []
    for v in VARIANTS:
        t = runs[v][3]
        rows.append({"variant": v, "median_ms": 1e3 * statistics.median(t),
                     "ratio_to_ignore": statistics.median([a / b for a, b in zip(t, ref)])})
    return {"width": width, "rank": rank, "layers": layers, "batch": batch, "form": form, "reps": reps, "rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--form", default="full", choices=("full", "efficient", "lean"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res = run(args.width, args.rank, args.layers, args.batch, args.reps, args.form, args.seed)
    info = machine_info(" ".join(["python -m benchmarks.bench_nonfinite", *(sys.argv[1:] if argv is None else argv)]))
    res["meta"] = info
    print(f"# lora_pro_adamw(form={args.form!r}) d={args.width} r={args.rank} L={args.layers} batch={args.batch} "
          f"reps={args.reps}; {info['backend']} {info['device']}, {info['cpu_cores_available']} cores, "
          f"load {info['load_average_1m']}")
    print(f"{'variant':<8} {'median ms':>10} {'ratio to ignore':>16}")
    for r in res["rows"]:
        print(f"{r['variant']:<8} {r['median_ms']:>10.3f} {r['ratio_to_ignore']:>16.3f}")
    return res


if __name__ == "__main__":
    main()
