"""One optax-style harness run over every LoRA-aware optimizer alias and form (as optax's alias_test.py does).

For each case: no recompilation on the second ``update``; ``optax.inject_hyperparams`` gives the plain alias's
updates; an explicit ``mu_dtype`` is the dtype of every moment; updates keep the gradient dtype (bf16 and
f32); the state's shapes and dtypes survive ``lax.cond`` and many updates; ``optax.MultiSteps`` over k
mini-steps equals one step on the mean gradient; ``init`` works on abstract ``jax.ShapeDtypeStruct`` params.
The 8-device explicit-axes mesh part runs in a subprocess (``_alias_mesh_worker.py``).
"""

import functools
import inspect
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorapro_jax as lp

N, R, M, H = 6, 2, 4, 3  # in, rank, out, head width
S = 2.0
LR = 1e-2
STATIC = ("form", "x_mode", "on_nonfinite", "non_lora", "mu_dtype", "lean_rank", "nesterov", "pair_decay")
PAIRING = lp.name_pairing(r"(?P<layer>.*)/lora_a$", r"(?P<layer>.*)/lora_b$", S)


def _paired_adamw(learning_rate, weight_decay=0.0, form="full", mu_dtype=None):
    return lp.paired(lp.lora_pro_adamw(learning_rate, weight_decay=weight_decay, form=form, mu_dtype=mu_dtype), PAIRING)


def _guarded_lora_pro_adam(b1=0.9, b2=0.99, mu_dtype=None, on_nonfinite="skip"):
    """A building block inside the one non-finite wrapper, as a user would guard their own chain."""
    return lp.guard_nonfinite(lp.scale_by_lora_pro_adam(b1, b2, mu_dtype=mu_dtype), on_nonfinite)


def _lora_plus_adam(learning_rate, ratio=4.0):
    return lp.lora_plus(optax.adam(learning_rate), ratio)


# name -> (factory, keyword arguments, takes mu_dtype, tree kind)
CASES = {
    "scale_by_lora_pro": (lp.scale_by_lora_pro, dict(delta=1e-8), False, "pairs"),
    "lora_pro_sgd": (lp.lora_pro_sgd, dict(learning_rate=0.1), False, "pairs"),
    "lora_pro_sgd_momentum": (lp.lora_pro_sgd, dict(learning_rate=0.1, momentum=0.9), False, "pairs"),
    "scale_by_lora_pro_adam": (lp.scale_by_lora_pro_adam, dict(b1=0.9, b2=0.99), True, "pairs"),
    "scale_by_lora_pro_lean": (lp.scale_by_lora_pro_lean, dict(b1=0.9, b2=0.99), True, "pairs"),
    "lora_pro_adamw_full": (lp.lora_pro_adamw, dict(learning_rate=LR, weight_decay=0.1, form="full"), True, "pairs"),
    "lora_pro_adamw_efficient": (lp.lora_pro_adamw, dict(learning_rate=LR, weight_decay=0.1, form="efficient"), True,
                                 "pairs"),
    "lora_pro_adamw_lean": (lp.lora_pro_adamw, dict(learning_rate=LR, weight_decay=0.1, form="lean"), True, "pairs"),
    "lora_pro_adamw_full_skip": (lp.lora_pro_adamw, dict(learning_rate=LR, form="full", on_nonfinite="skip"), True,
                                 "pairs"),
    "guard_nonfinite_scale_by_lora_pro_adam": (_guarded_lora_pro_adam, dict(b1=0.9, b2=0.99), True, "pairs"),
    "lora_plus_adamw_skip": (lp.lora_plus_adamw, dict(learning_rate=LR, ratio=16.0, on_nonfinite="skip"), True,
                             "pairs"),
    "scale_by_lora_plus": (lp.scale_by_lora_plus, dict(ratio=16.0), False, "pairs"),
    "lora_plus_adam": (_lora_plus_adam, dict(learning_rate=LR, ratio=4.0), False, "pairs"),
    "lora_plus_adamw": (lp.lora_plus_adamw, dict(learning_rate=LR, ratio=16.0, weight_decay=0.1), True, "pairs"),
    "paired_lora_pro_adamw_full": (_paired_adamw, dict(learning_rate=LR, weight_decay=0.1, form="full"), True, "split"),
    "paired_lora_pro_adamw_lean": (_paired_adamw, dict(learning_rate=LR, form="lean"), True, "split"),
}


def _tree(kind, seed, dtype):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(N, R)), dtype)
    b = jnp.asarray(rng.normal(size=(R, M)) * 0.5, dtype)
    rest = {"bias": jnp.asarray(rng.normal(size=(M,)), dtype), "head": jnp.asarray(rng.normal(size=(M, H)), dtype)}
    if kind == "pairs":
        return {"lin": {"lora": lp.LoraPair(a, b, S)}, **rest}
    return {"lin": {"lora_a": a, "lora_b": b}, **rest}


def _make(name, **extra):
    factory, kw, _, kind = CASES[name]
    return factory(**{**kw, **extra}), kind


def _run(tx, kind, dtype=jnp.float32, steps=2, jit=True):
    params = _tree(kind, 0, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    ups = []
    for t in range(steps):
        u, state = update(_tree(kind, 10 + t, dtype), state, params)
        params = optax.apply_updates(params, u)
        ups.append(u)
    return ups, state, params, update


def _sig(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))), tree)


