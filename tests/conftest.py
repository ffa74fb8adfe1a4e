"""Shared test setup: offline, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's CPU eigh/QR/SVD call LAPACK through OpenBLAS, whose thread pool makes small (r x r) calls
# erratic and up to 100x slower on a busy 2-core machine (measured in benchmarks/); one thread is faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled (for tight comparisons against NumPy)."""
    with jax.enable_x64(True):
        yield
