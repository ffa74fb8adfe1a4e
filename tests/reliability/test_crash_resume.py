"""SIGKILL during a training step and during checkpoint saves; ``--resume`` gives bitwise the uninterrupted run.

Each case runs tests/reliability/crash_train.py (LoRA-Pro full form, LoRA dropout, a checkpoint every
step, ``max_to_keep=2``) in a subprocess that kills itself with SIGKILL at a deterministic point, then
resumes it in a fresh process and compares every leaf of the final model, optimizer state and RNG state
with an uninterrupted run: bitwise equal (CPU, fp32). A partial checkpoint is never loaded: the
resumed run reports which step it started from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Multi-device, multi-process or SIGKILL runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("crash_train.py")
STEPS = 5


def _run(run_dir: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LORAPRO_TEST_FAULT"}
    env.update(JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
    if fault:
        env["LORAPRO_TEST_FAULT"] = fault
    return subprocess.run([sys.executable, str(SCRIPT), str(run_dir), str(STEPS), *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


def _start(res: subprocess.CompletedProcess) -> int:
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    return int(line.split()[1].removeprefix("start="))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    res = _run(d)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(d / "final.npz"))


# (fault, step the resumed run must start from, log line expected while resuming)
CASES = [
    ("step-done:3", 2, None),  # step 3 trained in memory, killed before its checkpoint
    ("save-mid-write:6", 2, "removing the unfinished checkpoint"),  # optimizer group of step 3 half written
    ("save-before-rename:4", 3, "removing the unfinished checkpoint"),  # step 4 written, not committed
    ("delete-old:2", 4, None),  # killed while deleting step 2 after committing step 4
]


@pytest.mark.slow
@pytest.mark.parametrize("fault,resume_from,log", CASES, ids=[c[0] for c in CASES])
def test_sigkill_then_resume_is_bitwise(tmp_path, reference, fault, resume_from, log):
    killed = _run(tmp_path, fault=fault)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert not (tmp_path / "final.npz").exists()
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _start(resumed) == resume_from, resumed.stdout
    if log:
        assert log in resumed.stderr
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (tmp_path / "ckpt").iterdir())
    final = dict(np.load(tmp_path / "final.npz"))
    assert final.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(final[k], reference[k], err_msg=k)


@pytest.mark.slow
def test_corrupt_latest_is_skipped(tmp_path, reference):
    """A latest checkpoint whose arrays were damaged on disk: resume logs it and falls back one step."""
    killed = _run(tmp_path, fault="step-done:4")  # checkpoints 2 and 3 on disk
    assert killed.returncode == -signal.SIGKILL
    for f in (tmp_path / "ckpt" / "3" / "optimizer").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    resumed = _run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping corrupt checkpoint step 3" in resumed.stderr and _start(resumed) == 2
    final = dict(np.load(tmp_path / "final.npz"))
    for k in reference:
        np.testing.assert_array_equal(final[k], reference[k], err_msg=k)


def test_control_other_init_differs(tmp_path, reference, monkeypatch):
    """The comparison can fail: the same run from another LoRA init ends elsewhere."""
    monkeypatch.setenv("LORAPRO_TEST_SEED", "2")
    res = _run(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    final = dict(np.load(tmp_path / "final.npz"))
    differ = [k for k in reference if not np.array_equal(final[k], reference[k])]
    assert any("lora" in k for k in differ), differ
