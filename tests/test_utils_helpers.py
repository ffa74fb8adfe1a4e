"""lorapro_jax._utils: the helpers every module shares, against JAX's own key paths and PEFT's target rule."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lorapro_jax import _utils


def test_path_string_matches_jax_key_names():
    tree = {"layers": [{"q": np.zeros(1)}, {"q": np.zeros(2)}], "head": (np.zeros(3),)}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    got = sorted(_utils.path_string(p, "/") for p, _ in flat)
    assert got == ["head/0", "layers/0/q", "layers/1/q"]
    # the same names as jax's keystr, with the separator of the caller
    for p, _ in flat:
        assert _utils.path_string(p) == jax.tree_util.keystr(p, simple=True, separator=".")


def test_path_string_of_nnx_module_paths():
    model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    paths = {_utils.path_string(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
    assert paths == {"layers.0", "layers.1"}


def test_unwrap_and_is_variable():
    v = nnx.Param(np.arange(3.0))
    assert _utils.is_variable(v) and not _utils.is_variable(np.arange(3.0))
    np.testing.assert_array_equal(_utils.unwrap(v), np.arange(3.0))
    x = np.ones(2)
    assert _utils.unwrap(x) is x


def test_matches_targets_is_peft_rule():
    assert _utils.matches_targets(r".*\.(query|value)", "encoder.layer.0.attention.self.query")
    assert not _utils.matches_targets(r"query", "encoder.layer.0.attention.self.query")  # fullmatch, not search
    assert _utils.matches_targets(["query"], "encoder.self.query") and _utils.matches_targets(["query"], "query")
    assert not _utils.matches_targets(["query"], "encoder.self.subquery")


def test_norm_prefix_and_fit_report():
    assert [_utils.norm_prefix(p) for p in ("", "bert", "bert.")] == ["", "bert.", "bert."]
    assert _utils.fit_report([], ["x"], ["y: 1 vs 2"]) == ["unexpected keys (1): ['x']", "shape mismatches (1): ['y: 1 vs 2']"]
    assert _utils.fit_report(["a"], [], [], labels=("gone", "extra", "shape"), counts=False) == ["gone: ['a']"]
