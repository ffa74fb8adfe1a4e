"""LoRA-Pro as optax transforms: full/efficient forms against a NumPy reference, composition, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lp
from _np_ref import AdamFullNP, lora_pro_np, proj

M, N, R, S = 6, 5, 2, 2.0


def _tree(seed=0, dtype=jnp.float32):
    """A params tree with one LoRA pair (Flax layout) and one ordinary leaf."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((R, N))  # paper layout
    B = rng.standard_normal((M, R)) * 0.5
    params = {
        "layer": {"lora": lp.LoraPair(jnp.asarray(A.T, dtype), jnp.asarray(B.T, dtype), S)},
        "head": jnp.asarray(rng.standard_normal((3,)), dtype),
    }
    return params, A, B


def _grads(seed, A, B, dtype=jnp.float32):
    rng = np.random.default_rng(100 + seed)
    g = rng.standard_normal((M, N))
    gA, gB = S * B.T @ g, S * g @ A.T
    tree = {
        "layer": {"lora": lp.LoraPair(jnp.asarray(gA.T, dtype), jnp.asarray(gB.T, dtype), S)},
        "head": jnp.asarray(rng.standard_normal((3,)), dtype),
    }
    return tree, g, gA, gB


def _paper(pair):
    return np.asarray(pair.a, np.float64).T, np.asarray(pair.b, np.float64).T


def test_sgd_form_rewrites_pairs_and_passes_other_leaves(x64):
    params, A, B = _tree(dtype=jnp.float64)
    grads, g, gA, gB = _grads(0, A, B, jnp.float64)
    tx = lp.scale_by_lora_pro()
    state = tx.init(params)
    upd, _ = jax.jit(tx.update)(grads, state, params)
    ga, gb = _paper(upd["layer"]["lora"])
    wa, wb = lora_pro_np(A, B, gA, gB, S)
    np.testing.assert_allclose(ga, wa, atol=1e-8)
    np.testing.assert_allclose(gb, wb, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(upd["head"]), np.asarray(grads["head"]))


@pytest.mark.parametrize("x_mode", ["sylvester", "zero"])
def test_full_form_matches_numpy_over_steps(x64, x_mode):
    params, A, B = _tree(dtype=jnp.float64)
    lr = 1e-2
    tx = lp.lora_pro_adamw(lr, x_mode=x_mode)
    state = tx.init(params)
    ref = AdamFullNP(M, N, x_mode=x_mode)
    # Plain Adam reference for the ordinary leaf.
    head_tx = optax.adam(lr)
    head_state = head_tx.init(params["head"])
    head = params["head"]
    update = jax.jit(tx.update)
    for step in range(4):
        grads, g, gA, gB = _grads(step, A, B, jnp.float64)
        upd, state = update(grads, state, params)
        params = optax.apply_updates(params, upd)
        (ua, ub), d = ref.direction(A, B, gA, gB, S)
        A, B = A - lr * ua, B - lr * ub
        pa, pb = _paper(params["layer"]["lora"])
        np.testing.assert_allclose(pa, A, atol=1e-9)
        np.testing.assert_allclose(pb, B, atol=1e-9)
        hu, head_state = head_tx.update(grads["head"], head_state)
        head = optax.apply_updates(head, hu)
        np.testing.assert_allclose(np.asarray(params["head"]), np.asarray(head), atol=1e-7)  # bias corrections are fp32
    assert int(state[0].count) == 4
    assert state[0].mu["layer"]["lora"].shape == (N, M)  # kernel layout (in, out)


def test_full_form_update_is_projection_of_adam_direction(x64):
    # The equivalent update s (B u_A + u_B A) equals P_B d + (I - P_B) d P_A for the Adam direction d.
    params, A, B = _tree(dtype=jnp.float64)
    tx = lp.scale_by_lora_pro_adam()
    state = tx.init(params)
    grads, g, gA, gB = _grads(0, A, B, jnp.float64)
    upd, state = tx.update(grads, state, params)
    ua, ub = _paper(upd["layer"]["lora"])
    e = np.asarray(state.mu["layer"]["lora"]).T / 0.1  # first step: mu = (1-b1) ẽ
    nu = np.asarray(state.nu["layer"]["lora"]).T / 0.001
    d = e / (np.sqrt(nu) + 1e-8)
    want = proj(B) @ d + (np.eye(M) - proj(B)) @ d @ proj(A.T)
    np.testing.assert_allclose(S * (B @ ua + ub @ A), want, atol=1e-8)
    # ẽ itself is the LoRA-Pro equivalent gradient of g.
    np.testing.assert_allclose(e, proj(B) @ g + (np.eye(M) - proj(B)) @ g @ proj(A.T), atol=1e-8)


def test_efficient_form_is_adam_on_adjusted_gradients(x64):
    params, A, B = _tree(dtype=jnp.float64)
    lr = 3e-3
    tx = lp.lora_pro_adamw(lr, form="efficient")
    ref = optax.adam(lr)
    state = tx.init(params)
    ref_params = {"a": jnp.asarray(A), "b": jnp.asarray(B)}
    ref_state = ref.init(ref_params)
    for step in range(3):
        grads, g, gA, gB = _grads(step, A, B, jnp.float64)
        upd, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, upd)
        wa, wb = lora_pro_np(A, B, gA, gB, S)
        ru, ref_state = ref.update({"a": jnp.asarray(wa), "b": jnp.asarray(wb)}, ref_state)
        ref_params = optax.apply_updates(ref_params, ru)
        A, B = np.asarray(ref_params["a"]), np.asarray(ref_params["b"])
        pa, pb = _paper(params["layer"]["lora"])
        np.testing.assert_allclose(pa, A, atol=1e-10)
        np.testing.assert_allclose(pb, B, atol=1e-10)