def _close(x, y, rtol):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.allclose(x, y, rtol=rtol, atol=rtol * max(np.abs(y).max(initial=0.0), 1e-30))


NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_second_update_does_not_recompile(name):
    tx, kind = _make(name)
    params = _tree(kind, 0, jnp.float32)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        _, state = update(_tree(kind, t, jnp.float32), state, params)
    assert update._cache_size() == 1
    # the state keeps its shapes, dtypes and weak types
    assert _sig(state) == _sig(tx.init(params))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_the_same_updates(name):
    factory, kw, _, kind = CASES[name]
    tx = factory(**kw)
    static = [a for a in STATIC if a in inspect.signature(factory).parameters]
    injected = optax.inject_hyperparams(factory, static_args=static)(**kw)
    ups, *_ = _run(tx, kind, steps=3)
    ups_i, state_i, *_ = _run(injected, kind, steps=3)
    for u, ui in zip(ups, ups_i):
        assert jax.tree.structure(u) == jax.tree.structure(ui)
        assert all(jax.tree.leaves(jax.tree.map(functools.partial(_close, rtol=1e-5), ui, u)))
    numeric = {k for k, v in kw.items() if isinstance(v, (int, float)) and k not in STATIC}
    assert numeric <= set(state_i.hyperparams), (numeric, set(state_i.hyperparams))


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n][2]])
def test_explicit_mu_dtype_is_the_moment_dtype(name):
    # As optax.adam's: mu_dtype is the first moment's dtype (LoRA-Pro's full and lean forms: both moments).
    tx, kind = _make(name, mu_dtype=jnp.bfloat16)
    ups, state, *_ = _run(tx, kind, steps=2)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    first = [x for path, x in flat if {".mu", ".left", ".right"} & {jax.tree_util.keystr((k,)) for k in path}]
    assert first and all(x.dtype == jnp.bfloat16 for x in first), _sig(state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ups[-1]))
    # and the default is the parameter dtype
    tx, kind = _make(name)
    _, state, *_ = _run(tx, kind, steps=1)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if x.ndim >= 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_the_gradient_dtype(name, dtype):
    tx, kind = _make(name)
    ups, state, params, _ = _run(tx, kind, dtype=dtype, steps=2)
    for u in ups:
        assert all(x.dtype == dtype for x in jax.tree.leaves(u)), _sig(u)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", NAMES)
def test_state_types_are_stable_under_lax_cond(name):
    tx, kind = _make(name)
    params = _tree(kind, 0, jnp.float32)
    grads = _tree(kind, 1, jnp.float32)
    state = tx.init(params)

    @jax.jit
    def maybe_update(state, pred):
        return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

    s1 = maybe_update(state, True)
    s2 = maybe_update(s1, False)
    assert _sig(s1) == _sig(state) == _sig(s2)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_equals_one_step_on_the_mean_gradient(x64, name):
    # float64: the mean over mini-steps is accumulated in another order than the direct mean.
    tx, kind = _make(name)
    k = 3
    params = _tree(kind, 0, jnp.float64)
    grads = [_tree(kind, 20 + i, jnp.float64) for i in range(k)]
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    want, _ = jax.jit(tx.update)(mean, tx.init(params), params)
    ms = optax.MultiSteps(tx, every_k_schedule=k)
    state = ms.init(params)
    update = jax.jit(ms.update)
    for i, g in enumerate(grads):
        u, state = update(g, state, params)
        if i < k - 1:
            assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    # optax.MultiSteps accumulates the running mean in its own order: ~1e-9 relative apart in float64
    assert all(jax.tree.leaves(jax.tree.map(functools.partial(_close, rtol=1e-7), u, want)))


@pytest.mark.parametrize("name", NAMES)
def test_init_on_abstract_params(name):
    tx, kind = _make(name)
    params = _tree(kind, 0, jnp.float32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                             tx.init(params))


@pytest.mark.slow
def test_explicit_mesh_state_types_and_shardings_are_stable():
    """8 simulated CPU devices, explicit axes: init vs update and jit vs no jit give the same types/shardings."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sharding"))
    from _sharding_subproc import cpu_env, run_all

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_alias_mesh_worker.py")
    ((code, log),) = run_all([[worker]], cpu_env(8), 600)
    assert code == 0, log[-4000:]
    line = [ln for ln in log.splitlines() if ln.startswith("RESULT")]
    assert line, log[-4000:]
    res = json.loads(line[-1][len("RESULT"):])
    assert res["devices"] == 8
    assert sorted(res["cases"]) == NAMES
    # Found by this harness, not fixed yet: used directly (without sharding.shard_optimizer) on
    # an explicit-axes mesh, every LoRA-Pro form fails to trace: the r x r Gram BᵀB contracts b's sharded out axis
    # and JAX asks for an out_sharding. Asserted as failing so that this test flips when it is fixed.
    known = {n for n in NAMES if "lora_pro" in n}
    for n in known:
        assert res["cases"][n] and "ShardingTypeError: Contracting dimensions are sharded" in res["cases"][n][0], n
    bad = {n: r for n, r in res["cases"].items() if r and n not in known}
    assert not bad, json.dumps(bad, indent=1)[:4000]
