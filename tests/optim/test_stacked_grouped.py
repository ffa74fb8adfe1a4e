"""LoRA-Pro forms and LoRA+ on stacked pairs (vs the same slices as separate pairs) and on trees whose
equal-shaped pairs are grouped into batched r x r algebra (vs each pair alone, and vs NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lp
from _np_ref import lora_pro_np

L, R = 3, 2  # stack size, rank
IN, OUT = (3, 4), (5,)  # two input axes: the stack axis must not be read as one


def _optimizer(form):
    if form == "lora_plus_adamw":
        return lp.lora_plus_adamw(1e-2, ratio=4.0, weight_decay=0.1)
    if form == "sgd":
        base = lp.lora_pro_sgd(0.05, momentum=0.9)
    else:
        base = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form=form)
    return lp.lora_plus(base, 4.0)  # LoRA+ on top of every LoRA-Pro form


def _stacked_params(dtype):
    k = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(k[0], (L, *IN, R), dtype)
    b = 0.5 * jax.random.normal(k[1], (L, R, *OUT), dtype)
    return {
        "pair": lp.LoraPair(a, b, 1.5, in_ndim=len(IN)),
        "bias": jax.random.normal(k[2], OUT, dtype),
    }


def _sliced(params):
    p = params["pair"]
    out = {f"pair{i}": lp.LoraPair(p.a[i], p.b[i], p.scale) for i in range(L)}
    out["bias"] = params["bias"]
    return out


def _target(dtype):
    return jax.random.normal(jax.random.key(7), (L, *IN, *OUT), dtype)


def _loss_stacked(params, t):
    return 0.5 * jnp.sum((params["pair"].delta() - t) ** 2) + jnp.sum(
        params["bias"] ** 2 * jnp.sum(t)
    )


def _loss_sliced(params, t):
    d = jnp.stack([params[f"pair{i}"].delta() for i in range(L)])
    return 0.5 * jnp.sum((d - t) ** 2) + jnp.sum(params["bias"] ** 2 * jnp.sum(t))


def _run(tx, params, loss, t, steps=3):
    state = tx.init(params)
    for _ in range(steps):
        g = jax.grad(loss)(params, t)
        upd, state = tx.update(g, state, params)
        params = optax.apply_updates(params, upd)
    return params, state


def _check(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if dtype == jnp.float64:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want))
        )


# float32 SGD and lean compile their own (slow) programs; the same forms run in float64 in the quick tier.
_STACKED_CASES = [
    pytest.param(dtype, form, id=f"{dtype}-{form}",
                 marks=pytest.mark.slow if (dtype, form) in {("float32", "sgd"), ("float32", "lean")} else ())
    for dtype in ("float64", "float32")
    for form in ("sgd", "efficient", "full", "lean", "lora_plus_adamw")
]


@pytest.mark.parametrize(("dtype", "form"), _STACKED_CASES)
def test_stacked_pair_equals_its_slices_after_three_steps(form, dtype):
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        params, t = _stacked_params(dt), _target(dt)
        tx = _optimizer(form)
        got, state = _run(tx, params, _loss_stacked, t)
        want, _ = _run(tx, _sliced(params), _loss_sliced, t)
        assert got["pair"].in_ndim == len(IN) and got["pair"].a.shape == (L, *IN, R)
        for i in range(L):
            _check(got["pair"].a[i], want[f"pair{i}"].a, dt)
            _check(got["pair"].b[i], want[f"pair{i}"].b, dt)
        _check(got["bias"], want["bias"], dt)
        assert not np.allclose(
            np.asarray(got["pair"].b), np.asarray(params["pair"].b)
        )  # it moved
        if form == "full":  # full-size moments have the stacked kernel's shape
            shapes = {x.shape for x in jax.tree.leaves(state)}
            assert (L, *IN, *OUT) in shapes


def _mixed_tree(rng, dtype):
    """Several shapes (q/k/v-like), two scales, a stacked pair and plain leaves."""

    def pair(n, m, s, stack=()):
        a = jnp.asarray(rng.standard_normal(stack + (n, R)), dtype)
        b = jnp.asarray(0.5 * rng.standard_normal(stack + (R, m)), dtype)
        return lp.LoraPair(a, b, s, in_ndim=1 if stack else None)

    tree = {}
    for layer in range(3):
        tree[f"l{layer}"] = {
            "q": pair(6, 6, 2.0),
            "k": pair(6, 6, 2.0),
            "up": pair(6, 9, 2.0),
            "down": pair(9, 6, 2.0),
            "q_rs": pair(6, 6, 0.7),  # same shape, other scale: another group
            "norm": jnp.asarray(rng.standard_normal((6,)), dtype),
        }
    tree["stacked"] = pair(6, 6, 2.0, stack=(4,))
    tree["head"] = jnp.asarray(rng.standard_normal((6, 3)), dtype)
    return tree


def _grads_like(rng, tree):
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree
    )


def _pairs(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lp.is_lora_pair)[0]
    return [(jax.tree_util.keystr(p), x) for p, x in leaves if lp.is_lora_pair(x)]


def test_grouped_sgd_form_equals_per_pair_closed_form_and_numpy(x64):
    rng = np.random.default_rng(0)
    params = _mixed_tree(rng, jnp.float64)
    grads = _grads_like(rng, params)
    upd, _ = jax.jit(lp.scale_by_lora_pro().update)(grads, optax.EmptyState(), params)
    assert jax.tree.structure(upd, is_leaf=lp.is_lora_pair) == jax.tree.structure(
        grads, is_leaf=lp.is_lora_pair
    )
    got, ps, gs = dict(_pairs(upd)), dict(_pairs(params)), dict(_pairs(grads))
    for path, p in ps.items():
        want = lp.lora_pro_pair_update(p, gs[path])  # each pair alone
        np.testing.assert_allclose(
            np.asarray(got[path].a), np.asarray(want.a), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(got[path].b), np.asarray(want.b), rtol=1e-12, atol=1e-12
        )
        slices = range(p.a.shape[0]) if p.stack_ndim else [None]
        for i in slices:  # independent NumPy reference, slice by slice (paper layout)
            sel = (
                (lambda x: np.asarray(x))
                if i is None
                else (lambda x, i=i: np.asarray(x[i]))
            )
            wa, wb = lora_pro_np(
                sel(p.a).T, sel(p.b).T, sel(gs[path].a).T, sel(gs[path].b).T, p.scale
            )
            np.testing.assert_allclose(sel(got[path].a).T, wa, rtol=1e-7, atol=1e-8)
            np.testing.assert_allclose(sel(got[path].b).T, wb, rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(upd["head"]), np.asarray(grads["head"]))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["full", "lean"])
def test_grouped_adam_forms_equal_each_pair_alone_over_steps(x64, form):
    rng = np.random.default_rng(1)
    params = _mixed_tree(rng, jnp.float64)
    grads = [_grads_like(rng, params) for _ in range(3)]
    tx = lp.lora_pro_adamw(1e-2, weight_decay=0.1, form=form)
    update = jax.jit(tx.update)
    p_all, st = params, tx.init(params)
    for g in grads:
        u, st = update(g, st, p_all)
        p_all = optax.apply_updates(p_all, u)
    for path, p in _pairs(
        params
    ):  # the same optimizer on a tree holding only this pair
        one = {"x": p}
        s1 = tx.init(one)
        for g in grads:
            g1 = {"x": dict(_pairs(g))[path]}
            u1, s1 = tx.update(g1, s1, one)
            one = optax.apply_updates(one, u1)
        got = dict(_pairs(p_all))[path]
        np.testing.assert_allclose(
            np.asarray(got.a), np.asarray(one["x"].a), rtol=1e-12, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(got.b), np.asarray(one["x"].b), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("form", ["sgd", "full", "lean"])
def test_eigh_calls_grow_with_distinct_shapes_not_pairs(form):
    rng = np.random.default_rng(2)
    params = _mixed_tree(rng, jnp.float32)
    grads = _grads_like(rng, params)
    tx = lp.scale_by_lora_pro() if form == "sgd" else lp.lora_pro_adamw(1e-2, form=form)
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)

    def count(jx):  # eigh call sites, inside nested (p)jit calls too
        n = 0
        for eq in jx.eqns:
            n += eq.primitive.name == "eigh"
            for v in eq.params.values():
                sub = getattr(v, "jaxpr", v)
                if hasattr(sub, "eqns"):
                    n += count(sub)
        return n

    groups = 5  # (6x6, 2.0), (6x9), (9x6), (6x6, 0.7), stacked (4, 6x6)
    pairs = len(_pairs(params))
    assert pairs == 16
    # One eigh per group, of BᵀB + δI and AAᵀ + δI batched together: it gives both damped inverses and the
    # Sylvester solve's eigendecompositions (the Adam forms share it between their two closed forms).
    assert count(jaxpr.jaxpr) == groups


def test_stacked_pair_with_mismatched_update_names_the_path():
    p = {"blk": lp.LoraPair(jnp.ones((2, 4, 1)), jnp.ones((2, 1, 3)), 1.0, in_ndim=1)}
    g = {"blk": lp.LoraPair(jnp.ones((3, 4, 1)), jnp.ones((3, 1, 3)), 1.0, in_ndim=1)}
    with pytest.raises(ValueError, match=r"\['blk'\].*\(3, 4, 1\)"):
        lp.scale_by_lora_pro().update(g, optax.EmptyState(), p)
