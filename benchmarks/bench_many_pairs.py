"""Compile time and step time of the LoRA-Pro optimizers on a tree of many LoRA pairs, against AdamW.

The tree is a Llama-shaped adapter set: projections ``q, k, v, o, gate, up, down`` of ``L`` layers
(``--pairs`` pairs in all, default 224 = 7 x 32), each a ``width x width`` weight (``gate``/``up``:
``width x mlp_width``, ``down``: ``mlp_width x width``; ``--mlp-width`` defaults to ``width``) with a LoRA pair
of rank ``r``. It is shrunk (default ``width = 64``, ``r = 8``) so that the per-pair ``r x r`` work, not
the ``m x n`` arithmetic, dominates: the regime where unrolling the algebra pair by pair hurts.

Layouts (the same numbers in both):

* ``unstacked``: one :class:`~lorapro_jax.LoraPair` per adapted weight, at ``layers.{i}.{proj}``;
* ``stacked``: one stacked pair per projection (``a: (L, n, r)``, ``b: (L, r, m)``), as a scan-over-layers
  model holds them.

Methods (each one jitted step ``(params, state, grads) -> (params, state)`` = optimizer update + apply,
params and state donated; fixed random gradients, since the model's forward/backward is the same for all):

* ``adamw``: ``optax.adamw`` on the LoRA factors, the reference of every ratio (same layout);
* ``lora_pro_sgd``: ``optax.chain(scale_by_lora_pro(), optax.sgd(lr))``;
* ``lora_pro_efficient`` / ``lora_pro_full`` / ``lora_pro_lean``: ``lora_pro_adamw(lr, form=...)``.

The LoRA-Pro per-step NaN/inf host check is off unless ``--check-finite`` (it is a host callback that
AdamW does not have).

Measurement. Compile time: ``jax.jit(step).lower(...).compile()`` wall time (trace, lower and XLA
compile), one per (layout, method), in the order given; ratio = that over AdamW's of the same layout.
Step time: after ``--warmup`` untimed calls, ``--reps`` rounds each calling every step once in a fresh
random order, timed with ``time.perf_counter`` around the call and ``jax.block_until_ready``; reported:
the median, its 25-75 % range, and the ratio to AdamW as the median over rounds of the paired ratio
from the same round (slow phases of a busy machine cancel).

Usage::

    python -m benchmarks.bench_many_pairs                          # 224 pairs, width 64, r = 8
    python -m benchmarks.bench_many_pairs --pairs 56 --width 128 --rank 4 --markdown --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorapro_jax as lp

from .common import machine_info, median, quantile

__all__ = [
    "LAYOUTS",
    "METHODS",
    "PROJECTIONS",
    "format_markdown",
    "format_table",
    "main",
    "make_tree",
    "run_benchmark",
]

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LAYOUTS = ("unstacked", "stacked")


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimizer: ``make_tx(lr, check_finite)``; ``target`` = the step-time ratio to AdamW aimed at."""

    name: str
    make_tx: Callable[[float, bool], optax.GradientTransformation]
    target_step: float | None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("adamw", lambda lr, cf: optax.adamw(lr), None),
        Method(
            "lora_pro_sgd",
            lambda lr, cf: lp.guard_nonfinite(
                optax.chain(lp.scale_by_lora_pro(), optax.sgd(lr)), "raise" if cf else "ignore"
            ),
            1.5,
        ),
        Method(
            "lora_pro_efficient",
            lambda lr, cf: lp.lora_pro_adamw(
                lr, form="efficient", on_nonfinite="raise" if cf else "ignore"
            ),
            1.5,
        ),
        Method(
            "lora_pro_full",
            lambda lr, cf: lp.lora_pro_adamw(
                lr, form="full", on_nonfinite="raise" if cf else "ignore"
            ),
            1.5,
        ),
        Method(
            "lora_pro_lean",
            lambda lr, cf: lp.lora_pro_adamw(
                lr, form="lean", on_nonfinite="raise" if cf else "ignore"
            ),
            2.0,
        ),
    )
}
TARGET_COMPILE = 2.0  # compile time at most 2x AdamW's


def _shape(proj: str, width: int, mlp_width: int) -> tuple[int, int]:
    return {
        "gate": (width, mlp_width),
        "up": (width, mlp_width),
        "down": (mlp_width, width),
    }.get(proj, (width, width))


