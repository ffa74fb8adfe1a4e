"""qwix LoRA / QLoRA trained by LoRA-Pro through ``lp.paired(tx, lp.qwix_pairing(provider))``.

The same small NNX net adapted by qwix and by our ``apply_lora`` (same base weights, same non-zero A and B, same
scale ``alpha / rank``) follows the same 5-step trajectory under every LoRA-Pro form, to 1e-5 in fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorapro_jax as lp

from ._common import ALPHA, RANK, TXS, X, Y, Net, factors, native_factors, native_model, train_native, train_nnx_optimizer
from ._common import loss_fn as model_loss

qwix = pytest.importorskip("qwix")

TOL = dict(rtol=1e-5, atol=1e-5)


def qwix_model(provider=None, weight_qtype=None):
    """``Net`` (same base weights as :func:`native_model`) adapted by qwix, with the factors of :func:`factors`."""
    provider = provider or qwix.LoraProvider(module_path="fc|head", rank=RANK, alpha=ALPHA, weight_qtype=weight_qtype)
    model = qwix.apply_lora_to_model(Net(nnx.Rngs(0)), provider, X, rngs=nnx.Rngs(1))
    for name, (a, b) in factors().items():
        getattr(model, name).kernel_lora_a.set_value(a)
        getattr(model, name).kernel_lora_b.set_value(b)
    return model, provider


def test_qwix_layout_is_the_flax_layout():
    model, provider = qwix_model()
    plan = lp.qwix_pairing(provider).plan(nnx.state(model, nnx.LoRAParam))
    got = {s.name: (s.a_path, s.b_path, s.scale, s.a_shape, s.b_shape) for s in plan.pairs}
    assert got == {
        "fc/kernel": ("fc/kernel_lora_a", "fc/kernel_lora_b", ALPHA / RANK, (6, RANK), (RANK, 8)),
        "head/kernel": ("head/kernel_lora_a", "head/kernel_lora_b", ALPHA / RANK, (8, RANK), (RANK, 3)),
    }
    np.testing.assert_allclose(model_loss(model), model_loss(native_model()), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TXS))
def test_qwix_matches_native(name):
    native = native_model()
    model, provider = qwix_model()
    ref_losses = train_native(native, TXS[name]())
    losses, opt = train_nnx_optimizer(model, lp.paired(TXS[name](), lp.qwix_pairing(provider)))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for layer, (a, b) in native_factors(native).items():
        np.testing.assert_allclose(np.asarray(getattr(model, layer).kernel_lora_a.get_value()), a, **TOL)
        np.testing.assert_allclose(np.asarray(getattr(model, layer).kernel_lora_b.get_value()), b, **TOL)
    assert int(opt.step[...]) == 5


class EinsumNet(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Einsum("bd,dnh->bnh", (6, 2, 4), rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.proj(x)).sum(-1)


def test_qwix_einsum_factors_match_native():
    """qwix's einsum factors a (d, r), b (r, n, h) are our LoraPair layout for an nnx.Einsum kernel (d, n, h)."""
    y = jax.random.normal(jax.random.key(9), (16, 2))
    loss = lambda m: jnp.mean((m(X) - y) ** 2)
    provider = qwix.LoraProvider(module_path="proj", rank=RANK, alpha=ALPHA)
    q = qwix.apply_lora_to_model(EinsumNet(nnx.Rngs(0)), provider, X, rngs=nnx.Rngs(1))
    nat = lp.apply_lora(EinsumNet(nnx.Rngs(0)), lp.LoraConfig(rank=RANK, alpha=ALPHA, targets=["proj"]), rngs=nnx.Rngs(1))
    assert q.proj.kernel_lora_a.get_value().shape == (6, RANK) and q.proj.kernel_lora_b.get_value().shape == (RANK, 2, 4)
    k = jax.random.split(jax.random.key(4))
    a, b = 0.4 * jax.random.normal(k[0], (6, RANK)), 0.3 * jax.random.normal(k[1], (RANK, 2, 4))
    q.proj.kernel_lora_a.set_value(a)
    q.proj.kernel_lora_b.set_value(b)
    nat.proj.lora.set_value(nat.proj.lora.get_value().replace(a=a, b=b))

    def run(model, tx, wrt):
        opt = nnx.Optimizer(model, tx, wrt=wrt) if wrt is nnx.LoRAParam else lp.LoraOptimizer(model, tx, wrt=wrt)
        step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(m)))
        for _ in range(5):
            step(model, opt)

    run(nat, lp.lora_pro_adamw(1e-2, form="full"), lp.LoRAParam)
    run(q, lp.paired(lp.lora_pro_adamw(1e-2, form="full"), lp.qwix_pairing(provider)), nnx.LoRAParam)
    np.testing.assert_allclose(q.proj.kernel_lora_a.get_value(), nat.proj.lora.get_value().a, **TOL)
    np.testing.assert_allclose(q.proj.kernel_lora_b.get_value(), nat.proj.lora.get_value().b, **TOL)


