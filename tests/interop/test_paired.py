"""``lp.paired`` with ``nnx_lora_pairing`` (flax nnx.LoRALinear) and ``name_pairing`` (a plain dict) vs the native path.

The reference is our own ``apply_lora`` model (one ``LoraPair`` per layer) trained by a functional optax loop;
the foreign trees hold A and B as separate leaves. Same base weights, same non-zero A and B, same scale: after
5 steps the factors agree to 1e-5 (fp32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp

from ._common import ALPHA, RANK, TXS, X, Y, factors, native_factors, native_model, train_native, train_nnx_optimizer
from ._common import loss_fn as model_loss

TOL = dict(rtol=1e-5, atol=1e-5)


# -- flax nnx.LoRALinear via nnx_lora_pairing ---------------------------------------------------------
class NnxLoraNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.LoRALinear(6, 8, lora_rank=RANK, rngs=rngs)
        self.head = nnx.LoRALinear(8, 3, lora_rank=RANK, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc(x)))


def _nnx_lora_twin(native) -> NnxLoraNet:
    """nnx.LoRALinear model with the native model's base weights and factors (nnx.LoRA has scale 1)."""
    m = NnxLoraNet(nnx.Rngs(5))
    for name, layer in lp.lora_layers(native).items():
        own = getattr(m, name)
        own.kernel.set_value(layer.base.kernel.get_value())
        own.bias.set_value(layer.base.bias.get_value())
        a, b = factors()[name]
        own.lora.lora_a.set_value(a)
        own.lora.lora_b.set_value(b)
    return m


@pytest.mark.parametrize("name", sorted(TXS))
def test_nnx_lora_matches_native(name):
    native = native_model(alpha=float(RANK))  # scale 1, as nnx.LoRA computes x @ lora_a @ lora_b
    foreign = _nnx_lora_twin(native)
    np.testing.assert_allclose(model_loss(foreign), model_loss(native), rtol=1e-6)
    ref_losses = train_native(native, TXS[name]())
    losses, _ = train_nnx_optimizer(foreign, lp.paired(TXS[name](), lp.nnx_lora_pairing()))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for layer, (a, b) in native_factors(native).items():
        np.testing.assert_allclose(np.asarray(getattr(foreign, layer).lora.lora_a.get_value()), a, **TOL)
        np.testing.assert_allclose(np.asarray(getattr(foreign, layer).lora.lora_b.get_value()), b, **TOL)


# -- a plain dict via name_pairing ---------------------------------------------------------------------
SCALE = ALPHA / RANK


def _dict_setup():
    """Native model (LoRA on fc, head fully trained) and its functional twin on a plain dict."""
    native = native_model(targets=("fc",))
    fc = lp.lora_layers(native)["fc"]
    a, b = factors()["fc"]
    frozen = {"kernel": fc.base.kernel.get_value(), "bias": fc.base.bias.get_value()}
    params = {
        "fc": {"lora_A": a, "lora_B": b},
        "head": {"kernel": native.head.kernel.get_value(), "bias": native.head.bias.get_value()},
    }

    def loss(p):
        h = X @ frozen["kernel"] + frozen["bias"] + SCALE * (X @ p["fc"]["lora_A"]) @ p["fc"]["lora_B"]
        out = jnp.tanh(h) @ p["head"]["kernel"] + p["head"]["bias"]
        return jnp.mean((out - Y) ** 2)

    return native, params, loss


PAIRING = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", lambda layer: SCALE if layer == "fc" else None)
NATIVE_WRT = nnx.Any(lp.LoRAParam, nnx.PathContains("head"))


def _train_dict(tx, params, loss, steps=5, state=None):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, l

    losses = []
    for _ in range(steps):
        params, state, l = step(params, state)
        losses.append(float(l))
    return params, state, losses


def _check_dict_vs_native(params, native):
    a, b = native_factors(native)["fc"]
    np.testing.assert_allclose(np.asarray(params["fc"]["lora_A"]), a, **TOL)
    np.testing.assert_allclose(np.asarray(params["fc"]["lora_B"]), b, **TOL)
    np.testing.assert_allclose(np.asarray(params["head"]["kernel"]), np.asarray(native.head.kernel.get_value()), **TOL)


@pytest.mark.parametrize("name", sorted(TXS))
def test_name_pairing_dict_matches_native(name):
    native, params, loss = _dict_setup()
    ref_losses = train_native(native, TXS[name](), wrt=NATIVE_WRT)
    params, state, losses = _train_dict(lp.paired(TXS[name](), PAIRING), params, loss)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _check_dict_vs_native(params, native)
    assert isinstance(state, lp.PairedState)