def test_weight_decay_scales_pairs_by_sqrt_and_others_linearly(x64):
    params, A, B = _tree(dtype=jnp.float64)
    lr, wd = 0.1, 0.5
    tx = lp.lora_pro_adamw(lr, weight_decay=wd)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, state = tx.update(zeros, state, params)
    new = optax.apply_updates(params, upd)
    f = np.sqrt(1 - lr * wd)
    pa, pb = _paper(new["layer"]["lora"])
    np.testing.assert_allclose(pa, f * A, rtol=1e-8)  # decay factors are computed in fp32
    np.testing.assert_allclose(pb, f * B, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(new["head"]), (1 - lr * wd) * np.asarray(params["head"]), rtol=1e-8)
    assert float(lp.base_decay_factor(state)) == pytest.approx(1 - lr * wd)
    # Efficient form: plain AdamW decay on A and B.
    tx = lp.lora_pro_adamw(lr, weight_decay=wd, form="efficient")
    upd, _ = tx.update(zeros, tx.init(params), params)
    pa, _ = _paper(optax.apply_updates(params, upd)["layer"]["lora"])
    np.testing.assert_allclose(pa, (1 - lr * wd) * A, rtol=1e-8)


def test_composes_with_chain_masked_partition_and_inject_hyperparams():
    params, A, B = _tree()
    grads, *_ = _grads(0, A, B)
    # chain with clipping in front, as the reference clips the raw LoRA grads.
    tx = optax.chain(optax.clip_by_global_norm(1.0), lp.scale_by_lora_pro(), optax.sgd(0.1))
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.structure(upd) == jax.tree.structure(grads)
    # masked: LoRA-Pro only on the LoRA subtree, head untouched by it.
    mask = {"layer": True, "head": False}
    tx = optax.masked(lp.scale_by_lora_pro(), mask)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(upd["head"]), np.asarray(grads["head"]))
    want = lp.lora_pro_pair_update(params["layer"]["lora"], grads["layer"]["lora"])
    np.testing.assert_allclose(np.asarray(upd["layer"]["lora"].b), np.asarray(want.b), rtol=1e-6)
    # partition: LoRA-Pro AdamW for the adapters, plain SGD for the head.
    labels = {"layer": "lora", "head": "head"}
    tx = optax.partition({"lora": lp.lora_pro_adamw(1e-3), "head": optax.sgd(0.5)}, labels)
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(grads, state, params)
    np.testing.assert_allclose(np.asarray(upd["head"]), -0.5 * np.asarray(grads["head"]), rtol=1e-6)
    # inject_hyperparams: learning rate and weight decay become state, string options stay static.
    tx = optax.inject_hyperparams(lp.lora_pro_adamw, static_args=("form", "x_mode", "on_nonfinite"))(
        learning_rate=1e-3, weight_decay=0.01
    )
    state = tx.init(params)
    upd1, state = jax.jit(tx.update)(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-3)
    upd2, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(upd1["layer"]["lora"].a)))
    assert jax.tree.structure(upd2) == jax.tree.structure(grads)


def test_state_dtype_and_structure_are_stable():
    params, A, B = _tree()
    grads, *_ = _grads(0, A, B)
    tx = lp.lora_pro_adamw(1e-3, mu_dtype=jnp.bfloat16)
    state = tx.init(params)
    s1 = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = jax.jit(tx.update)
    for _ in range(2):
        upd, state = update(grads, state, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == s1
    assert state[0].mu["layer"]["lora"].dtype == jnp.bfloat16
    assert upd["layer"]["lora"].a.dtype == jnp.float32


def test_errors_name_parameter_paths():
    params, A, B = _tree()
    grads, *_ = _grads(0, A, B)
    tx = lp.scale_by_lora_pro()
    with pytest.raises(ValueError, match="needs the current parameter values"):
        tx.update(grads, tx.init(params), None)
    bad = dict(grads, layer={"lora": lp.LoraPair(grads["layer"]["lora"].a[:-1], grads["layer"]["lora"].b, S)})
    with pytest.raises(ValueError, match=r"\['layer'\]\['lora'\].*do not match parameter"):
        tx.update(bad, tx.init(params), params)
    nan = dict(grads, layer={"lora": lp.LoraPair(grads["layer"]["lora"].a.at[0, 0].set(jnp.nan), grads["layer"]["lora"].b, S)})
    guarded = lp.guard_nonfinite(tx, "raise")  # the building block checks nothing; the one wrapper does
    with pytest.raises(lp.NonFiniteError, match=r"^\['layer'\]\['lora'\]\.a: non-finite gradient values"):
        with lp.unwrap_nonfinite_errors():
            jax.block_until_ready(jax.jit(guarded.update)(nan, guarded.init(params), params))
    half = {"layer": {"lora": lp.LoraPair(optax.MaskedNode(), grads["layer"]["lora"].b, S)}, "head": grads["head"]}
    with pytest.raises(ValueError, match="need both A and B"):
        tx.update(half, tx.init(params), params)
    with pytest.raises(ValueError, match="x_mode must be one of"):
        lp.scale_by_lora_pro(x_mode="bogus")
    with pytest.raises(ValueError, match="form must be one of"):
        lp.lora_pro_adamw(1e-3, form="bogus")