def test_qlora_int8_base_trains_with_lora_pro():
    """QLoRA: qwix int8 weight-only base (frozen, quantized) + qwix LoRA + LoRA-Pro AdamW; the loss falls."""
    provider = qwix.LoraProvider(module_path="fc|head", rank=RANK, alpha=ALPHA, weight_qtype="int8")
    model = qwix.apply_lora_to_model(Net(nnx.Rngs(0)), provider, X, rngs=nnx.Rngs(1))
    base = nnx.as_pure(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    assert jax.tree.leaves(base["fc"]["kernel"])[0].dtype == jnp.int8  # the base kernel is stored as int8
    losses, _ = train_nnx_optimizer(model, lp.paired(lp.lora_pro_adamw(2e-2, form="full"), lp.qwix_pairing(provider)), steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    after = nnx.as_pure(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, after, base)  # base untouched


def test_qwix_errors_name_paths():
    model, provider = qwix_model()
    st = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
    other = qwix.LoraProvider(module_path="head", rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"fc/kernel_lora_a.*no LoraRule.*'fc'"):
        lp.qwix_pairing(other).plan(st)
    wrong_rank = qwix.LoraProvider(module_path=".*", rank=4, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"fc/kernel_lora_a: its rank is 2 .*rank\(s\) \[4\]"):
        lp.qwix_pairing(wrong_rank).plan(st)
    del st["head"]["kernel_lora_b"]
    with pytest.raises(ValueError, match=r"head/kernel_lora_a \(layer 'head/kernel'\) has no B"):
        lp.qwix_pairing(provider).plan(st)
    with pytest.raises(ValueError, match="no LoRA pair"):
        lp.qwix_pairing(provider).plan(nnx.as_pure(nnx.state(Net(nnx.Rngs(0)))))
    with pytest.raises(ValueError, match="no LoraRule"):
        lp.qwix_pairing(qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]))