def test_chain_around_and_inside_paired():
    native, params, loss = _dict_setup()
    clip = lambda: optax.clip_by_global_norm(0.05)  # active: the raw gradient norm is larger
    train_native(native, optax.chain(clip(), lp.scale_by_lora_pro(), optax.adam(1e-2)), wrt=NATIVE_WRT)
    tx = optax.chain(clip(), lp.paired(lp.scale_by_lora_pro(), PAIRING), optax.adam(1e-2))
    params, _, _ = _train_dict(tx, params, loss)
    _check_dict_vs_native(params, native)


def test_inject_hyperparams_both_ways():
    native, params, loss = _dict_setup()
    train_native(native, lp.lora_pro_adamw(3e-3, form="full"), wrt=NATIVE_WRT)
    # 1) paired built inside the factory: the learning rate is a traced hyperparameter.
    outer = optax.inject_hyperparams(lambda learning_rate: lp.paired(lp.lora_pro_adamw(learning_rate), PAIRING))(
        learning_rate=1.0
    )
    st = outer.init(params)
    st.hyperparams["learning_rate"] = jnp.asarray(3e-3)
    p1, _, _ = _train_dict(outer, params, loss, state=st)
    _check_dict_vs_native(p1, native)
    # 2) paired around an injected transform: hyperparameters at state.inner.hyperparams.
    inner = lp.paired(optax.inject_hyperparams(lp.lora_pro_adamw)(learning_rate=1.0), PAIRING)
    st = inner.init(params)
    st.inner.hyperparams["learning_rate"] = jnp.asarray(3e-3)
    p2, _, _ = _train_dict(inner, params, loss, state=st)
    _check_dict_vs_native(p2, native)


def test_masked_outside_paired():
    _, params, loss = _dict_setup()
    g = jax.grad(loss)(params)
    mask = {"fc": {"lora_A": True, "lora_B": True}, "head": {"kernel": False, "bias": False}}
    tx = optax.masked(lp.paired(lp.scale_by_lora_pro(), PAIRING), mask)
    u, _ = tx.update(g, tx.init(params), params)
    want = lp.lora_pro_pair_update(lp.LoraPair(params["fc"]["lora_A"], params["fc"]["lora_B"], SCALE),
                                   lp.LoraPair(g["fc"]["lora_A"], g["fc"]["lora_B"], SCALE))
    np.testing.assert_allclose(u["fc"]["lora_A"], want.a, rtol=1e-6)
    np.testing.assert_allclose(u["fc"]["lora_B"], want.b, rtol=1e-6)
    np.testing.assert_array_equal(u["head"]["kernel"], g["head"]["kernel"])  # masked out: passed through
    half = {"fc": {"lora_A": True, "lora_B": False}, "head": {"kernel": False, "bias": False}}
    with pytest.raises(ValueError, match=r"fc/lora_A .*has no B"):
        optax.masked(lp.paired(lp.scale_by_lora_pro(), PAIRING), half).init(params)


