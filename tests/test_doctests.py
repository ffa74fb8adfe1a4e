"""The ``Examples:`` of the public entry points' docstrings run, and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

# (module, name): every public entry point listed here must have an example that passes.
ENTRY_POINTS = [
    ("lorapro_jax.lora.config", "LoraConfig"),
    ("lorapro_jax.lora.pair", "LoraPair"),
    ("lorapro_jax.lora.nnx_lora", "apply_lora"),
    ("lorapro_jax.optim.lora_pro", "scale_by_lora_pro"),
    ("lorapro_jax.optim.lora_pro", "lora_pro_sgd"),
    ("lorapro_jax.optim.lora_pro", "lora_pro_adamw"),
    ("lorapro_jax.optim.paired", "paired"),
    ("lorapro_jax.optim.nonfinite", "guard_nonfinite"),
    ("lorapro_jax.init.lora_ga", "apply_lora_ga"),
    ("lorapro_jax.checkpoint", "save_adapters"),
    ("lorapro_jax.export", "save_peft_adapter"),
]


@pytest.mark.parametrize("module,name", ENTRY_POINTS, ids=[n for _, n in ENTRY_POINTS])
def test_docstring_examples(module, name):
    obj = getattr(importlib.import_module(module), name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"{module}.{name}", globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 2, f"{module}.{name} has no Examples section with >>> lines"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for t in tests:
        runner.run(t, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0 and result.attempted == examples, "".join(report)
