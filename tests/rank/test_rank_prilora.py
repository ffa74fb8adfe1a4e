"""PRILoRA: linear rank schedule, layer-path mapping, importance pruning of A with masks."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lorapro_jax import LoraConfig, LoRAParam, apply_lora, lora_layers, scale_by_lora_pro
from lorapro_jax.rank import (
    active_ranks,
    apply_prilora,
    layer_index,
    prilora_config,
    prilora_prune,
    prilora_pruning_schedule,
    prilora_rank_schedule,
    prilora_ranks,
    zero_masked_factors,
)

DIMS = (9, 8, 8, 8, 7)  # 4 layers; a shapes (9, r), (8, r), (8, r), (8, r)
DECAY = 0.5


# -- rank schedule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "L,mean,r_min", [(12, 8, None), (4, 8, None), (5, 3, 1), (7, 6, 2), (3, 5, 5), (24, 16, 4), (2, 1, None)]
)
def test_rank_schedule_linear_and_exact_mean(L, mean, r_min):
    ranks = prilora_rank_schedule(L, mean, r_min=r_min)
    r0 = r_min if r_min is not None else max(1, mean // 2)
    r1 = 2 * mean - r0
    exact = r0 + (r1 - r0) * np.arange(L) / max(L - 1, 1)
    assert len(ranks) == L
    assert sum(ranks) == L * mean  # the budget is exactly LoRA's
    assert ranks[0] == r0 and ranks[-1] == (r1 if L > 1 else mean)
    assert np.all(np.abs(np.asarray(ranks) - exact) < 1.0)  # rounding of the exact linear values
    assert np.all(np.diff(ranks) >= 0)
    assert all(isinstance(r, int) for r in ranks)


def test_rank_schedule_paper_example_and_errors():
    r = prilora_rank_schedule(12, 8)
    assert r[0] == 4 and r[-1] == 12 and sum(r) == 96
    assert prilora_rank_schedule(4, 8, r_max=14) == [2, 6, 10, 14]
    with pytest.raises(ValueError, match="r_min \\+ r_max = 2 \\* mean_rank"):
        prilora_rank_schedule(4, 8, r_min=4, r_max=10)
    with pytest.raises(ValueError, match="r_min <= r_max"):
        prilora_rank_schedule(4, 8, r_min=10)


def test_layer_index_on_model_paths():
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert layer_index("encoder.block.3.layer.0.SelfAttention.q") == 3  # T5: the block, not the sub-layer
    assert layer_index("model.layers.5.self_attn.q_proj") == 5
    assert layer_index("layers.2") == 2
    assert layer_index("transformer.h.7.attn.c_attn") == 7
    assert layer_index("enc.stage_4.proj", r"enc\.stage_(\d+)\..*") == 4
    with pytest.raises(ValueError, match="classifier"):
        layer_index("classifier")
    ranks = prilora_ranks([f"encoder.layer.{i}.attention.self.{k}" for i in range(4) for k in ("query", "value")], 8)
    assert ranks["encoder.layer.0.attention.self.query"] == 4 and ranks["encoder.layer.3.attention.self.value"] == 12
    assert ranks["encoder.layer.1.attention.self.query"] == ranks["encoder.layer.1.attention.self.value"] == 7


# -- the two realisations compute the same function ---------------------------------------------------------------
def test_static_mode_equals_per_layer_shapes(toy):
    cfg = LoraConfig(rank=4, alpha=6.0)
    static = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    ranks = apply_prilora(static, cfg, rngs=nnx.Rngs(1), static=True)
    assert list(ranks.values()) == [2, 3, 5, 6]
    assert active_ranks(static) == ranks
    shaped = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    cfg_shaped, ranks2 = prilora_config(shaped, cfg, static=False)
    assert ranks2 == ranks and cfg_shaped.a_mask and cfg_shaped.track_input_norm
    apply_lora(shaped, cfg_shaped, rngs=nnx.Rngs(1))
    toy.randomize_b(static, jax.random.key(4))
    for (p, ls), lt in zip(lora_layers(static).items(), lora_layers(shaped).values()):
        r = ranks[p]
        assert lt.pair.a.shape[-1] == r and ls.pair.a.shape[-1] == 6
        assert lt.pair.scale == ls.pair.scale == pytest.approx(6.0 / r)  # the scale uses the layer's own rank
        lt.lora.set_value(type(lt.pair)(ls.pair.a[:, :r], ls.pair.b[:r], lt.pair.scale))
    x = jax.random.normal(jax.random.key(5), (6, 9))
    y_static, y_shaped = np.asarray(toy.forward(static, x)), np.asarray(toy.forward(shaped, x))
    np.testing.assert_allclose(y_static, y_shaped, rtol=1e-5, atol=1e-6)


# -- pruning -----------------------------------------------------------------------------------------------------
def _prilora_model(toy, rank=4):
    m = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    apply_prilora(m, LoraConfig(rank=rank, alpha=8.0, input_norm_decay=DECAY), rngs=nnx.Rngs(1))
    toy.randomize_b(m, jax.random.key(2))
    return m


def _layer_inputs(model, x):
    """The input of every layer of the toy MLP, computed in NumPy (independent of the layers' statistics)."""
    ins, h = {}, np.asarray(x, np.float64)
    for k, (p, layer) in enumerate(lora_layers(model).items()):
        ins[p] = h
        h = toy_layer(layer, h, last=k == len(lora_layers(model)) - 1)
    return ins


def toy_layer(layer, h, last):
    w, bias = np.asarray(layer.base.kernel[...], np.float64), np.asarray(layer.base.bias[...], np.float64)
    a = np.asarray(layer.pair.a, np.float64) * np.asarray(layer.a_mask[...], np.float64)
    y = h @ w + bias + layer.pair.scale * ((h @ a) * np.asarray(layer.gate[...])) @ np.asarray(layer.pair.b)
    return y if last else np.tanh(y)


def _np_keep_mask(a, norm, mask, keep):
    """Reference: for each row i of the paper's A (column i of a), keep the `keep` largest |A_ij| * norm_j
    among unmasked entries."""
    n, r = a.shape
    out = np.zeros_like(mask)
    for i in range(r):
        alive = np.flatnonzero(mask[:, i])
        s = np.abs(a[alive, i]) * norm[alive]
        top = alive[np.argsort(-s, kind="stable")[: min(keep, alive.size)]]
        out[top, i] = 1
    return out


def test_prune_zeroes_lowest_importance_per_row(toy):
    m = _prilora_model(toy)
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(11, 9)) * rng.uniform(0.2, 3.0, size=9) for _ in range(2)]
    norms = {}
    for x in xs:  # the EMA of ||x_j|| over the batch, computed here independently
        ins = _layer_inputs(m, x)
        for p, h in ins.items():
            norms[p] = DECAY * norms.get(p, 0.0) + (1 - DECAY) * np.sqrt((h**2).sum(0))
        toy.forward(m, jnp.asarray(x, jnp.float32))
    masks = {p: np.asarray(l.a_mask[...]) for p, l in lora_layers(m).items()}
    for step, keep in enumerate([6, 3]):  # two cumulative pruning steps
        a_before = {p: np.asarray(l.pair.a, np.float64) for p, l in lora_layers(m).items()}
        prilora_prune(m, keep=keep)
        for p, layer in lora_layers(m).items():
            ref = _np_keep_mask(a_before[p], norms[p], masks[p], keep)
            np.testing.assert_array_equal(np.asarray(layer.a_mask[...]), ref, err_msg=f"{p} step {step}")
            assert np.all(np.asarray(layer.pair.a)[ref == 0] == 0)  # the A entries are zeroed too
            r = active_ranks(m)[p]
            assert np.all(ref[:, :r].sum(0) == min(keep, ref.shape[0])) and np.all(ref[:, r:] == 0)
            masks[p] = ref
    # the forward pass applies the mask: output equals the NumPy forward with the reference-masked A
    x = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    np.testing.assert_allclose(np.asarray(toy.forward(m, x)), toy.np_forward(m, x, a_mask=masks), rtol=1e-4, atol=1e-5)


