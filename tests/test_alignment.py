"""experiments.alignment: cosines against NumPy, kernel gradients against an independent pure-jnp twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp
from experiments import alignment as al
from tests.test_finetune_cli import TWO_STEPS, tiny_bert  # noqa: F401  (tiny_bert is a fixture)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.l1(x))))


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _twin_loss(w1, b1, w2, b2, x, y):
    return jnp.mean((jnp.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2)


def test_update_alignment_matches_numpy():
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 3), "b": (2, 5, 2)}
    before = {k: rng.normal(size=s) for k, s in shapes.items()}
    after = {k: before[k] + rng.normal(size=s) for k, s in shapes.items()}
    grads = {k: rng.normal(size=s) for k, s in shapes.items()}
    out = al.update_alignment(before, after, grads)
    d = {k: (after[k] - before[k]).ravel() for k in shapes}
    g = {k: grads[k].ravel() for k in shapes}
    for k in shapes:
        ref = -(d[k] @ g[k]) / (np.linalg.norm(d[k]) * np.linalg.norm(g[k]))
        assert out.per_layer[k] == pytest.approx(ref, rel=1e-12)
    dd, gg = np.concatenate([d["a"], d["b"]]), np.concatenate([g["a"], g["b"]])
    assert out.overall == pytest.approx(-(dd @ gg) / (np.linalg.norm(dd) * np.linalg.norm(gg)), rel=1e-12)
    assert out.mean == pytest.approx(np.mean(list(out.per_layer.values())), rel=1e-12)
    assert out.update_norm == pytest.approx(np.linalg.norm(dd)) and out.grad_norm == pytest.approx(np.linalg.norm(gg))
    # a step along -g has cosine 1; a zero update is nan for that layer and left out of the mean
    step = {k: before[k] - 0.1 * grads[k] for k in shapes}
    assert al.update_alignment(before, step, grads).overall == pytest.approx(1.0)
    part = dict(step, b=before["b"])
    res = al.update_alignment(before, part, grads)
    assert np.isnan(res.per_layer["b"]) and res.mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same non-empty paths"):
        al.update_alignment(before, {"a": after["a"]}, grads)
    with pytest.raises(ValueError, match="'a' has shapes"):
        al.update_alignment(before, dict(after, a=np.zeros((3, 4))), grads)


def test_kernel_grads_equal_twin_gradient_of_effective_weight():
    model = MLP(nnx.Rngs(0))
    lp.apply_lora(model, lp.LoraConfig(rank=2, alpha=4, targets=["l1", "l2"]), rngs=nnx.Rngs(1))
    for layer in lp.lora_layers(model).values():  # non-zero B, so W = W0 + s·a@b differs from W0
        pair = layer.lora.get_value()
        layer.lora.set_value(pair.replace(b=jax.random.normal(jax.random.key(2), pair.b.shape) * 0.3))
    model.eval()  # deterministic dropout: the twin has none
    x = jax.random.normal(jax.random.key(3), (7, 6))
    y = jax.random.normal(jax.random.key(4), (7, 3))
    paths = al.kernel_paths(model)
    assert paths == ["l1", "l2"]
    got = al.kernel_grads(model, loss_fn, paths, x, y)
    w = al.effective_kernels(model, paths)
    layers = lp.lora_layers(model)
    ref1, ref2 = jax.grad(_twin_loss, argnums=(0, 2))(
        w["l1"], layers["l1"].base.bias[...], w["l2"], layers["l2"].base.bias[...], x, y
    )
    np.testing.assert_allclose(got["l1"], ref1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["l2"], ref2, rtol=1e-5, atol=1e-7)
    pair = layers["l1"].lora.get_value()
    np.testing.assert_allclose(w["l1"], layers["l1"].base.kernel[...] + pair.scale * pair.a @ pair.b, rtol=1e-6)


def _np(v):
    return np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)


def test_kernel_grads_leave_the_model_untouched_and_sgd_on_full_model_has_cosine_one():
    model = MLP(nnx.Rngs(0))
    model.train()
    x = jax.random.normal(jax.random.key(3), (7, 6))
    y = jax.random.normal(jax.random.key(4), (7, 3))
    paths = al.kernel_paths(model, lambda p: p in ("l1", "l2"))
    state0 = jax.tree.map(_np, nnx.to_pure_dict(nnx.state(model)))
    g = al.kernel_grads(model, loss_fn, paths, x, y)
    state1 = jax.tree.map(_np, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, state0, state1)  # rng counters included
    before = al.effective_kernels(model, paths)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model, x, y)  # same dropout mask: the rng counter was not advanced
    opt.update(model, grads)
    res = al.update_alignment(before, al.effective_kernels(model, paths), g)
    assert res.overall == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        al.kernel_paths(model)



@pytest.mark.slow
def test_cli_logs_alignment_and_runs_lora_pro_sgd(tiny_bert, tmp_path):
    """--log-alignment-every writes finite cosines for LoRA and full FT; --lora-pro-form sgd trains."""
    import json

    from experiments import finetune

    base = ["--model", str(tiny_bert), "--out-dir", str(tmp_path / "runs"), "--rank", "2", *TWO_STEPS]
    finetune.main([*base, "--method", "lora,full", "--log-alignment-every", "1"])
    for m in ("lora", "full"):
        recs = [json.loads(x) for x in (tmp_path / "runs" / f"bbc-{m}-s0" / "metrics.jsonl").read_text().splitlines()]
        al_recs = [r for r in recs if r["type"] == "alignment"]
        assert [r["step"] for r in al_recs] == [1, 2], m
        assert all(-1 <= r["cos_overall"] <= 1 and r["full_grad_norm"] > 0 for r in al_recs), m
        assert len(al_recs[0]["per_layer"]) == 2 * 2  # query and value of 2 layers
    s = finetune.main([*base, "--method", "lora-pro", "--lora-pro-form", "sgd", "--lr", "0.1", "--run-name", "sgd"])
    assert s[0]["steps"] == 2
