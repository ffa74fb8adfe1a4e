"""LoRA+ (B's learning rate = λ · A's): checked against NumPy gradients / NumPy AdamW with per-group learning
rates, and composed with LoRA-Pro, optax.masked, inject_hyperparams and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.optim.lora_plus import lora_plus, lora_plus_adamw, scale_by_lora_plus

N, M, R, S = 5, 4, 2, 1.5  # in, out, rank, LoRA scale


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w0": rng.normal(size=(N, M)),  # frozen in the model; here only for the loss
        "pair": lp.LoraPair(rng.normal(size=(N, R)) * 0.5, rng.normal(size=(R, M)) * 0.5, S),
        "bias": rng.normal(size=(M,)) * 0.1,
        "head": rng.normal(size=(M, 3)) * 0.5,
    }


def _data(seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(6, N)), rng.normal(size=(6, 3))


def _np_grads(p, x, t):
    """NumPy gradients of L = 0.5 mean_b ||((x (W0 + s a b) + bias) head) − t||² (Flax layout a: (n, r), b: (r, m))."""
    a, b = np.asarray(p["pair"].a), np.asarray(p["pair"].b)
    h = x @ (p["w0"] + S * a @ b) + p["bias"]
    y = h @ p["head"]
    dy = (y - t) / x.shape[0]
    dh = dy @ p["head"].T
    G = x.T @ dh  # dL/dW (n, m)
    return {"pair": (S * G @ b.T, S * a.T @ G), "bias": dh.sum(0), "head": h.T @ dy}


def _trainable(p):
    return {k: v for k, v in p.items() if k != "w0"}


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)  # float32, or float64 under the x64 fixture


def _grads_tree(g):
    return _as_jax({"pair": lp.LoraPair(g["pair"][0], g["pair"][1], S), "bias": g["bias"], "head": g["head"]})


@pytest.mark.parametrize("ratio", [16.0, 4.0])
def test_sgd_b_update_is_ratio_times_plain_sgd_and_a_unchanged(ratio):
    p = _params()
    g = _np_grads(p, *_data())
    lr = 0.1
    params = _as_jax(_trainable(p))
    grads = _grads_tree(g)
    for tx in (optax.chain(optax.sgd(lr), scale_by_lora_plus(ratio)), lora_plus(optax.sgd(lr), ratio),
               optax.chain(scale_by_lora_plus(ratio), optax.sgd(lr))):
        upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_allclose(np.asarray(upd["pair"].a), -lr * g["pair"][0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(upd["pair"].b), -ratio * lr * g["pair"][1], rtol=1e-5, atol=1e-7)
        # Non-LoRA leaves untouched by default.
        np.testing.assert_allclose(np.asarray(upd["bias"]), -lr * g["bias"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(upd["head"]), -lr * g["head"], rtol=1e-5, atol=1e-7)
        assert upd["pair"].scale == S


def test_peft_grouping_scales_one_dimensional_leaves_too():
    p = _params()
    g = _np_grads(p, *_data())
    params = _as_jax(_trainable(p))
    tx = lora_plus(optax.sgd(1.0), 8.0, non_lora="peft")
    upd, _ = tx.update(_grads_tree(g), tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["bias"]), -8.0 * g["bias"], rtol=1e-5)  # 1-D: λ
    np.testing.assert_allclose(np.asarray(upd["head"]), -g["head"], rtol=1e-5)  # 2-D non-LoRA: 1
    np.testing.assert_allclose(np.asarray(upd["pair"].b), -8.0 * g["pair"][1], rtol=1e-5)


def test_nnx_model_sgd_step_matches_numpy_gradients():
    p = _params()
    x, t = _data()

    class Tiny(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(N, M, rngs=nnx.Rngs(0))
            self.fc.kernel[...] = jnp.asarray(p["w0"], jnp.float32)
            self.fc.bias[...] = jnp.asarray(p["bias"], jnp.float32)
            self.head = jnp.asarray(p["head"], jnp.float32)

        def __call__(self, x):
            return self.fc(x) @ self.head

    m = Tiny()
    lp.apply_lora(m, lp.LoraConfig(rank=R, alpha=S * R, targets=["fc"]), rngs=nnx.Rngs(1))
    m.fc.lora.set_value(lp.LoraPair(jnp.asarray(p["pair"].a, jnp.float32), jnp.asarray(p["pair"].b, jnp.float32), S))
    a0, b0 = np.asarray(m.fc.pair.a), np.asarray(m.fc.pair.b)
    lr, ratio = 0.05, 16.0
    opt = nnx.Optimizer(m, lora_plus(optax.sgd(lr), ratio), wrt=lp.LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss = lambda mm: 0.5 * jnp.mean(jnp.sum((mm(jnp.asarray(x, jnp.float32)) - t) ** 2, -1))
        opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, lp.LoRAParam))(model))

    step(m, opt)
    ga, gb = _np_grads(p, x, t)["pair"]
    np.testing.assert_allclose(np.asarray(m.fc.pair.a) - a0, -lr * ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.fc.pair.b) - b0, -ratio * lr * gb, rtol=1e-4, atol=1e-6)


def _np_adamw(param, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    mu = np.zeros_like(param)
    nu = np.zeros_like(param)
    for t, g in enumerate(grads, 1):
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g**2
        d = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
        param = param - lr * (d + wd * param)
    return param


def test_lora_plus_adamw_equals_adamw_with_parameter_groups(x64):
    # PyTorch/PEFT semantics: group {A: lr}, group {B: λ·lr}, decoupled decay lr_group · wd.
    lr, ratio, wd = 0.01, 16.0, 0.1
    p = _params()
    x, t = _data()
    tx = lora_plus_adamw(lr, ratio, weight_decay=wd)
    params = _as_jax(_trainable(p))
    state = tx.init(params)
    np_p = {k: (np.array(v.a), np.array(v.b)) if k == "pair" else np.array(v) for k, v in _trainable(p).items()}
    hist = {"a": [], "b": [], "bias": []}
    upd_fn = jax.jit(tx.update)
    for _ in range(3):
        cur = dict(p, pair=lp.LoraPair(*map(np.asarray, (params["pair"].a, params["pair"].b)), S),
                   bias=np.asarray(params["bias"]), head=np.asarray(params["head"]))
        g = _np_grads(cur, x, t)
        hist["a"].append(g["pair"][0])
        hist["b"].append(g["pair"][1])
        hist["bias"].append(g["bias"])
        upd, state = upd_fn(_grads_tree(g), state, params)
        params = optax.apply_updates(params, upd)
    want_a = _np_adamw(np_p["pair"][0], hist["a"], lr, wd)
    want_b = _np_adamw(np_p["pair"][1], hist["b"], ratio * lr, wd)
    want_bias = _np_adamw(np_p["bias"], hist["bias"], lr, wd)
    assert params["pair"].b.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(params["pair"].a), want_a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(params["pair"].b), want_b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(params["bias"]), want_bias, rtol=1e-9, atol=1e-12)
    # ... and it is not plain AdamW at lr for B.
    assert np.abs(want_b - _np_adamw(np_p["pair"][1], hist["b"], lr, wd)).max() > 1e-3


def test_masked_and_inject_hyperparams_under_jit():
    p = _params()
    g = _grads_tree(_np_grads(p, *_data()))
    params = _as_jax(_trainable(p))
    params["pair2"] = params["pair"]
    g["pair2"] = g["pair"]
    # optax.masked: the second pair is excluded, so its B update is not scaled.
    mask = {"pair": lp.LoraPair(True, True, S), "pair2": lp.LoraPair(False, False, S), "bias": False, "head": False}
    tx = optax.chain(optax.masked(scale_by_lora_plus(4.0), mask), optax.sgd(1.0))
    upd, _ = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["pair"].b), -4.0 * np.asarray(g["pair"].b), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["pair2"].b), -np.asarray(g["pair2"].b), rtol=1e-6)

    # inject_hyperparams: the ratio is a state entry that can change between steps without recompiling.
    tx = optax.inject_hyperparams(lora_plus_adamw)(learning_rate=0.1, ratio=4.0)
    state = tx.init(params)
    traces = []

    @jax.jit
    def upd_fn(g, state, params):
        traces.append(1)
        return tx.update(g, state, params)

    u1, _ = upd_fn(g, state, params)
    state.hyperparams["ratio"] = jnp.full_like(state.hyperparams["ratio"], 8.0)
    u2, _ = upd_fn(g, state, params)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(u2["pair"].b), 2.0 * np.asarray(u1["pair"].b), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u2["pair"].a), np.asarray(u1["pair"].a), rtol=1e-6)


def test_composes_with_lora_pro_under_jit():
    p = _params()
    g = _grads_tree(_np_grads(p, *_data()))
    params = _as_jax(_trainable(p))
    ratio = 16.0
    for base in (optax.chain(lp.scale_by_lora_pro(), optax.sgd(0.1)), lp.lora_pro_adamw(1e-2, weight_decay=0.01)):
        plus = optax.chain(base, scale_by_lora_plus(ratio))
        u0, _ = jax.jit(base.update)(g, base.init(params), params)
        u1, s1 = jax.jit(plus.update)(g, plus.init(params), params)
        np.testing.assert_allclose(np.asarray(u1["pair"].b), ratio * np.asarray(u0["pair"].b), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.asarray(u1["pair"].a), np.asarray(u0["pair"].a), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(np.asarray(u1["head"]), np.asarray(u0["head"]), rtol=1e-6, atol=1e-9)
        assert np.abs(np.asarray(u0["pair"].b)).max() > 1e-4  # non-trivial B update
        u2, _ = jax.jit(plus.update)(g, s1, params)  # a second step runs too
        assert np.all(np.isfinite(np.asarray(u2["pair"].b)))


def test_errors():
    with pytest.raises(ValueError, match="ratio λ must be positive"):
        scale_by_lora_plus(0.0)
    with pytest.raises(ValueError, match="non_lora must be one of"):
        scale_by_lora_plus(16.0, non_lora="all")