def test_prune_fraction_and_jit_without_recompiles(toy):
    m = _prilora_model(toy)
    toy.forward(m, jax.random.normal(jax.random.key(0), (8, 9)))
    traces = {"n": 0}

    @nnx.jit
    def prune(model, fraction):
        traces["n"] += 1
        prilora_prune(model, fraction=fraction)

    ref = _prilora_model(toy)
    toy.forward(ref, jax.random.normal(jax.random.key(0), (8, 9)))
    for f in (0.25, 0.5, 0.6):
        prune(m, jnp.float32(f))
        prilora_prune(ref, fraction=f)  # eager
        for p, layer in lora_layers(m).items():
            n = layer.pair.a.shape[0]
            r = active_ranks(m)[p]
            counts = np.asarray(layer.a_mask[...]).sum(0)
            assert np.all(counts[:r] == n - round(f * n)), (p, f, counts)
            np.testing.assert_array_equal(layer.a_mask[...], lora_layers(ref)[p].a_mask[...])
    assert traces["n"] == 1


def test_prune_multi_axis_input():
    """nnx.LinearGeneral with in_shape (2, 3): rows of A run over the flattened input features."""

    class Gen(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)])

        def __call__(self, x):
            return self.layers[0](x)

    m = Gen(nnx.Rngs(0))
    apply_lora(m, LoraConfig(rank=3, a_mask=True, track_input_norm=True, input_norm_decay=0.0), rngs=nnx.Rngs(1))
    x = np.random.default_rng(3).normal(size=(5, 2, 3)) * np.array([[0.1, 1, 5], [2, 0.3, 1]])
    m(jnp.asarray(x, jnp.float32))
    layer = m.layers[0]
    a = np.asarray(layer.pair.a, np.float64).reshape(6, 3)
    norm = np.sqrt((x**2).sum(0)).reshape(6)
    prilora_prune(m, keep=2)
    ref = _np_keep_mask(a, norm, np.ones((6, 3)), 2)
    np.testing.assert_array_equal(np.asarray(layer.a_mask[...]).reshape(6, 3), ref)


