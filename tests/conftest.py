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

# Per-test time budget of the quick tier (``-m "not slow"``), enforced where LORAPRO_TEST_BUDGET_S is set
# (.ci/run sets it): a quick test whose call phase takes longer than the budget, or whose setup (module and
# session fixtures included) takes longer than LORAPRO_TEST_SETUP_BUDGET_S, fails with a message saying so.
# This keeps the quick tier from creeping back to half an hour; long tests belong in the ``slow`` tier.
_CALL_BUDGET = float(os.environ.get("LORAPRO_TEST_BUDGET_S") or 0)
_SETUP_BUDGET = float(os.environ.get("LORAPRO_TEST_SETUP_BUDGET_S") or 2 * _CALL_BUDGET)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    budget = {"call": _CALL_BUDGET, "setup": _SETUP_BUDGET}.get(report.when, 0.0)
    if budget and report.passed and "slow" not in item.keywords and report.duration > budget:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: {report.when} took {report.duration:.1f} s, over the quick tier's {budget:g} s "
            "budget; make it cheaper (share a compiled step or model through a fixture) or mark it slow"
        )


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats enabled (for tight comparisons against NumPy)."""
    with jax.enable_x64(True):
        yield
