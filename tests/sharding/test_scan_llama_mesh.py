"""A scan-layers Llama (tiny random config) with LoRA-Pro full form on a (data=2, model=4) mesh of 8
simulated CPU devices matches one device, and its compiled step moves no full m x n kernel-sized array.

Tolerances as in test_sharding_mesh.py: 3 fp32 steps 1e-4 (sharded reductions sum in another order and
the first Adam step amplifies that for tiny gradient entries), float64 1e-10 (rounding only).
"""

from __future__ import annotations

import json

import pytest

# Multi-device, multi-process or SIGKILL runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow
from _sharding_subproc import cpu_env, run_all

TIMEOUT_S = 400


@pytest.fixture(scope="module")
def result() -> dict:
    [(code, log)] = run_all([["tests/sharding/_scan_llama_worker.py"]], cpu_env(8), TIMEOUT_S)
    assert code == 0, f"worker failed (exit {code}, -9 = killed after {TIMEOUT_S} s):\n{log[-4000:]}"
    line = [ln for ln in log.splitlines() if ln.startswith("RESULT")]
    assert line, log[-4000:]
    return json.loads(line[-1][len("RESULT"):])


@pytest.mark.slow
def test_scan_llama_sharded_equals_single_device(result):
    assert result["devices"] == 8
    assert result["fp32"]["err"]["lora"] < 1e-4 and result["fp32"]["err"]["opt"] < 1e-4, result["fp32"]
    assert result["f64"]["err"]["lora"] < 1e-10 and result["f64"]["err"]["opt"] < 1e-10, result["f64"]


@pytest.mark.slow
def test_stacked_pairs_follow_their_kernels(result):
    """a: (layers, in, r) ~ P(None, in_spec, None); b: (layers, r, out) ~ P(None, None, out_spec)."""
    specs = result["specs"]
    assert specs, "no LoRA pairs found"
    for path, s in specs.items():
        assert len(s["a_shape"]) == 3 and len(s["b_shape"]) == 3, (path, s)
        column = any(k in path for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        if column:
            assert s["a"] == [None, "data", None] and s["b"] == [None, None, "model"], (path, s)
        else:
            assert s["a"] == [None, "model", None] and s["b"] == [None, None, "data"], (path, s)


@pytest.mark.slow
def test_no_kernel_sized_collective_in_scanned_step(result):
    """No collective carries a stacked kernel (layers, n, m), one layer's (n, m), or their transposes;
    FSDP's all-gathers of W0 over "data" keep the "model" split, so their shapes differ."""
    kernels = {tuple(s) for s in result["kernel_shapes"]}
    kernels |= {s[1:] for s in list(kernels)}
    kernels |= {tuple(reversed(s)) for s in list(kernels)} | {s[:-2] + s[-2:][::-1] for s in list(kernels)}
    assert result["collectives"], "expected all-reduces of the data-parallel gradients"
    for op, shapes in result["collectives"]:
        for s in shapes:
            assert tuple(s) not in kernels, (op, shapes)
