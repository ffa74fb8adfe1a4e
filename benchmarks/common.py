"""Shared pieces of the benchmarks: the benchmark model, byte counting, compiled-memory stats, timing
statistics and a description of the machine.

Nothing here is timed itself; every helper is deterministic given its inputs.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float

__all__ = [
    "LinearStack",
    "compiled_memory",
    "format_bytes",
    "machine_info",
    "median",
    "quantile",
    "tree_nbytes",
]


class LinearStack(nnx.Module):
    """``num_layers`` square ``nnx.Linear`` layers (no bias) with ``tanh`` between them.

    Layer ``i`` lives at the path ``layers.i``; its kernel is ``(width, width)``. The output layer has no
    activation, so an MSE loss against a target ``(batch, width)`` is an ordinary regression.

    Args:
      width: ``d``, input and output features of every layer.
      num_layers: ``L``.
      rngs: random streams (``params`` initialises the kernels).
      param_dtype: dtype of the kernels.
    """

    def __init__(self, width: int, num_layers: int, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
        if width <= 0 or num_layers <= 0:
            raise ValueError(
                f"LinearStack needs width > 0 and num_layers > 0, got width={width}, num_layers={num_layers}."
            )
        self.layers = nnx.List(
            [nnx.Linear(width, width, use_bias=False, param_dtype=param_dtype, rngs=rngs) for _ in range(num_layers)]
        )

    def __call__(self, x: Float[Array, "batch d"]) -> Float[Array, "batch d"]:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = jnp.tanh(x)
        return x


def _leaf_nbytes(x: Any) -> int:
    if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
    if isinstance(x, (np.generic,)):
        return x.nbytes
    raise TypeError(f"tree_nbytes: leaf of type {type(x).__name__} has no array size (expected an array).")


def tree_nbytes(tree: Any) -> int:
    """Exact bytes held by the array leaves of ``tree`` (sum of ``size * itemsize``; NNX Variables unwrap).

    Raises:
      TypeError: a leaf is not an array (e.g. a Python float), so its device size is undefined.
    """
    return sum(_leaf_nbytes(x) for x in jax.tree.leaves(tree))


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """``memory_analysis()`` of a compiled XLA executable as a dict of byte counts, or ``None``.

    Keys: ``temp`` (scratch buffers of the step), ``argument``, ``output``, ``alias`` (outputs that
    reuse donated argument buffers) and ``peak = argument + output - alias + temp`` (a simple upper
    bound of the live bytes during the step). Backends that do not report return ``None``.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise NotImplementedError, others XlaRuntimeError
        return None
    if stats is None:
        return None
    get = lambda name: int(getattr(stats, name, 0) or 0)
    out = {
        "temp": get("temp_size_in_bytes"),
        "argument": get("argument_size_in_bytes"),
        "output": get("output_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(xs))


def quantile(xs: Sequence[float], q: float) -> float:
    if not xs:
        raise ValueError("quantile of an empty sequence")
    return float(np.quantile(np.asarray(xs, dtype=np.float64), q))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(command: str | None = None) -> dict[str, Any]:
    """Date, command, library versions and the device the benchmark ran on.

    Args:
      command: the command line to record (default: ``python -m benchmarks.bench_optimizers`` plus
        this process's arguments).
    """
    dev = jax.devices()[0]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or " ".join(["python -m benchmarks.bench_optimizers", *map(shlex.quote, sys.argv[1:])]),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu": _cpu_model(),
        "cpu_cores_available": cores,
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset (OpenBLAS default)"),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def format_bytes(n: int | None) -> str:
    """Human-readable bytes (binary units), ``"-"`` for ``None``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
