"""Smoke test of benchmarks/bench_smollm2_train.py on a tiny GGUF Llama: both layouts run every step, the
adapted-weight count and the optimizer-state bytes equal counts derived here from the model's shapes, and the
table has a row per (layout, method). Timings are not tested (machines are noisy), only that they were measured."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parent / "models"))
from gguf_tiny import write_gguf  # noqa: E402
from hf_tiny import llama_state_dict, tiny_llama_config  # noqa: E402

from benchmarks import bench_smollm2_train as bench  # noqa: E402

R = 2


def _shapes(cfg):
    """(in, out) of the seven adapted projections of one layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


@pytest.mark.slow  # 8 compiles of the whole train step: ~40 s on 2 cores
@pytest.mark.timeout(300)
def test_runs_on_a_tiny_gguf_and_counts_state(tmp_path):
    cfg = tiny_llama_config()
    path = write_gguf(tmp_path / "tiny.gguf", cfg, llama_state_dict(cfg, seed=0))
    result = bench.run_benchmark(("unrolled", "scan"), ("full", "sgd"), reps=1, warmup=0, batch=2, seq=7, rank=R,
                                 path=path, verbose=False)
    rows = result["rows"]
    assert [(r["layout"], r["method"]) for r in rows] == [
        (lay, m) for lay in ("unrolled", "scan") for m in ("lora", "full", "sgd")]
    layers = cfg.num_hidden_layers
    lora_moments = 2 * layers * sum(R * (m + n) for m, n in _shapes(cfg)) * 4  # Adam mu + nu on A, B (float32)
    full_moments = 2 * layers * sum(m * n for m, n in _shapes(cfg)) * 4  # mu + nu of the m x n equivalent gradient
    for r in rows:
        assert r["pairs"] == 7 * layers
        assert r["step_s"] > 0 and r["compile_s"] > 0
        assert r["memory"] is None or r["memory"]["peak"] >= r["opt_state_bytes"]
        scalars = r["opt_state_bytes"] - {"lora": lora_moments, "full": full_moments, "sgd": 0}[r["method"]]
        assert 0 <= scalars <= 64, (r["method"], r["opt_state_bytes"])  # step counts, peak lr, guard: a few scalars
        if r["method"] == "lora":
            assert r["step_ratio"] == 1.0 and r["compile_ratio"] == 1.0 and r["compile_first_s"] > 0
    assert result["meta"]["load_average_start"] is not None and "jax" in result["meta"]
    assert bench.markdown(result).count("\n") == 1 + len(rows)
