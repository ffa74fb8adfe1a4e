"""Benchmarks of lorapro_jax (not part of the library API).

Run ``python -m benchmarks.bench_optimizers --help``; results and how to read them: ``docs/benchmarks.md``.

Importing this package pins OpenBLAS to one thread (``OPENBLAS_NUM_THREADS=1``) unless the variable is
already set, and only if NumPy/SciPy have not been imported yet (otherwise it has no effect; the
benchmark records the value it ran with). On CPU, JAX's LAPACK kernels (QR, SVD, eigh — used by the
LoRA-Pro Sylvester solve and the lean form) run in SciPy's OpenBLAS, whose own thread pool competes with
XLA's; on a loaded 2-core machine we measured 256 x 128 QR / 128 x 128 SVD / eigh calls taking up
to ~250x longer with the default threading than with one thread, and the lean form up to 253x slower
than LoRA instead of 1.9-3.4x (see docs/benchmarks.md).
"""

import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
