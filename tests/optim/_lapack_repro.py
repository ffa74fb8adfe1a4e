"""Minimal repro: independent batched QRs in one jitted function on XLA:CPU (jaxlib 0.10).

``raw``: ``--calls`` independent ``jnp.linalg.qr`` of ``(12, 384, 32)`` batches (default: one per CPU of the
process, at least 2, i.e. as many as XLA's intra-op pool has threads). jaxlib 0.10 splits each batched
LAPACK call over that pool and blocks the pool thread that runs it until its pieces are done; when every
pool thread runs such a call, the pieces never run and ``block_until_ready`` never returns.
``barrier``: the same calls chained with ``jax.lax.optimization_barrier`` (no thunk on XLA:CPU: still hangs).
``sequence``: the same calls through :class:`lorapro_jax.LinalgSequence` (ordered: finishes).

Usage: ``python _lapack_repro.py raw|barrier|sequence [--iters N] [--calls K] [--hlo]``; prints ``ok`` at the end,
or the optimized HLO with ``--hlo`` (nothing runs then).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp


def build(mode: str, calls: int):
    def f(xs):
        if mode == "sequence":
            from lorapro_jax import LinalgSequence

            seq = LinalgSequence()
            qs = [seq.qr(x)[0] for x in xs]
        elif mode == "barrier":
            qs, prev = [], None
            for x in xs:
                if prev is not None:
                    prev, x = jax.lax.optimization_barrier((prev, x))
                prev = jnp.linalg.qr(x)[0]
                qs.append(prev)
        else:
            qs = [jnp.linalg.qr(x)[0] for x in xs]
        return sum(q.sum() for q in qs)

    xs = [jax.random.normal(jax.random.key(i), (12, 384, 32)) for i in range(calls)]
    return jax.jit(f), xs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("raw", "barrier", "sequence"))
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--calls", type=int, default=max(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--hlo", action="store_true")
    args = ap.parse_args()
    f, xs = build(args.mode, args.calls)
    if args.hlo:
        print(f.lower(xs).compile().as_text())
        return
    for i in range(args.iters):
        jax.block_until_ready(f([x + i for x in xs]))
    print("ok", args.mode, args.calls, jax.__version__, flush=True)


if __name__ == "__main__":
    main()