@pytest.mark.slow
def test_qlora_example_script_trains():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "examples" / "qlora_qwix_example.py"
    spec = importlib.util.spec_from_file_location("qlora_qwix_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.main(["--steps", "60"])
    for name, (before, after) in results.items():
        assert after < 0.7 * before, (name, before, after)


class Batched(nnx.Module):
    """A weight used by a batched dot_general: qwix gives it stacked factors a (3, 6, r), b (3, r, 8)."""

    def __init__(self, rngs):
        self.kernel = nnx.Param(0.3 * jax.random.normal(rngs.params(), (3, 6, 8)))

    def __call__(self, x):  # x: (3, batch, 6)
        return jax.lax.dot_general(x, self.kernel[...], (((2,), (1,)), ((0,), (0,))))


class BatchedNet(nnx.Module):
    def __init__(self, rngs):
        self.bat = Batched(rngs)

    def __call__(self, x):
        return jnp.tanh(self.bat(x))


@pytest.mark.parametrize("name", ["lora_pro_sgd", "full", "lean"])
def test_qwix_batched_dot_general_factors_train_as_stacked_pairs(name):
    """The stacked qwix pair trains exactly like its three slices as separate pairs (an unrolled dict twin)."""
    xb = jax.random.normal(jax.random.key(5), (3, 16, 6))
    yb = jax.random.normal(jax.random.key(6), (3, 16, 8))
    provider = qwix.LoraProvider(module_path="bat", rank=RANK, alpha=ALPHA)
    q = qwix.apply_lora_to_model(BatchedNet(nnx.Rngs(0)), provider, xb, rngs=nnx.Rngs(1))
    k = jax.random.split(jax.random.key(8))
    a, b = 0.4 * jax.random.normal(k[0], (3, 6, RANK)), 0.3 * jax.random.normal(k[1], (3, RANK, 8))
    q.bat.kernel_lora_a.set_value(a)
    q.bat.kernel_lora_b.set_value(b)
    (spec,) = lp.qwix_pairing(provider).plan(nnx.state(q, nnx.LoRAParam)).pairs
    assert spec.stack_ndim == 1
    w = q.bat.kernel.get_value()
    s = ALPHA / RANK

    def twin_loss(p):  # three independent adapters, one per slice of the batched weight
        outs = [xb[i] @ w[i] + s * (xb[i] @ p[f"s{i}"]["A"]) @ p[f"s{i}"]["B"] for i in range(3)]
        return jnp.mean((jnp.tanh(jnp.stack(outs)) - yb) ** 2)

    twin = {f"s{i}": {"A": a[i], "B": b[i]} for i in range(3)}
    tx = lp.paired(TXS[name](), lp.name_pairing(r"(?P<layer>.*)/A$", r"(?P<layer>.*)/B$", s))
    st = tx.init(twin)
    loss_q = lambda m: jnp.mean((m(xb) - yb) ** 2)
    np.testing.assert_allclose(loss_q(q), twin_loss(twin), rtol=1e-6)
    opt = nnx.Optimizer(q, lp.paired(TXS[name](), lp.qwix_pairing(provider)), wrt=nnx.LoRAParam)
    step_q = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss_q, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)))

    @jax.jit
    def step_twin(p, st):
        u, st = tx.update(jax.grad(twin_loss)(p), st, p)
        return jax.tree.map(lambda x, d: x + d, p, u), st

    for _ in range(5):
        step_q(q, opt)
        twin, st = step_twin(twin, st)
    for i in range(3):
        np.testing.assert_allclose(q.bat.kernel_lora_a.get_value()[i], twin[f"s{i}"]["A"], **TOL)
        np.testing.assert_allclose(q.bat.kernel_lora_b.get_value()[i], twin[f"s{i}"]["B"], **TOL)


def test_qwix_linen_model_in_multi_transform_matches_native():
    """qwix on a Linen model (factors under "params"), LoRA-Pro through optax.multi_transform with a frozen base."""
    import flax.linen as nn
    import optax

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(jnp.tanh(nn.Dense(8, name="fc")(x)))

    provider = qwix.LoraProvider(module_path="fc|head", rank=RANK, alpha=ALPHA)
    model = qwix.apply_lora_to_model(LinenNet(), provider)
    variables = model.init(jax.random.key(0), X)
    native = native_model()
    for name, layer in lp.lora_layers(native).items():
        a, b = factors()[name]
        variables["params"][name].update(
            kernel=layer.base.kernel.get_value(), bias=layer.base.bias.get_value(), kernel_lora_a=a, kernel_lora_b=b
        )
    plan = lp.qwix_pairing(provider).plan(variables)
    assert {s.name: s.scale for s in plan.pairs} == {"params/fc/kernel": ALPHA / RANK, "params/head/kernel": ALPHA / RANK}
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "lora" if "_lora_" in str(p[-1]) else "frozen", variables)
    tx = optax.multi_transform(
        {"lora": lp.paired(TXS["full"](), lp.qwix_pairing(provider)), "frozen": optax.set_to_zero()}, labels
    )
    loss = lambda v: jnp.mean((model.apply(v, X) - Y) ** 2)
    np.testing.assert_allclose(loss(variables), model_loss(native), rtol=1e-6)
    train_native(native, TXS["full"]())
    st = tx.init(variables)

    @jax.jit
    def step(v, st):
        u, st = tx.update(jax.grad(loss)(v), st, v)
        return optax.apply_updates(v, u), st

    for _ in range(5):
        variables, st = step(variables, st)
    for layer, (a, b) in native_factors(native).items():
        np.testing.assert_allclose(variables["params"][layer]["kernel_lora_a"], a, **TOL)
        np.testing.assert_allclose(variables["params"][layer]["kernel_lora_b"], b, **TOL)
