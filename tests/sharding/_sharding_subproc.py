"""Runs helper scripts in fresh Python processes (XLA_FLAGS / jax.distributed need a fresh process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(n_devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    if n_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_all(commands: list[list[str]], env: dict[str, str], timeout: float) -> list[tuple[int, str]]:
    """Starts every command at once; returns ``[(returncode, stdout+stderr)]``.

    Every process still running after ``timeout`` seconds (shared deadline) is killed and reported
    with return code ``-9``; output goes through temporary files so that no pipe can block.
    """
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [
        subprocess.Popen([sys.executable, *cmd], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        for cmd, log in zip(commands, logs)
    ]
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for i, p in enumerate(procs):
        if codes[i] is None:
            p.kill()
            p.wait()
            codes[i] = -9
    out = []
    for code, log in zip(codes, logs):
        log.seek(0)
        out.append((code, log.read()))
        log.close()
    return out
