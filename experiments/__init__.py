"""Experiments built on :mod:`lorapro_jax`: the fine-tuning CLI, result tables and plots.

* ``python -m experiments.finetune``: fine-tune with LoRA, LoRA-Pro, LoRA-GA, LoRA+, PRILoRA, ALoRA or
  full fine-tuning; with no arguments it runs the embedded CPU demo (all-MiniLM-L6-v2 on BBC News,
  LoRA vs LoRA-Pro vs full fine-tuning).
* ``python -m experiments.report``: table (and mean ± std over seeds) of ``runs/*/summary.json``.
* ``python -m experiments.plot``: loss / accuracy curves of ``runs/*/metrics.jsonl`` as a PNG.
* ``experiments/configs/``: JSON configs (``--config``), e.g. the LoRA-Pro paper's T5-base GLUE table.
"""
