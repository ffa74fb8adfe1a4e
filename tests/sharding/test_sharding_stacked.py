"""Sharding specs of stacked LoRA pairs (scan-over-layers model): layer axis replicated or on a `layers` axis."""

import json
import sys

import pytest

from _sharding_subproc import cpu_env, run_all
from jax.sharding import PartitionSpec as P

from _stacked_models import twins  # noqa: E402

import lorapro_jax as lp  # noqa: E402
from lorapro_jax import sharding as sh  # noqa: E402

# Multi-device runs in subprocesses: the slow tier.
pytestmark = pytest.mark.slow


def _specs(**kw):
    model, _ = twins(seed=0, a_mask=True, track_input_norm=True)
    rules = sh.tensor_parallel_rules(column=("q",), row=("g",))
    return model, sh.lora_partition_specs(model, rules, **kw)


def test_per_layer_rules_leave_the_layer_axis_replicated():
    model, specs = _specs()
    q = specs["layers"]["q"]
    assert q["lora"].get_value() == lp.LoraPair(P(None, None, None), P(None, None, "model"), 2.0, in_ndim=1)
    assert q["base"]["kernel"].get_value() == P(None, None, "model")
    assert q["base"]["bias"].get_value() == P(None, "model")
    assert q["gate"].get_value() == P(None, None) and q["a_mask"].get_value() == P(None, None, None)
    g = specs["layers"]["g"]["lora"].get_value()  # row-parallel LinearGeneral: input axis on "model"
    assert g.a == P(None, "model", None) and g.b == P(None, None, None, None)
    e = specs["layers"]["e"]["lora"].get_value()  # no rule: replicated, batch axis included
    assert e.a == P(None, None, None, None) and e.b == P(None, None, None, None)


def test_stack_axis_and_full_length_rules_shard_the_layer_axis():
    model, specs = _specs(stack_axis="layers")
    q = specs["layers"]["q"]
    assert q["lora"].get_value().a == P("layers", None, None)
    assert q["lora"].get_value().b == P("layers", None, "model")
    assert q["base"]["kernel"].get_value() == P("layers", None, "model")
    assert q["gate"].get_value() == P("layers", None)
    assert q["input_norm"].get_value() == P("layers", None)
    full = sh.lora_partition_specs(model, [(r".*q\.kernel", P(None, "model", None))], stack_axis="layers")
    assert full["layers"]["q"]["lora"].get_value().a == P(None, "model", None)  # a full-length rule wins


def test_optimizer_state_specs_of_stacked_pairs():
    import optax
    from flax import nnx

    model, _ = twins(seed=1)
    pspecs = sh.lora_partition_specs(model, sh.tensor_parallel_rules(column=("q",)), stack_axis="layers",
                                     wrt=lp.LoRAParam)
    params = nnx.state(model, lp.LoRAParam)
    st = sh.optimizer_state_specs(optax.adam(1e-3), nnx.as_pure(params), nnx.as_pure(pspecs))
    mu = st[0].mu["layers"]["q"]["lora"]
    assert mu.a == P("layers", None, None) and mu.b == P("layers", None, "model")
    assert sh.moment_spec(mu) == P("layers", None, "model")


def test_stacked_model_on_8_devices_matches_one_device():
    [(code, log)] = run_all([["tests/sharding/_stacked_worker.py"]], cpu_env(), 300)
    assert code == 0, log[-4000:]
    res = json.loads([ln for ln in log.splitlines() if ln.startswith("RESULT")][0][len("RESULT "):])
    assert res["forward"] < 1e-5 and res["params"] < 1e-4, res
    assert res["q_a"] == ["layers", None, None] and res["q_b"] == ["layers", None, "model"]
    assert res["q_kernel"] == ["layers", None, "model"]
    assert res["g_b"] == ["layers", None, None, "model"] and res["g_gate"] == ["layers", None]
