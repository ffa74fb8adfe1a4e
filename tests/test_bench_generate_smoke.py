"""Smoke test of benchmarks/bench_generate.py on a tiny GGUF Llama: it runs, counts the tokens it asked
for, and lays out its table. Timings are not tested (machines are noisy), only that they were measured."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parent / "models"))
from gguf_tiny import write_gguf  # noqa: E402
from hf_tiny import llama_state_dict, tiny_llama_config  # noqa: E402

from benchmarks import bench_generate as bench  # noqa: E402


def test_prompt_batch_is_left_padded_with_distinct_lengths():
    ids, mask = bench.prompt_batch(4, 50, min_len=3, max_len=9)
    assert ids.shape == (4, 9) and (mask[:, -1] == 1).all()
    assert mask.sum(1).tolist() == [9, 7, 5, 3]
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] >= 3).all()


@pytest.mark.timeout(120)
def test_runs_on_a_tiny_gguf(tmp_path):
    cfg = tiny_llama_config(tied=True)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, llama_state_dict(cfg, seed=0, tied=True))
    result = bench.run_benchmark(path, batches=(1, 2), new_tokens=3, reps=1, with_torch=False, verbose=False)
    assert [(r["impl"], r["batch"]) for r in result["rows"]] == [("lorapro_jax", 1), ("lorapro_jax", 2)]
    for r in result["rows"]:
        assert r["seconds"] > 0 and np.isclose(r["tokens_per_s"], r["batch"] * 3 / r["seconds"], rtol=0.02)
    assert result["meta"]["new_tokens"] == 3 and "jax" in result["meta"]
    assert bench.markdown(result).count("\n") == 3
