"""LoRA / LoRA-Pro on a (data=2, model=4) mesh of 8 simulated CPU devices.

XLA_FLAGS must be set before JAX starts, so the measurements run in two fresh processes
(_mesh_worker.py "transformer" and "optimizer", started together); this file holds the expectations.

What the design guarantees (lorapro_jax/parallel/sharding.py): with a kernel W0: (n, m) sharded P(i, o), the
factors are a: (n, r) ~ P(i, None) and b: (r, m) ~ P(None, o), and LoRA-Pro's full-form moments
(n, m) ~ P(i, o). Every n x m quantity of the full-form update (the equivalent gradient
s (ĝ_a b + a ĝ_b), mu, nu, the Adam direction d) is elementwise in arrays sharded P(i, o) or the
outer product of a P(i, None) and a P(None, o) factor, so it is born sharded like W0; it leaves a device
only through the contractions d bᵀ (n x r) and aᵀ d (r x m), and the r x r solves are replicated. Hence
the only collectives of the update carry n x r, r x m or r x r blocks, and no device ever holds an
n x m array: both are checked on the compiled HLO below.

Tolerances (relative: max|x - ref| / max|ref| per leaf), reference = the same steps on one device:
  * one optimizer update, fp32: 1e-5 (measured ~2e-6);
  * 3 training steps of a transformer, fp32: 1e-4 (measured ~2.5e-5). The first LoRA-Pro Adam step maps
    the equivalent gradient e to d = e / (|e| + eps); for entries with |e| of order eps (tiny attention
    gradients of a tiny model) this amplifies the ~1e-7 relative rounding from the different summation
    order of sharded reductions;
  * the same 3 steps in float64: 1e-10 (measured ~3e-14), which shows the fp32 gap is rounding only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest

# Multi-device, multi-process or SIGKILL runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow
from _sharding_subproc import ROOT, cpu_env, run_all

TIMEOUT_S = 240  # both workers together; ~25 s on two idle cores


def _doc_example() -> str:
    """The first Python block of docs/multi_device.md (it sets jax_num_cpu_devices=8 itself)."""
    with open(os.path.join(ROOT, "docs", "multi_device.md")) as f:
        return f.read().split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def result() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        example = os.path.join(tmp, "doc_example.py")
        with open(example, "w") as f:
            f.write(_doc_example())
        report = os.path.join(tmp, "experiment.json")
        runs = run_all(
            [["tests/sharding/_mesh_worker.py", "transformer"], ["tests/sharding/_mesh_worker.py", "optimizer"],
             [example], ["experiments/sharded_train.py", "--cpu-devices", "8", "--data", "2", "--model", "4",
                         "--steps", "2", "--json", report]],
            cpu_env(8), TIMEOUT_S)
        out = {}
        for code, log in runs:
            assert code == 0, f"subprocess failed (exit {code}, -9 = killed after {TIMEOUT_S} s):\n{log[-4000:]}"
        for code, log in runs[:2]:
            line = [ln for ln in log.splitlines() if ln.startswith("RESULT")]
            assert line, log[-4000:]
            out.update(json.loads(line[-1][len("RESULT"):]))
        out["doc_example_output"] = runs[2][1].strip().splitlines()[-1]
        with open(report) as f:
            out["experiment"] = json.load(f)
    return out


COLUMN = ("query", "key", "value", "fc1")
ROW = ("out", "fc2")


def expected(layer: str, fsdp: str | None) -> dict:
    """Hand-derived specs: column-parallel kernel P(fsdp, model), row-parallel P(model, fsdp)."""
    name = layer.split(".")[-2]
    if name in COLUMN:
        return {"a": [fsdp, None], "b": [None, "model"], "mu": [fsdp, "model"], "nu": [fsdp, "model"]}
    assert name in ROW, layer
    return {"a": ["model", None], "b": [None, fsdp], "mu": ["model", fsdp], "nu": ["model", fsdp]}


def test_eight_devices(result):
    assert result["devices"] == 8


def test_doc_example_and_experiment_run_on_8_devices(result):
    printed = result["doc_example_output"]  # "<loss> P(None, 'model') (64, 64)"
    assert float(printed.split()[0]) > 0
    assert "P(None, 'model')" in printed and printed.endswith("(64, 64)")
    exp = result["experiment"]
    assert exp["mesh"] == {"data": 2, "model": 4} and len(exp["losses"]) == 2
    assert exp["moment_bytes_per_device"] * 4 == exp["moment_bytes_global"]  # moments split 4 ways over "model"


@pytest.mark.parametrize("run", ["explicit_tp", "auto_fsdp_tp"])
def test_sharded_training_equals_single_device_fp32(result, run):
    r = result[run]
    for got, ref in zip(r["losses"], result["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref)
    for what in ("lora", "mu", "nu"):
        assert r["err"][what] <= 1e-4, (run, what, r["err"])


def test_sharded_training_equals_single_device_float64(result):
    r = result["x64_explicit_fsdp_tp"]
    assert r["dtype"] == "float64"
    for what in ("lora", "mu", "nu"):
        assert r["err"][what] <= 1e-10, (what, r["err"])


@pytest.mark.parametrize("run,fsdp", [("explicit_tp", None), ("auto_fsdp_tp", "data")])
def test_pairs_and_moments_follow_the_base_kernel_at_every_step(result, run, fsdp):
    specs = result[run]["specs"]
    assert len(specs) == 4  # after init and after each of the 3 steps
    layers = set(specs[0])
    assert {lay.split(".")[-2] for lay in layers} == set(COLUMN + ROW)
    for k, per_layer in enumerate(specs):
        assert set(per_layer) == layers
        for layer, got in per_layer.items():
            want = expected(layer, fsdp)
            for field in ("a", "b", "mu", "nu"):
                assert got[field] == want[field], (run, k, layer, field, got[field])
            # the moments are full size (kernel shape), not low rank
            n_m = {"fc1": [24, 40], "fc2": [40, 24]}.get(layer.split(".")[-2], [24, 24])
            assert got["mu_shape"] == n_m and got["nu_shape"] == n_m


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_lora_pro_update_alone_equals_single_device(result, mode):
    r = result["update"][mode]
    assert len(r["update_err"]) == 3
    assert max(r["update_err"]) <= 1e-5, r["update_err"]
    assert r["state_err"]["mu"] <= 1e-5 and r["state_err"]["nu"] <= 1e-5, r["state_err"]


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_shard_optimizer_state_keeps_its_sharding(result, mode):
    r = result["update"][mode]
    assert r["mu_spec_init"] == ["data", "model"]
    assert r["specs_after"]["col"] == {"a": ["data", None], "b": [None, "model"], "mu": ["data", "model"],
                                       "nu": ["data", "model"]}
    assert r["specs_after"]["row"] == {"a": ["model", None], "b": [None, "data"], "mu": ["model", "data"],
                                       "nu": ["model", "data"]}
    # nnx.LinearGeneral kernel (n, heads, head_dim) ~ P(data, model, None)
    assert r["specs_after"]["gen"] == {"a": ["data", None], "b": [None, "model", None], "mu": ["data", "model", None],
                                       "nu": ["data", "model", None]}


def test_nnx_optimizer_with_shard_optimizer_on_explicit_mesh(result):
    r = result["nnx_optimizer"]
    assert r["kernel"] == ["data", "model"]
    assert r["mu_before"] == ["data", "model"] and r["mu_after"] == ["data", "model"]
    assert r["nu_after"] == ["model", "data"]
    assert r["a_after"] == ["data", None] and r["b_after"] == [None, "model"]


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_no_full_weight_collective_or_array_in_lora_pro_update(result, mode):
    """The compiled update (kernels 64 x 96, 96 x 64, 64 x (4, 24); r = 4; FSDP x TP) only communicates
    low-rank blocks."""
    dims = result["update_dims"]
    n, m, r = dims["n"], dims["m"], dims["r"]
    coll = result["update"][mode]["collectives"]
    assert coll, "expected all-reduces of the r x r / n x r / r x m contractions"
    for op, shapes in coll:
        assert op != "all-gather", (op, shapes)
        for s in shapes:
            assert math.prod(s) <= max(n, m) * r, (op, shapes)
    shapes = {tuple(s) for s in result["update"][mode]["all_shapes"]}
    # no device materialises a full kernel-sized array ...
    assert not shapes & {(n, m), (m, n), (n, 4, m // 4)}
    # ... only the moments' local shards
    assert {(n // 2, m // 4), (m // 4, n // 2), (n // 2, 1, m // 4)} <= shapes


@pytest.mark.parametrize("run", ["explicit_tp", "auto_fsdp_tp"])
def test_no_kernel_sized_collective_in_train_step(result, run):
    """Whole step (forward, backward, LoRA-Pro update): no collective moves a base-kernel-shaped array.

    FSDP's forward all-gathers of W0 shards over "data" are expected (they stay sharded over "model");
    a gathered LoRA-Pro moment or a full W0 gradient would have a kernel's global shape.
    """
    kernels = {tuple(s) for s in result["kernel_shapes"]}
    kernels |= {s[::-1] for s in kernels}
    for op, shapes in result[run]["collectives"]:
        for s in shapes:
            assert tuple(s) not in kernels, (run, op, shapes)
