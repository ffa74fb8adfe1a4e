"""Shared static-shape rank machinery: gates, masks, budgets, schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorapro_jax import LoraConfig, apply_lora, lora_layers
from lorapro_jax.rank import (
    active_budget,
    active_ranks,
    cubic_budget_schedule,
    cubic_schedule,
    flat_gates,
    is_update_step,
    rank_gates,
    rank_slots,
    set_a_masks,
    set_active_ranks,
    set_flat_gates,
    set_rank_gates,
    zero_masked_factors,
)

DIMS = (7, 6, 6, 5)


def _model(toy, rank=4, **cfg):
    m = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    apply_lora(m, LoraConfig(rank=rank, alpha=8.0, **cfg), rngs=nnx.Rngs(1))
    return m


def test_flat_gates_roundtrip_and_slot_order(toy):
    m = _model(toy)
    slots = rank_slots(m)
    assert slots[:5] == [("layers.0", 0), ("layers.0", 1), ("layers.0", 2), ("layers.0", 3), ("layers.1", 0)]
    v = jnp.arange(len(slots), dtype=jnp.float32)
    set_flat_gates(m, v)
    g = rank_gates(m)
    for k, (p, i) in enumerate(slots):
        assert float(g[p][i]) == k
    np.testing.assert_array_equal(flat_gates(m), v)
    with pytest.raises(ValueError, match="all rank slots"):
        set_flat_gates(m, jnp.ones(3))


def test_set_errors_name_the_path(toy):
    m = _model(toy)
    with pytest.raises(ValueError, match="layers.9"):
        set_rank_gates(m, {"layers.9": jnp.ones(4)})
    with pytest.raises(ValueError, match="layers.0.*shape"):
        set_rank_gates(m, {"layers.0": jnp.ones(3)})
    with pytest.raises(ValueError, match="layers.0.*a_mask"):
        set_a_masks(m, {"layers.0": jnp.ones((7, 4))})
    with pytest.raises(ValueError, match="layers.2.*outside"):
        set_active_ranks(m, {"layers.0": 1, "layers.1": 2, "layers.2": 5})
    with pytest.raises(ValueError, match="no value for LoRA layers"):
        set_active_ranks(m, {"layers.0": 1})


def test_set_active_ranks_equals_true_rank_r_lora(toy):
    """Static allocation at r_max with gates == a true rank-r layer made of the first r columns, scale alpha/r."""
    m = _model(toy, rank=5, a_mask=True)
    toy.randomize_b(m, jax.random.key(2))
    before = {p: (np.asarray(l.pair.a), np.asarray(l.pair.b)) for p, l in lora_layers(m).items()}
    ranks = {"layers.0": 2, "layers.1": 5, "layers.2": 0}
    cfg = LoraConfig(rank=5, alpha=8.0)
    set_active_ranks(m, ranks, config=cfg)
    assert active_ranks(m) == ranks and active_budget(m) == 7
    x = np.random.default_rng(0).normal(size=(9, 7))
    # Independent reference: a plain NumPy MLP with rank-r factors (first r columns) and scale alpha / r.
    h = x
    for k, (p, layer) in enumerate(lora_layers(m).items()):
        r = ranks[p]
        a, b = before[p]
        w, bias = np.asarray(layer.base.kernel[...], np.float64), np.asarray(layer.base.bias[...], np.float64)
        h = h @ w + bias + ((8.0 / r) * (h @ a[:, :r]) @ b[:r] if r else 0.0)
        h = np.tanh(h) if k < 2 else h
        # masked slots were zeroed (raw = effective), scale set from the active rank
        np.testing.assert_array_equal(np.asarray(layer.pair.a)[:, r:], 0.0)
        np.testing.assert_array_equal(np.asarray(layer.pair.b)[r:], 0.0)
        np.testing.assert_array_equal(np.asarray(layer.a_mask[...])[:, r:], 0.0)
        if r:
            assert layer.pair.scale == pytest.approx(8.0 / r)
    np.testing.assert_allclose(np.asarray(toy.forward(m, jnp.asarray(x, jnp.float32))), h, rtol=1e-4, atol=1e-5)


def test_zero_masked_factors_keeps_output_and_zeroes_raw(toy):
    m = _model(toy, rank=4, a_mask=True)
    toy.randomize_b(m, jax.random.key(3))
    rng = np.random.default_rng(1)
    masks = {p: (rng.random(l.pair.a.shape) > 0.4).astype(np.float32) for p, l in lora_layers(m).items()}
    set_a_masks(m, masks)
    set_rank_gates(m, {"layers.1": jnp.array([1.0, 0.0, 1.0, 0.0])})
    x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    y0 = np.asarray(toy.forward(m, x))
    np.testing.assert_allclose(y0, toy.np_forward(m, x), rtol=1e-4, atol=1e-5)
    zero_masked_factors(m)
    np.testing.assert_allclose(np.asarray(toy.forward(m, x)), y0, rtol=1e-6, atol=1e-6)
    for p, l in lora_layers(m).items():
        assert np.all(np.asarray(l.pair.a)[masks[p] == 0] == 0)
    l1 = lora_layers(m)["layers.1"]
    np.testing.assert_array_equal(np.asarray(l1.pair.a)[:, [1, 3]], 0.0)
    np.testing.assert_array_equal(np.asarray(l1.pair.b)[[1, 3]], 0.0)
    assert np.any(np.asarray(l1.pair.b)[[0, 2]] != 0)


def _adalora_reference(t, init, target, t_init, t_final, total):
    # written from the AdaLoRA paper's schedule, float64
    if t <= t_init:
        return init
    if t >= total - t_final:
        return target
    frac = (t - t_init) / (total - t_final - t_init)
    return int(np.floor(target + (init - target) * (1 - frac) ** 3 + 1e-9))


@pytest.mark.parametrize("init,target", [(96, 48), (64, 64), (10, 30)])
def test_cubic_budget_schedule_matches_reference(init, target):
    kw = dict(init_budget=init, target_budget=target, t_init=20, t_final=30, total_steps=200)
    vals = [cubic_budget_schedule(t, **kw) for t in range(201)]
    ref = [_adalora_reference(t, init, target, 20, 30, 200) for t in range(201)]
    assert vals == ref
    assert all(isinstance(v, int) for v in vals)
    # monotone between the two plateaus
    d = np.diff(vals)
    assert np.all(d <= 0) if init >= target else np.all(d >= 0)
    with pytest.raises(ValueError):
        cubic_budget_schedule(0, init_budget=1, target_budget=1, t_init=50, t_final=60, total_steps=100)


def test_cubic_schedule_and_update_steps():
    assert cubic_schedule(0, init_value=0.0, final_value=0.5, start=10, end=20) == 0.0
    assert cubic_schedule(15, init_value=0.0, final_value=0.5, start=10, end=20) == pytest.approx(0.5 - 0.5 * 0.125)
    assert cubic_schedule(99, init_value=0.0, final_value=0.5, start=10, end=20) == pytest.approx(0.5)
    jitted = jax.jit(lambda t: cubic_schedule(t, init_value=0.0, final_value=0.5, start=10, end=20))
    for t in (0, 12, 15, 19, 30):
        ref = 0.5 - 0.5 * (1 - min(max((t - 10) / 10, 0), 1)) ** 3
        assert float(jitted(jnp.int32(t))) == pytest.approx(ref, abs=1e-6)
    steps = [t for t in range(40) if is_update_step(t, start=5, end=25, every=7)]
    assert steps == [5, 12, 19]
    assert bool(jax.jit(lambda t: is_update_step(t, start=5, end=25, every=7))(jnp.int32(19)))
    with pytest.raises(ValueError):
        is_update_step(3, start=0, end=9, every=0)