def test_state_round_trips_through_orbax(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, params, loss = _dict_setup()
    tx = lp.paired(lp.lora_pro_adamw(1e-2, form="efficient"), PAIRING)
    p5, _, _ = _train_dict(tx, params, loss, steps=5)
    p2, s2, _ = _train_dict(tx, params, loss, steps=2)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", s2)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", jax.tree.map(jnp.zeros_like, s2))
    assert jax.tree.structure(restored) == jax.tree.structure(s2)
    p5b, _, _ = _train_dict(tx, p2, loss, steps=3, state=restored)
    for x, y in zip(jax.tree.leaves(p5), jax.tree.leaves(p5b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_state_layout_is_per_layer():
    _, params, _ = _dict_setup()
    st = lp.paired(lp.lora_pro_adamw(1e-2, form="full"), PAIRING).init(params)
    adam = st.inner[0]
    assert adam.mu["pairs"]["fc"].shape == (6, 8)  # the full form's (n, m) moment of the fc kernel
    assert adam.mu["rest"]["head/kernel"].shape == (8, 3)
    st = lp.paired(lp.lora_pro_adamw(1e-2, form="efficient"), PAIRING).init(params)
    assert set(st.inner[0][1].mu["pairs"]["fc"]) == {"a", "b"}  # pairs stored as plain dicts


# -- errors that name the paths ------------------------------------------------------------------------
def _tree(**over):
    t = {"fc": {"lora_A": jnp.ones((6, 2)), "lora_B": jnp.ones((2, 8))}, "head": {"kernel": jnp.ones((8, 3))}}
    for k, v in over.items():
        t["fc"][k] = v
    return t


PLAIN = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", 1.0)


def test_error_a_without_b_and_b_without_a():
    t = _tree()
    del t["fc"]["lora_B"]
    with pytest.raises(ValueError, match=r"A fc/lora_A \(layer 'fc'\) has no B"):
        PLAIN.plan(t)
    t = _tree()
    del t["fc"]["lora_A"]
    with pytest.raises(ValueError, match=r"B fc/lora_B \(layer 'fc'\) has no A"):
        lp.paired(lp.lora_pro_sgd(0.1), PLAIN).init(t)


def test_error_mismatched_ranks_names_both_paths():
    with pytest.raises(ValueError, match=r"'fc'.*fc/lora_A has shape \(6, 2\), fc/lora_B has shape \(3, 8\)"):
        PLAIN.plan(_tree(lora_B=jnp.ones((3, 8))))


def test_error_scale_not_determined():
    p = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", lambda layer: None)
    with pytest.raises(ValueError, match=r"cannot determine the LoRA scale of layer 'fc' \(fc/lora_A\)"):
        p.plan(_tree())
    p = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", lambda layer: {"x": 1.0}[layer])
    with pytest.raises(ValueError, match=r"scale function failed for layer 'fc'"):
        p.plan(_tree())


def test_error_no_pair_and_bad_patterns():
    with pytest.raises(ValueError, match=r"name_pairing found no LoRA pair .*head/kernel"):
        PLAIN.plan({"head": {"kernel": jnp.ones((8, 3))}})
    with pytest.raises(ValueError, match=r"nnx_lora_pairing found no LoRA pair"):
        lp.paired(lp.lora_pro_sgd(0.1), lp.nnx_lora_pairing()).init(_tree())
    with pytest.raises(ValueError, match="no group naming the layer"):
        lp.name_pairing(r"lora_A$", r"(?P<layer>.*)/lora_B$", 1.0)
    both = lp.name_pairing(r"(?P<layer>.*)/lora_", r"(?P<layer>.*)/lora_B", 1.0)
    with pytest.raises(ValueError, match=r"fc/lora_B matches both"):
        both.plan(_tree())
    two = lp.name_pairing(r"(?P<layer>[^/]*)/.*A$", r"(?P<layer>[^/]*)/lora_B$", 1.0)
    with pytest.raises(ValueError, match=r"layer 'fc' has two A factors: fc/lora_A and fc/x_A"):
        two.plan(_tree(x_A=jnp.ones((6, 2))))


def test_stacked_factors_read_as_stacked_pairs():
    t = {"blocks": {"lora_A": jnp.ones((3, 6, 2)), "lora_B": jnp.ones((3, 2, 8))}}
    (spec,) = PLAIN.plan(t).pairs
    assert (spec.stack_ndim, spec.in_ndim) == (1, 1)
    pair = PLAIN.plan(t).pack(t)["pairs"]["blocks"]
    assert pair.stack_shape == (3,) and pair.in_shape == (6,) and pair.out_shape == (8,)
    amb = {"blocks": {"lora_A": jnp.ones((2, 6, 2)), "lora_B": jnp.ones((2, 2, 8))}}  # stack size == rank
    with pytest.raises(ValueError, match=r"'blocks'.*both as one pair and as a stack.*stack_ndim"):
        PLAIN.plan(amb)
    explicit = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", 1.0, stack_ndim=1)
    assert explicit.plan(amb).pairs[0].in_ndim == 1


def test_lora_ga_through_nnx_lora_pairing_matches_native():
    native = native_model(alpha=float(RANK))
    for layer in lp.lora_layers(native).values():  # B = 0: LoRA-GA then leaves the output unchanged
        layer.lora.set_value(layer.lora.get_value().replace(b=0.0 * layer.lora.get_value().b))
    foreign = _nnx_lora_twin(native)
    for name in ("fc", "head"):
        getattr(foreign, name).lora.lora_b.set_value(0.0 * getattr(foreign, name).lora.lora_b.get_value())
    grads = {"fc": lp.estimate_full_gradients(native, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), [(X, Y)])["fc"]}
    before = foreign(X)
    lp.lora_ga_init(native, grads, svd="full", key=1)
    new, _ = lp.lora_ga_init_paired(nnx.as_pure(nnx.state(foreign)), {"fc/lora": grads["fc"]}, lp.nnx_lora_pairing(), svd="full", key=1)
    nnx.update(foreign, new)
    np.testing.assert_allclose(foreign(X), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(foreign.fc.lora.lora_a.get_value(), native.fc.lora.get_value().a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(foreign.fc.kernel.get_value(), native.fc.base.kernel.get_value(), rtol=1e-6, atol=1e-6)
    assert lp.peft_state_dict_paired(nnx.as_pure(nnx.state(foreign, nnx.LoRAParam)), lp.nnx_lora_pairing()).keys() == {
        f"base_model.model.{m}.lora_{k}.weight" for m in ("fc", "head") for k in "AB"
    }