def make_tree(
    pairs: int,
    width: int,
    rank: int,
    layout: str,
    *,
    mlp_width: int | None = None,
    seed: int = 0,
    grads: bool = False,
) -> dict[str, Any]:
    """The adapter tree (or a gradient tree of the same structure with ``grads=True``).

    Pair ``i`` is projection ``PROJECTIONS[i % 7]`` of layer ``i // 7``. Both layouts hold the same numbers.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if pairs <= 0 or width <= 0 or rank <= 0 or rank > width:
        raise ValueError(
            f"need pairs > 0 and 0 < rank <= width, got pairs={pairs}, width={width}, rank={rank}."
        )
    mlp_width = mlp_width or width
    rng = np.random.default_rng(seed + (1 if grads else 0))
    scale = 16.0 / rank
    stacks = {}
    for j, proj in enumerate(PROJECTIONS):
        count = len(range(j, pairs, len(PROJECTIONS)))
        if count == 0:
            continue
        n, m = _shape(proj, width, mlp_width)
        a = rng.standard_normal((count, n, rank)) / np.sqrt(n)
        b = 0.1 * rng.standard_normal((count, rank, m))
        stacks[proj] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    if layout == "stacked":
        return {
            proj: lp.LoraPair(a, b, scale, in_ndim=1) for proj, (a, b) in stacks.items()
        }
    layers: dict[str, dict[str, lp.LoraPair]] = {}
    for i in range(pairs):
        proj = PROJECTIONS[i % len(PROJECTIONS)]
        a, b = stacks[proj]
        layers.setdefault(str(i // len(PROJECTIONS)), {})[proj] = lp.LoraPair(
            a[i // len(PROJECTIONS)], b[i // len(PROJECTIONS)], scale
        )
    return {"layers": layers}


class _Runner:
    def __init__(
        self,
        method: Method,
        layout: str,
        params: Any,
        grads: Any,
        lr: float,
        check_finite: bool,
    ):
        self.method, self.layout = method, layout
        tx = method.make_tx(lr, check_finite)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.grads = grads
        self.params = jax.tree.map(jnp.copy, params)
        self.state = tx.init(self.params)
        t0 = time.perf_counter()
        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(self.params, self.state, grads)
            .compile()
        )
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - t0


def run_benchmark(
    pairs: int = 224,
    width: int = 64,
    rank: int = 8,
    *,
    mlp_width: int | None = None,
    methods: Sequence[str] | None = None,
    layouts: Sequence[str] = LAYOUTS,
    reps: int = 20,
    warmup: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    check_finite: bool = False,
    command: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Runs the benchmark; returns ``{"meta": {...}, "rows": [...]}`` (JSON-serialisable).

    ``methods`` must include ``adamw`` (the reference); ``layouts`` is a subset of :data:`LAYOUTS`.
    """
    names = ["adamw"] + [n for n in (methods or METHODS) if n != "adamw"]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(
            f"layouts must be a non-empty subset of {LAYOUTS}, got {list(layouts)}."
        )
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}.")
    log = (
        (lambda s: print(s, file=sys.stderr, flush=True))
        if verbose
        else (lambda s: None)
    )
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    runners: dict[tuple[str, str], _Runner] = {}
    for layout in layouts:
        params = make_tree(pairs, width, rank, layout, mlp_width=mlp_width, seed=seed)
        grads = make_tree(
            pairs, width, rank, layout, mlp_width=mlp_width, seed=seed, grads=True
        )
        for name in names:
            runners[(layout, name)] = r = _Runner(
                METHODS[name], layout, params, grads, lr, check_finite
            )
            log(f"  compiled {layout:<9} {name:<20} in {r.compile_s:6.2f} s")
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    order = list(runners)
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(reps):
        times = {}
        for i in rng.permutation(len(order)):
            times[order[i]] = runners[order[i]].step()
            runners[order[i]].times.append(times[order[i]])
        rounds.append(times)
    rows = []
    for (layout, name), r in runners.items():
        ref = runners[(layout, "adamw")]
        leaves = jax.tree.leaves(r.params, is_leaf=lp.is_lora_pair)
        step_ratio = median([t[(layout, name)] / t[(layout, "adamw")] for t in rounds])
        compile_ratio = r.compile_s / ref.compile_s
        target = METHODS[name].target_step
        rows.append(
            {
                "layout": layout,
                "method": name,
                "pair_nodes": sum(lp.is_lora_pair(x) for x in leaves),
                "adapted_weights": pairs,
                "compile_s": r.compile_s,
                "compile_ratio_vs_adamw": compile_ratio,
                "step_ms_median": 1e3 * median(r.times),
                "step_ms_p25": 1e3 * quantile(r.times, 0.25),
                "step_ms_p75": 1e3 * quantile(r.times, 0.75),
                "step_ratio_vs_adamw": step_ratio,
                "target_step_ratio": target,
                "meets_targets": None
                if target is None
                else bool(step_ratio <= target and compile_ratio <= TARGET_COMPILE),
                "finite": bool(
                    all(
                        np.all(np.isfinite(np.asarray(x)))
                        for x in jax.tree.leaves(r.params)
                    )
                ),
            }
        )
    meta = machine_info(command or "python -m benchmarks.bench_many_pairs")
    meta.update(
        {
            "pairs": pairs,
            "width": width,
            "mlp_width": mlp_width or width,
            "rank": rank,
            "methods": names,
            "layouts": list(layouts),
            "reps": reps,
            "warmup": warmup,
            "lr": lr,
            "seed": seed,
            "check_finite": check_finite,
            "dtype": "float32",
            "total_s": time.perf_counter() - t_start,
            "load_average_1m_start": load_start,
        }
    )
    return {"meta": meta, "rows": rows}


