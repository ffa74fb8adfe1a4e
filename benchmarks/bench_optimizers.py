"""Step time and optimizer-state memory of LoRA, the LoRA-Pro forms and full fine-tuning, side by side.

Model: :class:`~benchmarks.common.LinearStack`, ``L`` square ``d x d`` ``nnx.Linear`` layers (no bias,
``tanh`` between them) with LoRA of rank ``r`` on every layer, input ``(batch, d)``, MSE loss against a
fixed random target. Methods (all float32, learning rate ``--lr``):

* ``lora``: plain ``optax.adamw`` on the LoRA factors (A, B) — the reference of every ratio;
* ``lora_pro_sgd``: ``optax.chain(scale_by_lora_pro(), optax.sgd(lr))`` (paper, SGD form);
* ``lora_pro_efficient``: ``lora_pro_adamw(form="efficient")`` (low-rank AdamW on ĝ_A, ĝ_B);
* ``lora_pro_full``: ``lora_pro_adamw(form="full")`` (paper's AdamW, full-size moments);
* ``lora_pro_lean``: ``lora_pro_adamw(form="lean")`` (factored moments; skipped with a note if the
  form raises ``NotImplementedError`` / ``ImportError``);
* ``full_ft``: ``optax.adamw`` on every base kernel of the same stack without LoRA.

LoRA-Pro transforms use their defaults (``x_mode="sylvester"``, ``delta=1e-8``) except that the
per-step NaN/inf host check is off unless ``--check-finite`` is given (it is a host callback, not part
of the algorithm).

Measurement. Each method's train step (forward, backward, optimizer update, parameter write-back) is
one ``nnx.jit`` function with the model and the optimizer state donated, called through
``nnx.cached_partial``. For one width, every (rank, method) step is compiled and warmed up first (not
timed); then ``--reps`` rounds run, each calling every step once in a fresh random order and timing it
with ``time.perf_counter`` around the call and ``jax.block_until_ready``. Reported: the median step time,
its 25-75 % range, and the ratio to LoRA as the median over rounds of ``t_method / t_lora`` from the
same round (paired, so slow phases of a noisy machine cancel). ``full_ft`` does not depend on ``r``;
it is timed once per width and compared with the LoRA of each rank.

Memory. ``state``: exact bytes of the optimizer-state pytree after the timed steps (sum of leaf
``nbytes``), next to the analytic count (``analytic_state_bytes``). ``temp``: XLA's scratch bytes of
the compiled step (``lower(...).compile().memory_analysis()``), where the backend reports it.

Usage::

    python -m benchmarks.bench_optimizers                       # widths 256,512,1024; ranks 4,8,32
    python -m benchmarks.bench_optimizers --widths 256,512 --ranks 4,8 --reps 20 --json out.json --markdown
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
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.optim.lora_pro import scale_by_lora_pro

from .common import LinearStack, compiled_memory, format_bytes, machine_info, median, quantile, tree_nbytes

__all__ = [
    "METHODS",
    "Method",
    "analytic_state_bytes",
    "format_markdown",
    "format_table",
    "main",
    "run_benchmark",
]

F32 = 4  # bytes of a float32 moment entry
I32 = 4  # bytes of an int32 step counter


@dataclasses.dataclass(frozen=True)
class Method:
    """One optimizer configuration.

    Attributes:
      name: identifier used on the command line and in the JSON.
      label: what it is, for the tables.
      lora: whether the model carries LoRA adapters (else full fine-tuning of the base kernels).
      make_tx: ``(learning_rate, check_finite) -> optax.GradientTransformation``.
      state_formula: optimizer-state floats per adapted ``m x n`` layer (``n`` in, ``m`` out).
    """

    name: str
    label: str
    lora: bool
    make_tx: Callable[[float, bool], optax.GradientTransformation]
    state_formula: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", "LoRA, AdamW on A,B", True, lambda lr, cf: optax.adamw(lr), "2r(m+n)"),
        Method(
            "lora_pro_sgd",
            "LoRA-Pro SGD form",
            True,
            lambda lr, cf: lp.guard_nonfinite(optax.chain(scale_by_lora_pro(), optax.sgd(lr)), "raise" if cf else "ignore"),
            "0",
        ),
        Method(
            "lora_pro_efficient",
            "LoRA-Pro AdamW efficient",
            True,
            lambda lr, cf: lp.lora_pro_adamw(lr, form="efficient", on_nonfinite="raise" if cf else "ignore"),
            "2r(m+n)",
        ),
        Method(
            "lora_pro_full",
            "LoRA-Pro AdamW full",
            True,
            lambda lr, cf: lp.lora_pro_adamw(lr, form="full", on_nonfinite="raise" if cf else "ignore"),
            "2mn",
        ),
        Method(
            "lora_pro_lean",
            "LoRA-Pro AdamW lean",
            True,
            lambda lr, cf: lp.lora_pro_adamw(lr, form="lean", on_nonfinite="raise" if cf else "ignore"),
            "(m+n)(k+1), k=2r",
        ),
        Method("full_ft", "Full fine-tuning, AdamW", False, lambda lr, cf: optax.adamw(lr), "2mn"),
    )
}


def analytic_state_bytes(method: str, width: int, rank: int | None, num_layers: int) -> int:
    """Optimizer-state bytes expected for ``method`` on the benchmark stack (float32 moments, int32 counts).

    Per adapted ``m x n`` layer (here ``m = n = width``):

    * ``lora``: Adam ``mu, nu`` of A ``(r x n)`` and B ``(m x r)``: ``2 r (m + n)``; plus one step count.
    * ``lora_pro_sgd``: nothing (stateless rewrite, then plain SGD).
    * ``lora_pro_efficient``: as ``lora``; plus the decay state (count, base-decay factor).
    * ``lora_pro_full``: full-size ``mu, nu``: ``2 m n``; plus count and decay state.
    * ``lora_pro_lean``: first moment ``L (n x k) + R (k x m)`` and second-moment row/col sums
      ``n + m``, ``k = min(2 r, m, n)``; plus count and decay state.
    * ``full_ft``: Adam ``mu, nu`` of every kernel: ``2 m n``; plus one step count.
    """
    m = n = width
    if method == "full_ft":
        return num_layers * 2 * m * n * F32 + I32
    if rank is None:
        raise ValueError(f"analytic_state_bytes: method {method!r} needs a rank.")
    decay_state = I32 + F32  # LoraProDecayState(count, base_decay)
    if method == "lora":
        return num_layers * 2 * rank * (m + n) * F32 + I32
    if method == "lora_pro_sgd":
        return 0
    if method == "lora_pro_efficient":
        return num_layers * 2 * rank * (m + n) * F32 + I32 + decay_state
    if method == "lora_pro_full":
        return num_layers * 2 * m * n * F32 + I32 + decay_state
    if method == "lora_pro_lean":
        k = min(2 * rank, m, n)
        return num_layers * ((n + m) * k + n + m) * F32 + I32 + decay_state
    raise ValueError(f"analytic_state_bytes: unknown method {method!r}; known: {sorted(METHODS)}.")


def _loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(model(x) - y))


def _make_step(tx: optax.GradientTransformation, wrt: Any):
    """An ``nnx.jit`` train step ``(model, opt_state, x, y) -> (loss, opt_state)`` updating ``model`` in place.

    The optimizer state is an ordinary pytree (as returned by ``tx.init``), not an ``nnx.Optimizer``.
    """

    def step(model, opt_state, x, y):
        loss, grads = nnx.value_and_grad(_loss_fn, argnums=nnx.DiffState(0, wrt))(model, x, y)
        params = nnx.as_pure(nnx.state(model, wrt))
        updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, opt_state

    return nnx.jit(step, donate_argnums=(0, 1))


class _Runner:
    """One (method, width, rank) model + optimizer with its compiled step and its timings."""

    def __init__(
        self, method: Method, width: int, rank: int | None, num_layers: int, lr: float, seed: int, check_finite: bool
    ):
        self.method, self.width, self.rank, self.num_layers = method, width, rank, num_layers
        model = LinearStack(width, num_layers, rngs=nnx.Rngs(seed))
        if method.lora:
            lp.apply_lora(model, lp.LoraConfig(rank=rank, alpha=16.0), rngs=nnx.Rngs(seed + 1))
            wrt = lp.LoRAParam
        else:
            wrt = nnx.Param
        self.model = model
        self.base_params = width * width * num_layers
        self.trainable_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, wrt)))
        self.tx = method.make_tx(lr, check_finite)
        self.opt_state = self.tx.init(nnx.as_pure(nnx.state(model, wrt)))
        self.jitted = _make_step(self.tx, wrt)
        self.times: list[float] = []
        self.compile_s = float("nan")
        self.memory: dict[str, int] | None = None
        self.loss = float("nan")
        self._call = None

    def compile(self, x: jax.Array, y: jax.Array) -> None:
        """First call (trace + compile + one step), then the compiled-memory stats (cached, cheap)."""
        t0 = time.perf_counter()
        self._call = nnx.cached_partial(self.jitted, self.model)
        loss, self.opt_state = self._call(self.opt_state, x, y)
        jax.block_until_ready((loss, self.opt_state))
        self.compile_s = time.perf_counter() - t0
        self.loss = loss
        self.memory = compiled_memory(self.jitted.lower(self.model, self.opt_state, x, y).compile())

    def step(self, x: jax.Array, y: jax.Array) -> float:
        t0 = time.perf_counter()
        loss, self.opt_state = self._call(self.opt_state, x, y)
        jax.block_until_ready((loss, self.opt_state))
        dt = time.perf_counter() - t0
        self.loss = loss
        return dt


def _rows_for_width(
    width: int,
    ranks: Sequence[int],
    methods: Sequence[Method],
    *,
    num_layers: int,
    batch: int,
    reps: int,
    warmup: int,
    lr: float,
    seed: int,
    check_finite: bool,
    notes: list[str],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    kx, ky = jax.random.split(jax.random.key(seed + 1000 + width))
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    y = jax.random.normal(ky, (batch, width), jnp.float32)
    runners: dict[tuple[str, int | None], _Runner] = {}
    for method in methods:
        for rank in ranks if method.lora else [None]:
            if rank is not None and rank > width:
                raise ValueError(f"rank {rank} exceeds width {width}.")
            try:
                runner = _Runner(method, width, rank, num_layers, lr, seed, check_finite)
                t0 = time.perf_counter()
                runner.compile(x, y)
            except (NotImplementedError, ImportError) as e:
                note = f"{method.name} skipped at d={width}, r={rank}: {type(e).__name__}: {e}"
                print(f"NOTE: {note}", file=sys.stderr)
                notes.append(note)
                continue
            log(f"  compiled {method.name:<20} d={width:<5} r={rank!s:<4} in {time.perf_counter() - t0:6.2f} s")
            runners[(method.name, rank)] = runner
    for runner in runners.values():
        for _ in range(warmup):
            runner.step(x, y)
    order = list(runners)
    rng = np.random.default_rng(seed + width)
    rounds: list[dict[tuple[str, int | None], float]] = []
    for _ in range(reps):
        times = {}
        for i in rng.permutation(len(order)):
            key = order[i]
            times[key] = runners[key].step(x, y)
            runners[key].times.append(times[key])
        rounds.append(times)
    rows = []
    for rank in ranks:
        ref_key = ("lora", rank)
        ref = runners.get(ref_key)
        for method in methods:
            key = (method.name, rank if method.lora else None)
            if key not in runners:
                continue
            ru = runners[key]
            ratio = None
            if ref is not None:
                ratio = median([r[key] / r[ref_key] for r in rounds])
            state = tree_nbytes(ru.opt_state)
            ref_state = tree_nbytes(ref.opt_state) if ref is not None else None
            temp = ru.memory["temp"] if ru.memory else None
            ref_temp = ref.memory["temp"] if ref is not None and ref.memory else None
            rows.append(
                {
                    "width": width,
                    "rank": rank,
                    "method": method.name,
                    "label": method.label,
                    "num_layers": num_layers,
                    "batch": batch,
                    "base_params": ru.base_params,
                    "trainable_params": ru.trainable_params,
                    "step_ms_median": 1e3 * median(ru.times) if ru.times else None,
                    "step_ms_p25": 1e3 * quantile(ru.times, 0.25) if ru.times else None,
                    "step_ms_p75": 1e3 * quantile(ru.times, 0.75) if ru.times else None,
                    "time_ratio_vs_lora": ratio,
                    "state_bytes": state,
                    "state_bytes_analytic": analytic_state_bytes(method.name, width, ru.rank, num_layers),
                    "state_formula_per_layer": method.state_formula,
                    "state_ratio_vs_lora": (state / ref_state) if ref_state else None,
                    "xla_memory": ru.memory,
                    "temp_ratio_vs_lora": (temp / ref_temp) if temp is not None and ref_temp else None,
                    "peak_ratio_vs_lora": (ru.memory["peak"] / ref.memory["peak"])
                    if ru.memory and ref is not None and ref.memory and ref.memory["peak"]
                    else None,
                    "compile_s": ru.compile_s,
                    "final_loss": float(ru.loss),
                    "shared_across_ranks": not method.lora,
                }
            )
    return rows


def run_benchmark(
    widths: Sequence[int] = (256, 512, 1024),
    ranks: Sequence[int] = (4, 8, 32),
    *,
    methods: Sequence[str] | None = None,
    num_layers: int = 4,
    batch: int = 256,
    reps: int = 20,
    warmup: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    check_finite: bool = False,
    command: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Runs the benchmark; returns ``{"meta": {...}, "rows": [...], "notes": [...]}`` (JSON-serialisable).

    Args:
      widths: layer widths ``d`` (each layer is ``d x d``).
      ranks: LoRA ranks ``r`` (each must be ``<= d``).
      methods: names from :data:`METHODS` (default: all; ``lora`` is needed for the ratios).
      num_layers: ``L``.
      batch: rows of the input ``(batch, d)``.
      reps: timed rounds per width (every step once per round, random order).
      warmup: untimed calls per step after compilation.
      lr: learning rate of every method.
      seed: seeds the model init, the data and the round order.
      check_finite: keep the LoRA-Pro transforms' per-step NaN/inf host check (library default) on.
      command: command line to record in ``meta`` (default: this process's).
      verbose: print progress to stderr.
    """
    names = list(methods) if methods is not None else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    if not widths or not ranks:
        raise ValueError("run_benchmark needs at least one width and one rank.")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}.")
    chosen = [METHODS[n] for n in names]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    for width in widths:
        log(f"width {width}:")
        rows += _rows_for_width(
            width,
            ranks,
            chosen,
            num_layers=num_layers,
            batch=batch,
            reps=reps,
            warmup=warmup,
            lr=lr,
            seed=seed,
            check_finite=check_finite,
            notes=notes,
            log=log,
        )
    meta = machine_info(command)
    meta.update(
        {
            "widths": list(widths),
            "ranks": list(ranks),
            "methods": names,
            "num_layers": num_layers,
            "batch": batch,
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
    for row in rows:
        if not np.isfinite(row["final_loss"]):
            notes.append(f"{row['method']} at d={row['width']}, r={row['rank']}: non-finite loss {row['final_loss']}")
    return {"meta": meta, "rows": rows, "notes": notes}


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table_cells(row: dict[str, Any]) -> list[str]:
    mem = row["xla_memory"]
    return [
        str(row["width"]),
        str(row["rank"]),
        row["method"] + (" *" if row["shared_across_ranks"] else ""),
        f"{row['trainable_params']:,}",
        f"{row['step_ms_median']:.2f}",
        f"{row['step_ms_p25']:.2f}-{row['step_ms_p75']:.2f}",
        _fmt_ratio(row["time_ratio_vs_lora"]),
        format_bytes(row["state_bytes"]),
        "yes" if row["state_bytes"] == row["state_bytes_analytic"] else f"NO ({row['state_bytes_analytic']} B)",
        _fmt_ratio(row["state_ratio_vs_lora"]),
        format_bytes(mem["temp"]) if mem else "-",
        _fmt_ratio(row["temp_ratio_vs_lora"]),
        _fmt_ratio(row["peak_ratio_vs_lora"]),
    ]


_HEADERS = [
    "d",
    "r",
    "method",
    "trainable",
    "step ms (median)",
    "p25-p75 ms",
    "time / LoRA",
    "opt state",
    "= analytic",
    "state / LoRA",
    "XLA temp",
    "temp / LoRA",
    "peak / LoRA",
]


def format_table(result: dict[str, Any]) -> str:
    """Plain-text, column-aligned table of ``result["rows"]``."""
    cells = [_HEADERS] + [_table_cells(r) for r in result["rows"]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_HEADERS))]
    lines = []
    prev = None
    for k, c in enumerate(cells):
        if k > 1 and prev is not None and c[:2] != prev[:2]:
            lines.append("")
        lines.append("  ".join(s.rjust(w) if i not in (2,) else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
        prev = c
    lines.append("")
    lines.append(_footer(result))
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    """A markdown table of ``result["rows"]`` with the setup in a caption line."""
    out = [
        "| " + " | ".join(_HEADERS) + " |",
        "|" + "|".join("---:" if i != 2 else ":---" for i in range(len(_HEADERS))) + "|",
    ]
    for r in result["rows"]:
        out.append("| " + " | ".join(_table_cells(r)) + " |")
    return "\n".join(out) + "\n\n" + _footer(result)


def _footer(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        (
            f"L = {m['num_layers']} layers of d x d, batch {m['batch']}, {m['dtype']}, {m['reps']} interleaved rounds, "
            "time / LoRA = median over rounds of the paired ratio; * = full fine-tuning, timed once per width, "
            "compared with the LoRA of each rank; XLA temp = scratch bytes of the compiled step; "
            "peak = argument + output - aliased + temp bytes (includes the weights and the optimizer state)."
        ),
        (
            f"{m['date_utc']}; {m['backend']} ({m['device']}, {m['cpu']}, {m['cpu_cores_available']} cores); "
            f"jax {m['jax']}, flax {m['flax']}, optax {m['optax']}; OPENBLAS_NUM_THREADS={m['openblas_num_threads']}; "
            f"1-min load average {m['load_average_1m_start']} at start, {m['load_average_1m']} at end; "
            f"total {m['total_s']:.0f} s."
        ),
        f"Command: {m['command']}",
    ]
    lines += [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_optimizers",
        description="Step time and optimizer-state memory of LoRA, LoRA-Pro (sgd/efficient/full/lean) and full "
        "fine-tuning, measured side by side (ratios vs LoRA).",
    )
    parser.add_argument(
        "--widths", type=_int_list, default=[256, 512, 1024], help="layer widths d (default 256,512,1024)"
    )
    parser.add_argument("--large", action="store_true", help="also run width 2048")
    parser.add_argument("--ranks", type=_int_list, default=[4, 8, 32], help="LoRA ranks (default 4,8,32)")
    parser.add_argument(
        "--methods", type=lambda s: [v for v in s.split(",") if v], default=None, help=f"subset of {','.join(METHODS)}"
    )
    parser.add_argument("--layers", type=int, default=4, help="number of d x d layers L (default 4)")
    parser.add_argument("--batch", type=int, default=256, help="batch rows (default 256)")
    parser.add_argument("--reps", type=int, default=20, help="timed interleaved rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-finite", action="store_true", help="keep LoRA-Pro's per-step NaN/inf host check on")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table instead of plain text")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    widths = list(args.widths) + ([2048] if args.large and 2048 not in args.widths else [])
    command = " ".join(["python -m benchmarks.bench_optimizers", *(sys.argv[1:] if argv is None else argv)])
    result = run_benchmark(
        widths,
        args.ranks,
        methods=args.methods,
        num_layers=args.layers,
        batch=args.batch,
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