def test_prune_errors(toy):
    m = toy.ToyMLP(DIMS, rngs=nnx.Rngs(0))
    apply_lora(m, LoraConfig(rank=2, a_mask=True), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="track_input_norm"):
        prilora_prune(m, keep=2)
    m2 = _prilora_model(toy)
    with pytest.raises(ValueError, match="all zero"):
        prilora_prune(m2, keep=2)
    with pytest.raises(ValueError, match="exactly one"):
        prilora_prune(m2, keep=2, fraction=0.5)


def test_pruning_schedule():
    kw = dict(start=10, end=40, every=10, final_fraction=0.5)
    got = [(t, round(f, 6)) for t in range(50) for do, f in [prilora_pruning_schedule(t, **kw)] if do]
    assert [t for t, _ in got] == [10, 20, 30, 40]
    ref = [0.5 - 0.5 * (1 - (t - 10) / 30) ** 3 for t in (10, 20, 30, 40)]
    np.testing.assert_allclose([f for _, f in got], ref, atol=1e-6)
    do, f = jax.jit(lambda t: prilora_pruning_schedule(t, **kw))(jnp.int32(20))
    assert bool(do) and float(f) == pytest.approx(ref[1], abs=1e-6)


# -- masked entries stay masked under training, also with LoRA-Pro -------------------------------------------------
def test_masked_entries_stay_masked_with_lora_pro(toy):
    m = _prilora_model(toy)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(16, 9)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 7)), jnp.float32)
    toy.forward(m, x)
    prilora_prune(m, fraction=0.5)
    masks = {p: np.asarray(l.a_mask[...]) for p, l in lora_layers(m).items()}

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    # LoRA gradients are zero on masked entries; LoRA-Pro's adjusted gradients are not.
    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam)))(m)
    params = nnx.state(m, LoRAParam)
    tx = scale_by_lora_pro()
    adjusted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    leaked = 0.0
    for p, layer in lora_layers(m).items():
        keys = [int(k) if k.isdigit() else k for k in p.split(".")]
        node_g, node_u = grads, adjusted
        for k in keys + ["lora"]:
            node_g, node_u = node_g[k], node_u[k]
        ga, ua = np.asarray(node_g.get_value().a), np.asarray(node_u.get_value().a)
        off = masks[p] == 0
        assert np.all(ga[off] == 0)
        leaked = max(leaked, np.abs(ua[off]).max())
    assert leaked > 1e-6  # documented: LoRA-Pro moves masked raw entries

    opt = nnx.Optimizer(m, optax.chain(scale_by_lora_pro(), optax.sgd(0.05)), wrt=LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, g)
        return loss

    losses = [float(step(m, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    raw_nonzero = any(np.any(np.asarray(l.pair.a)[masks[p] == 0] != 0) for p, l in lora_layers(m).items())
    assert raw_nonzero  # the raw a drifted on masked entries ...
    # ... but the effective A is still masked: the output equals the NumPy forward with A * reference mask
    xt = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
    want = toy.np_forward(m, xt, a_mask=masks)
    np.testing.assert_allclose(np.asarray(toy.forward(m, xt)), want, rtol=1e-4, atol=1e-5)
    for p, layer in lora_layers(m).items():
        np.testing.assert_array_equal(np.asarray(layer.a_mask[...]), masks[p])
    y_before = np.asarray(toy.forward(m, xt))
    zero_masked_factors(m)  # raw = effective again; the function is unchanged
    np.testing.assert_allclose(np.asarray(toy.forward(m, xt)), y_before, rtol=1e-6, atol=1e-6)
    for p, layer in lora_layers(m).items():
        assert np.all(np.asarray(layer.pair.a)[masks[p] == 0] == 0)
