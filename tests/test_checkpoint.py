"""Tests for lorapro_jax.checkpoint: adapter save/restore and exact training resume.

Exactness claim tested here: on CPU fp32, training N steps straight and training k steps, saving,
rebuilding model + optimizer from scratch (other LoRA init, other RNG seeds), restoring and training
N - k more steps give BITWISE equal losses, parameters and optimizer states (``assert_array_equal``,
zero tolerance).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.checkpoint import (
    TrainCheckpointer,
    read_adapter_metadata,
    restore_adapters,
    save_adapters,
)

N_SAMPLES, BATCH, D_IN = 24, 4, 6
STEPS_PER_EPOCH = N_SAMPLES // BATCH
HEAD = nnx.PathContains("classifier")
WRT = nnx.Any(lp.LoRAParam, HEAD)


class TinyModel(nnx.Module):
    """Two adapted layers (a Linear and a LinearGeneral with a 2-D output) and a trainable head."""

    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Linear(D_IN, 5, rngs=rngs)
        self.value = nnx.LinearGeneral(D_IN, (2, 3), rngs=rngs)
        self.classifier = nnx.Linear(11, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.concatenate([self.query(x), self.value(x).reshape(x.shape[0], -1)], axis=-1)
        return self.classifier(jnp.tanh(h))


LORA_CFG = lp.LoraConfig(
    rank=2, alpha=4.0, targets=["query", "value"], dropout=0.25, a_mask=True, track_input_norm=True
)


# One optimizer object per setting: nnx.jit caches on the graph definition, which holds ``tx``.
TX = {wd: lp.lora_pro_adamw(3e-2, weight_decay=wd, form="full") for wd in (0.0, 0.1)}


def place(*objs):
    """Commits every array to device 0, as a real (sharded) run would; restored arrays are committed
    too, so all runs share one compiled train step (uncommitted inputs would force a recompile)."""
    for obj in objs:
        nnx.update(obj, jax.device_put(nnx.state(obj), jax.devices()[0]))
    return objs if len(objs) > 1 else objs[0]


def build(lora_seed: int, *, weight_decay: float = 0.0):
    """Same 'pretrained' base weights (seed 0) every time; the LoRA init depends on ``lora_seed``."""
    model = TinyModel(nnx.Rngs(0))
    lp.apply_lora(model, LORA_CFG, rngs=nnx.Rngs(params=lora_seed, dropout=lora_seed + 100))
    return place(model, nnx.Optimizer(model, TX[weight_decay], wrt=WRT))


def perturb_rank_state(model):
    """Non-trivial gates/masks (as a rank allocator would leave them), set before training."""
    layers = lp.lora_layers(model)
    layers["query"].gate[...] = jnp.array([1.0, 0.5])
    mask = np.ones(layers["value"].a_mask[...].shape, np.float32)
    mask[1, 0] = 0.0
    mask[4, 1] = 0.0
    layers["value"].a_mask[...] = jnp.asarray(mask)


DATA = np.random.default_rng(123)
X = DATA.normal(size=(N_SAMPLES, D_IN)).astype(np.float32)
Y = DATA.integers(0, 2, size=(N_SAMPLES,)).astype(np.int32)


def batch_at(epoch: int, index: int):
    perm = np.random.default_rng(epoch).permutation(N_SAMPLES)
    idx = perm[index * BATCH : (index + 1) * BATCH]
    return X[idx], Y[idx]


@nnx.jit(static_argnames="decay_w0")
def train_step(model, opt, data_rngs, x, y, decay_w0=False):
    x = x + 0.01 * jax.random.normal(data_rngs.noise(), x.shape)  # consumes the extra RNG stream

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, WRT))(model)
    opt.update(model, grads)
    if decay_w0:
        lp.decay_base_weights(model, lp.base_decay_factor(opt.opt_state))
    return loss


def run(model, opt, data_rngs, pos, n_steps, decay_w0=False):
    epoch, index = pos
    losses = []
    for _ in range(n_steps):
        x, y = batch_at(epoch, index)
        losses.append(np.asarray(train_step(model, opt, data_rngs, jnp.asarray(x), jnp.asarray(y), decay_w0)))
        index += 1
        if index == STEPS_PER_EPOCH:
            epoch, index = epoch + 1, 0
    return losses, (epoch, index)


def all_leaves(obj):
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(obj)):
        for kp, leaf in jax.tree_util.tree_flatten_with_path(var.get_value())[0]:
            key = "/".join(map(str, path)) + jax.tree_util.keystr(kp)
            out[key] = np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)
    return out


def assert_trees_equal(x, y):
    lx, ly = all_leaves(x), all_leaves(y)
    assert lx.keys() == ly.keys()
    for k in lx:
        np.testing.assert_array_equal(lx[k], ly[k], err_msg=k)


N, K = 8, 5  # K < STEPS_PER_EPOCH < N: the resumed run crosses an epoch boundary


def straight_run(decay_w0: bool):
    model, opt = build(1, weight_decay=0.1 if decay_w0 else 0.0)
    perturb_rank_state(model)
    rngs = place(nnx.Rngs(noise=7))
    losses, _ = run(model, opt, rngs, (0, 0), N, decay_w0)
    return model, opt, rngs, losses


@pytest.fixture(scope="module")
def straight():
    return {d: straight_run(d) for d in (False, True)}


@pytest.mark.parametrize("decay_w0", [False, True])
def test_exact_resume_from_scratch(tmp_path, straight, decay_w0):
    ref_model, ref_opt, ref_rngs, ref_losses = straight[decay_w0]
    wd = 0.1 if decay_w0 else 0.0
    also = nnx.Param if decay_w0 else None  # W0 changes under LoRA-Pro's base decay: save it too

    model, opt = build(1, weight_decay=wd)
    perturb_rank_state(model)
    rngs = place(nnx.Rngs(noise=7))
    losses, pos = run(model, opt, rngs, (0, 0), K, decay_w0)
    np.testing.assert_array_equal(losses, ref_losses[:K])
    with TrainCheckpointer(tmp_path / "ckpt", also_save=also) as ckpt:
        assert ckpt.save(None, model, opt, rngs=rngs, data_state={"epoch": pos[0], "index": pos[1]})
        ckpt.wait_until_finished()
    del model, opt, rngs

    # a new process would do this: fresh objects with other LoRA init / RNG seeds, then restore
    model2, opt2 = build(2, weight_decay=wd)
    rngs2 = place(nnx.Rngs(noise=99))
    with TrainCheckpointer(tmp_path / "ckpt", also_save=also) as ckpt:
        info = ckpt.restore(model2, opt2, rngs=rngs2)
    assert info.step == K and info.data_state == {"epoch": 0, "index": K}
    assert int(opt2.step[...]) == K
    losses2, _ = run(model2, opt2, rngs2, (info.data_state["epoch"], info.data_state["index"]), N - K, decay_w0)

    np.testing.assert_array_equal(losses2, ref_losses[K:])
    assert_trees_equal(model2, ref_model)
    assert_trees_equal(opt2, ref_opt)
    assert_trees_equal(rngs2, ref_rngs)
    # the full-form moments (kernel-sized, per pair) are among the compared leaves
    mu = opt2.opt_state[0].mu
    assert mu["value"]["lora"][...].shape == (D_IN, 2, 3)


def test_resume_controls_can_fail(tmp_path, straight):
    """Without the restore (or without saving W0 when it decays) the runs do differ."""
    ref_model, _, _, ref_losses = straight[False]
    model, opt = build(2)
    losses, _ = run(model, opt, place(nnx.Rngs(noise=7)), (0, K), N - K)
    assert not np.array_equal(losses, ref_losses[K:])

    ref_model, _, _, ref_losses = straight[True]
    model, opt = build(1, weight_decay=0.1)
    perturb_rank_state(model)
    rngs = place(nnx.Rngs(noise=7))
    _, pos = run(model, opt, rngs, (0, 0), K, decay_w0=True)
    with TrainCheckpointer(tmp_path / "c") as ckpt:  # default filter: base kernels not saved
        ckpt.save(K, model, opt, rngs=rngs, data_state=list(pos))
        model2, opt2 = build(2, weight_decay=0.1)
        rngs2 = place(nnx.Rngs(noise=7))
        info = ckpt.restore(model2, opt2, rngs=rngs2)
    run(model2, opt2, rngs2, tuple(info.data_state), N - K, decay_w0=True)
    k_ref = np.asarray(lp.lora_layers(ref_model)["query"].base.kernel[...])
    k_new = np.asarray(lp.lora_layers(model2)["query"].base.kernel[...])
    assert not np.array_equal(k_ref, k_new)


def test_restore_into_abstract_model(tmp_path, straight):
    ref_model, ref_opt, _, ref_losses = straight[False]
    model, opt = build(1)
    perturb_rank_state(model)
    rngs = place(nnx.Rngs(noise=7))
    _, pos = run(model, opt, rngs, (0, 0), K)
    with TrainCheckpointer(tmp_path / "c", also_save=nnx.Param, async_save=False) as ckpt:
        ckpt.save(K, model, opt, rngs=rngs, data_state=list(pos))
        amodel, aopt = nnx.eval_shape(lambda: build(3))
        assert isinstance(lp.lora_layers(amodel)["query"].pair.a, jax.ShapeDtypeStruct)
        info = ckpt.restore(amodel, aopt, rngs=(arngs := nnx.Rngs(noise=0)))
    for leaf in jax.tree.leaves(nnx.state(amodel)) + jax.tree.leaves(nnx.state(aopt)):
        assert isinstance(leaf, jax.Array), type(leaf)
    losses, _ = run(amodel, aopt, arngs, tuple(info.data_state), N - K)
    np.testing.assert_array_equal(losses, ref_losses[K:])
    assert_trees_equal(amodel, ref_model)
    assert_trees_equal(aopt, ref_opt)


def test_manager_interval_and_retention(tmp_path):
    model, opt = build(1)
    with TrainCheckpointer(tmp_path / "c", max_to_keep=2, save_interval_steps=2, async_save=False) as ckpt:
        saved = [ckpt.save(s, model, opt) for s in range(1, 8)]
        # orbax's policy: the first save of a manager, then multiples of the interval
        assert saved == [True, True, False, True, False, True, False]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, model, opt, force=True)
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7


def test_restore_mismatch_errors(tmp_path):
    model, opt = build(1)
    with TrainCheckpointer(tmp_path / "c", async_save=False) as ckpt:
        ckpt.save(1, model, opt)
        # other rank for one layer -> names the path
        other = TinyModel(nnx.Rngs(0))
        lp.apply_lora(other, lp.LoraConfig(**{**LORA_CFG.__dict__, "rank_overrides": {"query": 1}}), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=r"query: rank is 2 in the checkpoint but 1"):
            ckpt.restore(other, nnx.Optimizer(other, lp.lora_pro_adamw(1e-2), wrt=WRT))
        # other alpha -> other scale
        other = TinyModel(nnx.Rngs(0))
        lp.apply_lora(other, lp.LoraConfig(**{**LORA_CFG.__dict__, "alpha": 8.0}), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="LoRA scale"):
            ckpt.restore(other)
        # optimizer saved but not given
        with pytest.raises(ValueError, match="groups"):
            ckpt.restore(build(2)[0])
        # other optimizer (efficient form: low-rank moments) -> shape/path mismatch listed
        m3 = build(2)[0]
        with pytest.raises(ValueError, match="optimizer"):
            ckpt.restore(m3, nnx.Optimizer(m3, lp.lora_pro_adamw(1e-2, form="efficient"), wrt=WRT))
    with pytest.raises(FileNotFoundError):
        TrainCheckpointer(tmp_path / "empty").restore(model, opt)


def test_save_rejects_non_json_data_state(tmp_path):
    model, opt = build(1)
    with TrainCheckpointer(tmp_path / "c") as ckpt, pytest.raises(TypeError, match="JSON"):
        ckpt.save(1, model, opt, data_state={"rng": object()})


# -- adapters only ------------------------------------------------------------------------------------
def test_adapters_round_trip(tmp_path):
    model, _ = build(1)
    perturb_rank_state(model)
    layers = lp.lora_layers(model)
    rng = np.random.default_rng(0)
    for layer in layers.values():  # non-zero B, non-trivial statistics
        p = layer.pair
        layer.lora.set_value(lp.LoraPair(p.a, jnp.asarray(rng.normal(size=p.b.shape), p.b.dtype), p.scale))
        layer.input_norm[...] = jnp.asarray(rng.uniform(size=layer.input_norm[...].shape), jnp.float32)
    save_adapters(tmp_path / "ad", model, config=LORA_CFG, extra={"base": "tiny"})

    fresh, _ = build(5)
    x = jnp.asarray(X[:4])
    fresh_out = lambda m: np.asarray(nnx.merge(*nnx.split(m))(x))
    meta = restore_adapters(tmp_path / "ad", fresh)
    assert meta["config"]["rank"] == 2 and meta["config"]["targets"] == ["query", "value"]
    assert meta["extra"] == {"base": "tiny"}
    assert meta["layers"]["value"]["out_shape"] == [2, 3] and meta["layers"]["query"]["scale"] == 2.0
    for path, layer in lp.lora_layers(fresh).items():
        ref = layers[path]
        np.testing.assert_array_equal(layer.pair.a, ref.pair.a)
        np.testing.assert_array_equal(layer.pair.b, ref.pair.b)
        np.testing.assert_array_equal(layer.gate[...], ref.gate[...])
        np.testing.assert_array_equal(layer.a_mask[...], ref.a_mask[...])
        np.testing.assert_array_equal(layer.input_norm[...], ref.input_norm[...])
    # forward equality in deterministic mode (the LoRA branch with dropout off)
    for m in (model, fresh):
        for layer in lp.lora_layers(m).values():
            layer.deterministic = True
    np.testing.assert_array_equal(fresh_out(fresh), fresh_out(model))
    assert read_adapter_metadata(tmp_path / "ad")["layers"].keys() == {"query", "value"}


def test_adapters_into_abstract_and_mismatch(tmp_path):
    model, _ = build(1)
    save_adapters(tmp_path / "ad", model)
    abstract = nnx.eval_shape(lambda: build(4)[0])
    restore_adapters(tmp_path / "ad", abstract)
    np.testing.assert_array_equal(lp.lora_layers(abstract)["query"].pair.a, lp.lora_layers(model)["query"].pair.a)
    no_mask = TinyModel(nnx.Rngs(0))
    lp.apply_lora(no_mask, lp.LoraConfig(**{**LORA_CFG.__dict__, "a_mask": False}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"in the checkpoint but not in the target: \['query/a_mask'"):
        restore_adapters(tmp_path / "ad", no_mask)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapters(tmp_path / "x", TinyModel(nnx.Rngs(0)))


def test_restore_keeps_target_sharding(tmp_path):
    """Restored arrays take the target's NamedSharding (2 fake CPU devices, in a subprocess)."""
    code = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import lorapro_jax as lp
        from lorapro_jax.checkpoint import TrainCheckpointer, save_adapters, restore_adapters
        assert jax.device_count() == 2
        mesh = Mesh(np.array(jax.devices()), ("x",))
        def build(seed):
            m = nnx.Sequential(nnx.Linear(8, 6, rngs=nnx.Rngs(0)))
            lp.apply_lora(m, lp.LoraConfig(rank=2, targets=r"layers\\.0"), rngs=nnx.Rngs(seed))
            layer = lp.lora_layers(m)["layers.0"]
            p = layer.pair
            a = jax.device_put(p.a, NamedSharding(mesh, P("x", None)))
            b = jax.device_put(p.b + seed, NamedSharding(mesh, P(None, "x")))
            layer.lora.set_value(lp.LoraPair(a, b, p.scale))
            opt = nnx.Optimizer(m, lp.lora_pro_adamw(1e-2), wrt=lp.LoRAParam)
            mu = opt.opt_state[0].mu["layers"][0]["lora"]
            mu[...] = jax.device_put(mu[...] + seed, NamedSharding(mesh, P(None, "x")))
            return m, opt, layer
        m, opt, layer = build(1)
        with TrainCheckpointer({str(tmp_path / 'c')!r}, async_save=False) as ck:
            ck.save(1, m, opt)
            m2, opt2, layer2 = build(2)
            ck.restore(m2, opt2)
        assert layer2.pair.a.sharding == NamedSharding(mesh, P("x", None)), layer2.pair.a.sharding
        assert layer2.pair.b.sharding == NamedSharding(mesh, P(None, "x"))
        np.testing.assert_array_equal(layer2.pair.b, layer.pair.b)
        mu2 = opt2.opt_state[0].mu["layers"][0]["lora"][...]
        assert mu2.sharding == NamedSharding(mesh, P(None, "x")), mu2.sharding
        np.testing.assert_array_equal(mu2, opt.opt_state[0].mu["layers"][0]["lora"][...])
        save_adapters({str(tmp_path / 'ad')!r}, m)
        m3, _, layer3 = build(3)
        restore_adapters({str(tmp_path / 'ad')!r}, m3)
        assert layer3.pair.a.sharding == NamedSharding(mesh, P("x", None))
        np.testing.assert_array_equal(layer3.pair.b, layer.pair.b)
        print("SHARDING-OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert "SHARDING-OK" in res.stdout, res.stdout + res.stderr
