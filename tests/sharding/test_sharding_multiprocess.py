"""Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives, 2 CPU devices each) versus one.

The workers (_mp_worker.py) build a ("data"=2, "model"=2) mesh over the 4 devices; the "data" axis runs
across the processes, so each process feeds only its half of every global batch. They must reproduce
what one process computes on the full batches:
  * 3 LoRA-Pro AdamW (full form) steps of a tiny transformer: LoRA factors and full-size moments, fp32,
    max|x - ref| / max|ref| <= 1e-4 per leaf (measured < 1e-6; the bound is the one of the 8-device test,
    whose rationale — Adam normalising near-zero gradient entries — applies here as well);
  * the LoRA-GA full-gradient estimate (lorapro_jax.init.estimate_full_gradients, mean of dL/dW0 over
    2 batches) with the per-process halves: <= 1e-5 (measured ~3e-7).
The coordinator port comes from binding port 0; every process is killed if the group takes > 120 s.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

# Multi-device, multi-process or SIGKILL runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow
from _sharding_subproc import cpu_env, free_port, run_all

TIMEOUT_S = 120  # whole group; ~25 s of CPU per process


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f) for f in ("p0.npz", "p1.npz", "single.npz")]
        port = free_port()
        worker = "tests/sharding/_mp_worker.py"
        runs = run_all(
            [[worker, "worker", "0", "2", str(port), files[0]],
             [worker, "worker", "1", "2", str(port), files[1]],
             [worker, "single", files[2]]],
            cpu_env(),
            TIMEOUT_S,
        )
        for name, (code, log) in zip(("process 0", "process 1", "single process"), runs):
            assert code == 0, f"{name} failed (exit {code}; -9 = killed after {TIMEOUT_S} s):\n{log[-4000:]}"
        loaded = [dict(np.load(f)) for f in files]
    return loaded


def _rel(x, y) -> float:
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def test_two_processes_two_devices_each(results):
    p0, p1, _ = results
    for i, p in enumerate((p0, p1)):
        assert int(p["process_count"]) == 2 and int(p["device_count"]) == 4
    # each process fed one half of the global batch of 8
    assert p0["rows"].tolist() == [0, 4] and p1["rows"].tolist() == [4, 8]
    # the (16, 32) fc1 moment is split over "model" (2 devices): no process holds it whole on a device
    assert p0["mu_fc1_local_shard_shape"].tolist() == [16, 16]


def test_lora_pro_training_matches_single_process(results):
    p0, p1, single = results
    np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-5)
    keys = [k for k in single if k.startswith(("lora/", "mu/"))]
    assert any(k.startswith("mu/") for k in keys) and len(keys) == 3 * 6  # a, b, mu of 6 adapted kernels
    for k in keys:
        assert p0[k].shape == single[k].shape, k
        assert _rel(p0[k], single[k]) <= 1e-4, (k, _rel(p0[k], single[k]))
        np.testing.assert_array_equal(p0[k], p1[k])  # both processes hold the same global result


def test_lora_ga_gradient_estimate_is_the_cross_process_mean(results):
    p0, p1, single = results
    keys = [k for k in single if k.startswith("ga/")]
    assert len(keys) == 6
    for k in keys:
        assert np.abs(single[k]).max() > 0, k
        assert _rel(p0[k], single[k]) <= 1e-5, (k, _rel(p0[k], single[k]))
        np.testing.assert_array_equal(p0[k], p1[k])
