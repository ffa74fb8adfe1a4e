"""Orbax checkpoints of stacked adapters (scan-over-layers model): save, restore, resume with optimizer state."""

import jax
import numpy as np
import optax
import pytest
from _stacked_models import D, L, Scanned, twins
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.checkpoint import TrainCheckpointer, read_adapter_metadata, restore_adapters, save_adapters


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (3, D))


def test_stacked_adapters_round_trip(tmp_path):
    model, _ = twins(seed=0, a_mask=True, track_input_norm=True)
    model(_x())  # fills the per-slice input-norm statistics
    save_adapters(tmp_path / "ad", model)
    fresh, _ = twins(seed=5, a_mask=True, track_input_norm=True)
    meta = restore_adapters(tmp_path / "ad", fresh)
    assert meta["layers"]["layers.q"]["stack_shape"] == [L]
    assert meta["layers"]["layers.e"]["stack_shape"] == [L, 2]
    for path, layer in lp.lora_layers(fresh).items():
        ref = lp.lora_layers(model)[path]
        assert layer.pair.in_ndim == ref.pair.in_ndim and layer.pair.stack_shape == ref.pair.stack_shape
        for got, want in [(layer.pair.a, ref.pair.a), (layer.pair.b, ref.pair.b), (layer.gate[...], ref.gate[...]),
                          (layer.a_mask[...], ref.a_mask[...]), (layer.input_norm[...], ref.input_norm[...])]:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # base weights differ between the two models (seeds 0 and 5); the adapters alone are restored
    nnx.update(fresh, nnx.state(model, nnx.Not(lp.LoRAParam)))
    for m in (model, fresh):
        for layer in lp.lora_layers(m).values():
            layer.deterministic = True
    np.testing.assert_array_equal(np.asarray(fresh(_x(1))), np.asarray(model(_x(1))))
    assert read_adapter_metadata(tmp_path / "ad")["layers"]["layers.g"]["stack_shape"] == [L]


def test_stacked_checkpoint_does_not_restore_into_the_unrolled_layout(tmp_path):
    model, unrolled = twins(seed=1)
    save_adapters(tmp_path / "ad", model)
    with pytest.raises(ValueError, match=r"not in the checkpoint.*layers\.0\.q"):
        restore_adapters(tmp_path / "ad", unrolled)
    other = lp.apply_lora(Scanned(nnx.Rngs(0)), lp.LoraConfig(rank=2, alpha=4.0, targets=("q", "g", "e")),
                          rngs=nnx.Rngs(1))
    restore_adapters(tmp_path / "ad", other)  # same layout: fine


@pytest.mark.slow
def test_stacked_train_checkpoint_resumes_exactly(tmp_path):
    def build(seed):
        model, _ = twins(seed=seed)
        tx = optax.adam(1e-2)
        return model, lp.LoraOptimizer(model, tx, wrt=lp.LoRAParam)

    def step(model, opt, x):
        def loss(m):
            return (m(x) ** 2).mean()

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, lp.LoRAParam))(model)
        opt.update(model, grads)
        return loss(model)

    xs = [_x(i) for i in range(4)]
    model, opt = build(0)
    straight = [float(step(model, opt, x)) for x in xs]

    model, opt = build(0)
    for x in xs[:2]:
        step(model, opt, x)
    with TrainCheckpointer(tmp_path / "c", async_save=False) as ck:
        ck.save(2, model, opt)
    model2, opt2 = build(3)  # other LoRA init; base weights from the same seed as the saved model's
    nnx.update(model2, nnx.state(model, nnx.Not(lp.LoRAParam)))
    with TrainCheckpointer(tmp_path / "c", async_save=False) as ck:
        ck.restore(model2, opt2)
    resumed = [float(step(model2, opt2, x)) for x in xs[2:]]
    assert resumed == straight[2:]
    mu = jax.tree_util.tree_leaves(opt2.opt_state)
    assert any(getattr(m, "shape", ())[:1] == (L,) for m in mu)