_HEADERS = [
    "layout",
    "method",
    "pair nodes",
    "compile s",
    "compile / AdamW",
    "step ms",
    "p25-p75 ms",
    "step / AdamW",
    "target",
]


def _cells(row: dict[str, Any]) -> list[str]:
    target = row["target_step_ratio"]
    verdict = (
        "-"
        if target is None
        else (
            f"<= {target:g}x, <= 2x: " + ("met" if row["meets_targets"] else "MISSED")
        )
    )
    return [
        row["layout"],
        row["method"],
        str(row["pair_nodes"]),
        f"{row['compile_s']:.2f}",
        f"{row['compile_ratio_vs_adamw']:.2f}x",
        f"{row['step_ms_median']:.2f}",
        f"{row['step_ms_p25']:.2f}-{row['step_ms_p75']:.2f}",
        f"{row['step_ratio_vs_adamw']:.2f}x",
        verdict,
    ]


def _footer(result: dict[str, Any]) -> str:
    m = result["meta"]
    return "\n".join(
        [
            (
                f"{m['pairs']} adapted weights (q/k/v/o/gate/up/down), width {m['width']}, mlp width {m['mlp_width']}, "
                f"rank {m['rank']}, {m['dtype']}; optimizer update + apply only; {m['reps']} interleaved rounds; "
                "step / AdamW = median over rounds of the paired ratio; target = step ratio, compile ratio."
            ),
            (
                f"{m['date_utc']}; {m['backend']} ({m['device']}, {m['cpu']}, {m['cpu_cores_available']} cores); "
                f"jax {m['jax']}, optax {m['optax']}; OPENBLAS_NUM_THREADS={m['openblas_num_threads']}; "
                f"1-min load average {m['load_average_1m_start']} at start, {m['load_average_1m']} at end; "
                f"total {m['total_s']:.0f} s."
            ),
            f"Command: {m['command']}",
        ]
    )


def format_table(result: dict[str, Any]) -> str:
    """Plain-text, column-aligned table."""
    cells = [_HEADERS] + [_cells(r) for r in result["rows"]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADERS))]
    lines = [
        "  ".join(
            s.ljust(w) if i < 2 else s.rjust(w)
            for i, (s, w) in enumerate(zip(c, widths))
        )
        for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + _footer(result)


def format_markdown(result: dict[str, Any]) -> str:
    """Markdown table with the setup below it."""
    out = [
        "| " + " | ".join(_HEADERS) + " |",
        "|" + "|".join(":---" if i < 2 else "---:" for i in range(len(_HEADERS))) + "|",
    ]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in result["rows"]]
    return "\n".join(out) + "\n\n" + _footer(result)


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_many_pairs",
        description="Compile and step time of the LoRA-Pro forms vs optax.adamw on a tree of many LoRA pairs, "
        "stacked and unstacked, measured side by side.",
    )
    parser.add_argument(
        "--pairs",
        type=_positive,
        default=224,
        help="adapted weights (default 224 = 7 x 32)",
    )
    parser.add_argument(
        "--width",
        type=_positive,
        default=64,
        help="width of every projection (default 64)",
    )
    parser.add_argument(
        "--mlp-width",
        type=_positive,
        default=None,
        help="gate/up/down inner width (default: width)",
    )
    parser.add_argument(
        "--rank", type=_positive, default=8, help="LoRA rank (default 8)"
    )
    parser.add_argument(
        "--methods",
        type=lambda s: [v for v in s.split(",") if v],
        default=None,
        help=f"subset of {','.join(METHODS)}",
    )
    parser.add_argument(
        "--layouts",
        type=lambda s: [v for v in s.split(",") if v],
        default=list(LAYOUTS),
    )
    parser.add_argument(
        "--reps",
        type=_positive,
        default=20,
        help="timed interleaved rounds (default 20)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps after compilation (default 2)",
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check-finite",
        action="store_true",
        help="keep LoRA-Pro's per-step NaN/inf host check on",
    )
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print a markdown table instead of plain text",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    command = " ".join(
        [
            "python -m benchmarks.bench_many_pairs",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    result = run_benchmark(
        args.pairs,
        args.width,
        args.rank,
        mlp_width=args.mlp_width,
        methods=args.methods,
        layouts=args.layouts,
        reps=args.reps,
        warmup=args.warmup,
        lr=args.lr,
        seed=args.seed,
        check_finite=args.check_finite,
        command=command,
        verbose=not args.quiet,
    )
    print(format_markdown(result) if args.markdown else format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
