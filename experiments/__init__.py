"""Experiments built on :mod:`lorapro_jax`: the fine-tuning CLI, sweeps, result tables and plots.

* ``python -m experiments.finetune``: fine-tune with LoRA, LoRA-Pro, LoRA-GA, LoRA+, PRILoRA, ALoRA or
  full fine-tuning; with no arguments it runs the embedded CPU demo (all-MiniLM-L6-v2 on BBC News,
  LoRA vs LoRA-Pro vs full fine-tuning); ``--task local --data-files ...`` trains on your own files.
* ``python -m experiments.sweep``: method x learning-rate grid x seeds; the lr chosen on validation,
  test mean ± std with bootstrap 95 % intervals, tables and plots.
* ``python -m experiments.report``: table (and mean ± std over seeds) of ``runs/*/summary.json``.
* ``python -m experiments.plot``: loss / accuracy curves of ``runs/*/metrics.jsonl`` as a PNG.
* ``experiments/configs/``: JSON configs (``--config``), e.g. the LoRA-Pro paper's T5-base GLUE table.

Importing this package (which ``python -m experiments.<module>`` does first) pins OpenBLAS to one thread
(``OPENBLAS_NUM_THREADS=1``, unless set, and only before NumPy is imported): on CPU, JAX's eigh / QR / SVD (the
LoRA-Pro Sylvester solve, the lean form, LoRA-GA) run in OpenBLAS, whose thread pool competes with XLA's and made
small calls up to ~250x slower on a loaded 2-core machine (see ``docs/benchmarks.md``). It also silences
transformers' advisory "PyTorch was not found" warning (``TRANSFORMERS_NO_ADVISORY_WARNINGS=1``): only its
tokenizers are used here, which need no PyTorch.
"""

import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "transformers" not in sys.modules:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
