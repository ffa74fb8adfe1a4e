"""ALoRA: AB-LoRA ablation importance, budget-conserving reallocation, static shapes (no recompiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lorapro_jax import LoraConfig, LoRAParam, lora_layers, lora_pro_adamw
from lorapro_jax.rank import (
    ablation_importance,
    active_budget,
    active_ranks,
    alora_reallocate,
    alora_schedule,
    alora_step,
    apply_alora,
    apply_prilora,
    cubic_budget_schedule,
    prilora_prune,
    rank_slots,
    score_with_gates,
    zero_masked_factors,
)

DIMS = (8, 8, 8, 8, 8)  # 4 layers
R_INIT, R_MAX = 2, 4


def _alora_model(toy, seed=0, **cfg):
    m = toy.ToyMLP(DIMS, rngs=nnx.Rngs(seed))
    apply_alora(m, LoraConfig(rank=R_INIT, alpha=4.0, **cfg), max_rank=R_MAX, rngs=nnx.Rngs(seed + 1))
    toy.randomize_b(m, jax.random.key(seed + 2), std=0.5)
    return m


def _data(seed=0, n=24):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 8))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def neg_mse(model, batch):
    x, y = batch
    return -jnp.mean((model(x) - y) ** 2)


def test_apply_alora_starts_as_rank_r_lora(toy):
    m = _alora_model(toy)
    assert active_ranks(m) == {f"layers.{i}": R_INIT for i in range(4)}
    for layer in lora_layers(m).values():
        assert layer.pair.a.shape == (8, R_MAX) and layer.pair.scale == pytest.approx(4.0 / R_INIT)
        np.testing.assert_array_equal(np.asarray(layer.pair.a)[:, R_INIT:], 0.0)
    x, _ = _data()
    h = np.asarray(x, np.float64)  # NumPy reference with only the first R_INIT columns, scale alpha / R_INIT
    for k, layer in enumerate(lora_layers(m).values()):
        a, b = np.asarray(layer.pair.a)[:, :R_INIT], np.asarray(layer.pair.b)[:R_INIT]
        h = h @ np.asarray(layer.base.kernel[...]) + np.asarray(layer.base.bias[...]) + 2.0 * (h @ a) @ b
        h = np.tanh(h) if k < 3 else h
    np.testing.assert_allclose(np.asarray(toy.forward(m, x)), h, rtol=1e-4, atol=1e-5)


def test_ablation_importance_equals_brute_force(toy):
    m = _alora_model(toy)
    batch = _data(1)
    # make the allocation uneven so that inactive slots sit between active ones
    alora_reallocate(m, np.arange(16, dtype=np.float32), n_prune=3, key=jax.random.key(0))
    toy.randomize_b(m, jax.random.key(9), std=0.5)
    imp = ablation_importance(m, neg_mse, batch)
    # brute force: edit one gate eagerly, re-run the model, restore
    base = float(neg_mse(m, batch))
    assert float(imp.base_score) == pytest.approx(base, rel=1e-5, abs=1e-6)
    for p, layer in lora_layers(m).items():
        g0 = np.asarray(layer.gate[...])
        for i in range(R_MAX):
            g = g0.copy()
            g[i] = 0.0
            layer.gate[...] = jnp.asarray(g)
            want = base - float(neg_mse(m, batch)) if g0[i] else 0.0
            layer.gate[...] = jnp.asarray(g0)
            assert float(imp.per_layer[p][i]) == pytest.approx(want, rel=1e-3, abs=1e-6), (p, i)
    assert np.any(np.abs(np.asarray(imp.flat)) > 1e-4)
    # vmapped evaluation gives the same numbers
    imp2 = ablation_importance(m, neg_mse, batch, batch_size=4)
    np.testing.assert_allclose(imp2.flat, imp.flat, rtol=1e-4, atol=1e-6)


def test_score_with_gates_rows_and_shape_check(toy):
    m = _alora_model(toy)
    batch = _data(2)
    K = len(rank_slots(m))
    rows = np.ones((2, K), np.float32)
    rows[1] = 0.0
    s = score_with_gates(m, neg_mse, batch, rows)
    for layer in lora_layers(m).values():
        layer.gate[...] = jnp.zeros(R_MAX)
    assert float(s[1]) == pytest.approx(float(neg_mse(m, batch)), rel=1e-5)  # all gates off
    with pytest.raises(ValueError, match="gate_rows must have shape"):
        score_with_gates(m, neg_mse, batch, np.ones((2, K + 1)))


def test_reallocation_prunes_lowest_and_conserves_budget(toy):
    m = _alora_model(toy)
    slots = rank_slots(m)
    # importance: layer 2 most important, layer 0 slot 1 harmful
    imp = np.zeros(len(slots), np.float32)
    table = {("layers.0", 0): 0.3, ("layers.0", 1): -0.5, ("layers.1", 0): 0.2, ("layers.1", 1): 0.05,
             ("layers.2", 0): 0.9, ("layers.2", 1): 0.8, ("layers.3", 0): 0.01, ("layers.3", 1): 0.4}
    for k, s in enumerate(slots):
        imp[k] = table.get(s, 0.0)
    x, _ = _data(3)
    budget = active_budget(m)
    re = alora_reallocate(m, imp, n_prune=3, key=jax.random.key(1))
    assert sorted(re.pruned) == [("layers.0", 1), ("layers.1", 1), ("layers.3", 0)]  # the 3 lowest, harmful first
    assert re.pruned[0] == ("layers.0", 1)
    # receivers: modules with no pruned slot (only layers.2), then the others by mean importance
    assert re.grown[0] == ("layers.2", 2) and re.grown[1] == ("layers.2", 3)
    assert active_budget(m) == budget  # total budget conserved
    assert active_ranks(m)["layers.2"] == 4
    for p, i in re.pruned:
        layer = lora_layers(m)[p]
        if (p, i) not in re.grown:
            assert float(layer.gate[i]) == 0.0 and np.all(np.asarray(layer.pair.b)[i] == 0)


def test_reenabled_ranks_do_not_change_the_output(toy):
    m = _alora_model(toy)
    x, _ = _data(4)
    imp = ablation_importance(m, neg_mse, _data(5))
    # reference output: the model with only the prunes applied (gates of pruned slots off), computed in NumPy
    order = [k for k in np.argsort(np.asarray(imp.flat), kind="stable") if imp.active[k]]
    slots = rank_slots(m)
    gates = {p: np.asarray(l.gate[...]).copy() for p, l in lora_layers(m).items()}
    for k in order[:2]:
        p, i = slots[k]
        gates[p][i] = 0.0
    want = toy.np_forward(m, x, gate=gates)
    re = alora_reallocate(m, imp, n_prune=2, key=jax.random.key(3))
    assert len(re.grown) == 2 and not set(re.grown) & set(re.pruned)
    for p, i in re.grown:
        layer = lora_layers(m)[p]
        assert float(layer.gate[i]) == 1.0
        assert np.all(np.asarray(layer.pair.b)[i] == 0) and np.any(np.asarray(layer.pair.a)[:, i] != 0)
    np.testing.assert_allclose(np.asarray(toy.forward(m, x)), want, rtol=1e-4, atol=1e-5)


def test_budget_schedule_and_min_rank(toy):
    m = _alora_model(toy)
    imp = ablation_importance(m, neg_mse, _data(6))
    sched = dict(init_budget=8, target_budget=5, t_init=0, t_final=2, total_steps=10)
    for step, key in zip((3, 8), jax.random.split(jax.random.key(0), 2)):
        b = cubic_budget_schedule(step, **sched)
        alora_reallocate(m, ablation_importance(m, neg_mse, _data(6)), n_prune=1, budget=b, key=key, min_rank=1)
        assert active_budget(m) == b
        assert min(active_ranks(m).values()) >= 1
    with pytest.raises(ValueError, match="min_rank"):
        alora_reallocate(m, imp.flat, n_prune=5, budget=1, key=jax.random.key(0), min_rank=1)
    with pytest.raises(ValueError, match="shape"):
        alora_reallocate(m, np.zeros(3), n_prune=1, key=jax.random.key(0))
    assert [alora_schedule(t, start=2, end=8, every=3, n_prune=2) for t in range(10)] == [0, 0, 2, 0, 0, 2, 0, 0, 2, 0]


def test_no_recompiles_across_pruning_and_reallocation(toy):
    """One trace of the train step across ALoRA steps and PRILoRA prunes (shapes never change).

    Trained with LoRA-Pro AdamW (full form), the project's main optimizer. (optax.adam through nnx.Optimizer
    currently fails on its second update, independently of rank allocation: nnx.Optimizer.update turns the
    LoraPair nodes of Adam's moments into State dicts.)
    """
    x, y = _data(7, n=32)
    val = _data(8)
    traces = {"train": 0, "score": 0}

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, opt):
        traces["train"] += 1
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, g)
        zero_masked_factors(model)
        return loss

    def score(model, batch):
        traces["score"] += 1
        return neg_mse(model, batch)

    # ALoRA
    m = _alora_model(toy)
    opt = nnx.Optimizer(m, lora_pro_adamw(1e-2), wrt=LoRAParam)
    budget = active_budget(m)
    losses = []
    for step in range(12):
        losses.append(float(train_step(m, opt)))
        n = alora_schedule(step, start=3, end=9, every=3, n_prune=2)
        if n:
            info = alora_step(m, score, val, n_prune=n, key=jax.random.key(step))
            assert info.budget == budget == active_budget(m)
    assert traces["train"] == 1
    assert traces["score"] == 1  # the ablation computation compiled once for all three ALoRA steps
    assert losses[-1] < losses[0]

    # PRILoRA (a new model: one more trace of train_step for its structure, then none)
    m2 = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    apply_prilora(m2, LoraConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    opt2 = nnx.Optimizer(m2, lora_pro_adamw(1e-2), wrt=LoRAParam)
    prune = nnx.jit(lambda model, f: prilora_prune(model, fraction=f))
    for step in range(6):
        train_step(m2, opt2)
        if step % 2 == 1:
            prune(m2, jnp.float32(0.25 * (step // 2 + 1)))
    assert traces["train"] == 2
    for layer in lora_layers(m2).values():
        r = int(jnp.sum(layer.gate[...] != 0))
        assert np.all(np.asarray(layer.a_mask[...]).sum(0)[:r] == 8 - round(0.75 * 8))
        # masked entries stay exactly zero through training (forward mask + zero_masked_factors)
        assert np.all(np.asarray(layer.pair.a)[np.asarray(layer.a_mask[...]) == 0] == 0)
