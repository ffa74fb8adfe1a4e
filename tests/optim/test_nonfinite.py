"""on_nonfinite="raise" | "skip" | "ignore": lp.guard_nonfinite around every LoRA-Pro building block, the aliases'
own on_nonfinite (the same wrapper applied once around their chain), and lp.nonfinite_skips. Skipped steps are
checked against a run that never saw the bad step."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp

N, M, R, S = 5, 4, 2, 1.5

BLOCKS = {"scale_by_lora_pro": lp.scale_by_lora_pro, "scale_by_lora_pro_adam": lp.scale_by_lora_pro_adam,
          "scale_by_lora_pro_lean": lp.scale_by_lora_pro_lean}
ALIASES = {"lora_pro_sgd": lp.lora_pro_sgd, "lora_pro_adamw": lp.lora_pro_adamw, "lora_plus_adamw": lp.lora_plus_adamw}


def _guarded(block):
    """A building block inside the one wrapper (the blocks themselves check nothing)."""
    return lambda on_nonfinite="raise", **kw: lp.guard_nonfinite(block(), on_nonfinite, name=block.__name__, **kw)


# Every LoRA-Pro transform / alias, as factory(on_nonfinite=..., **kw).
FACTORIES = {
    "scale_by_lora_pro": _guarded(lp.scale_by_lora_pro),
    "lora_pro_sgd": lambda **kw: lp.lora_pro_sgd(0.1, momentum=0.9, **kw),
    "scale_by_lora_pro_adam": _guarded(lp.scale_by_lora_pro_adam),
    "scale_by_lora_pro_lean": _guarded(lp.scale_by_lora_pro_lean),
    "adamw_full": lambda **kw: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="full", **kw),
    "adamw_efficient": lambda **kw: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="efficient", **kw),
    "adamw_lean": lambda **kw: lp.lora_pro_adamw(1e-2, weight_decay=0.1, form="lean", **kw),
    "lora_plus_adamw": lambda **kw: lp.lora_plus_adamw(1e-2, ratio=4.0, weight_decay=0.1, **kw),
}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "lin": {"lora": lp.LoraPair(jnp.asarray(rng.normal(size=(N, R)), jnp.float32),
                                    jnp.asarray(rng.normal(size=(R, M)) * 0.5, jnp.float32), S)},
        "bias": jnp.asarray(rng.normal(size=(M,)), jnp.float32),
    }


def _grads(seed):
    return jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(seed).normal(size=x.shape), x.dtype), _params())


def _poison(grads, where="a"):
    pair = grads["lin"]["lora"]
    a, b = pair.a, pair.b
    if where == "a":
        a = a.at[0, 0].set(jnp.nan)
    else:
        b = b.at[0, 0].set(jnp.inf)
    return {"lin": {"lora": lp.LoraPair(a, b, S)}, "bias": grads["bias"]}


def _equal(t1, t2):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), t1, t2)))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_skip_leaves_state_untouched_and_equals_a_run_without_the_bad_step(name):
    params = _params()
    tx = FACTORIES[name](on_nonfinite="skip")
    update = jax.jit(tx.update)
    g1, g2 = _grads(1), _grads(2)

    def run(seq):
        p, st, skipped = params, tx.init(params), []
        for g in seq:
            u, st2 = update(g, st, p)
            if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)):
                assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u)), "a skipped step must return zero updates"
                assert _equal(st2.inner_state, st.inner_state), "a skipped step must leave the inner state as it was"
                skipped.append(int(st2.consecutive_skips))
            st = st2
            p = optax.apply_updates(p, u)
        return p, st, skipped

    p_ref, st_ref, _ = run([g1, g2])
    p_skip, st_skip, consec = run([g1, _poison(g1), _poison(g2, "b"), g2])
    assert consec == [1, 2]
    assert int(lp.nonfinite_skips(st_skip)) == 2 and int(st_skip.consecutive_skips) == 0
    assert int(lp.nonfinite_skips(st_ref)) == 0
    assert _equal(p_skip, p_ref)
    assert _equal(st_skip.inner_state, st_ref.inner_state)


@pytest.mark.parametrize("name,transform", [("lora_pro_sgd", "lora_pro_sgd"), ("adamw_full", "lora_pro_adamw"),
                                            ("scale_by_lora_pro_lean", "scale_by_lora_pro_lean"),
                                            ("lora_plus_adamw", "lora_plus_adamw")])
def test_raise_names_the_paths_first_and_unwraps_from_the_xla_error(name, transform):
    params = _params()
    tx = FACTORIES[name]()  # default: raise
    update = jax.jit(tx.update)
    state = tx.init(params)
    # Without the helper XLA wraps the error; its text still holds our message.
    with pytest.raises(Exception, match=r"\['lin'\]\['lora'\]\.a: non-finite gradient values"):
        jax.block_until_ready(update(_poison(_grads(1)), state, params))
    with pytest.raises(lp.NonFiniteError, match=r"^\['lin'\]\['lora'\]\.b: non-finite gradient values \(NaN/inf\) in "
                       + transform) as info:
        with lp.unwrap_nonfinite_errors():
            jax.block_until_ready(update(_poison(_grads(1), "b"), state, params))
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert err.paths == ("['lin']['lora'].b",) and err.kind == "gradient" and err.transform == transform
    # healthy steps after a failure run as before
    u, _ = update(_grads(1), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_nonfinite_update_from_finite_gradients_raises_or_skips():
    params = _params()
    huge = jax.tree.map(lambda g: g * 1e30, _grads(1))  # finite, but lr · ĝ overflows float32
    tx = lp.lora_pro_sgd(1e20, on_nonfinite="raise")
    with pytest.raises(lp.NonFiniteError, match=r"non-finite update computed from finite gradients") as info:
        with lp.unwrap_nonfinite_errors():
            jax.block_until_ready(jax.jit(tx.update)(huge, tx.init(params), params))
    assert info.value.kind == "update"
    tx = lp.lora_pro_sgd(1e20, on_nonfinite="skip")
    u, st = jax.jit(tx.update)(huge, tx.init(params), params)
    assert int(lp.nonfinite_skips(st)) == 1 and all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


def test_skip_limit_raises_after_max_consecutive_skips():
    params = _params()
    tx = lp.lora_pro_adamw(1e-2, on_nonfinite="skip", max_consecutive_skips=2)
    update = jax.jit(tx.update)
    st = tx.init(params)
    bad = _poison(_grads(1))
    for _ in range(2):
        _, st = update(bad, st, params)
    _, st_ok = update(_grads(1), st, params)  # a finite step resets the run
    assert int(st_ok.consecutive_skips) == 0 and int(lp.nonfinite_skips(st_ok)) == 2
    with pytest.raises(lp.NonFiniteError, match=r"^\['lin'\]\['lora'\]\.a: .*3 non-finite steps in a row, more than "
                       r"max_consecutive_skips=2") as info:
        with lp.unwrap_nonfinite_errors():
            jax.block_until_ready(update(bad, st, params))
    assert info.value.consecutive == 3
    # None: never raises
    tx = lp.lora_pro_adamw(1e-2, on_nonfinite="skip", max_consecutive_skips=None)
    st = tx.init(params)
    for _ in range(3):
        _, st = jax.jit(tx.update)(bad, st, params)
    assert int(lp.nonfinite_skips(st)) == 3
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 0"):
        lp.lora_pro_adamw(1e-2, on_nonfinite="skip", max_consecutive_skips=-1)


def _callback_sites(jaxpr, in_cond=False):
    """(inside a cond branch?) for every debug_callback in a jaxpr, recursively."""
    sites = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("debug_callback", "pure_callback", "io_callback"):
            sites.append(in_cond)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sites += _callback_sites(inner, in_cond or eqn.primitive.name == "cond")
    return sites


@pytest.mark.parametrize("alias", sorted(ALIASES))
@pytest.mark.parametrize("mode,expected", [("ignore", []), ("raise", [True]), ("skip", [True])])
def test_healthy_steps_make_no_host_callback(mode, expected, alias):
    # The only host callback sits in the failing branch of a lax.cond: a finite step never calls the host.
    # Exactly one site per step: the aliases apply the wrapper once, around their whole chain.
    params = _params()
    tx = ALIASES[alias](1e-2, on_nonfinite=mode)
    jaxpr = jax.make_jaxpr(tx.update)(_grads(1), tx.init(params), params)
    assert _callback_sites(jaxpr.jaxpr) == expected
    # No effects: jit keeps its C++ fast dispatch path (a debug callback, even in a branch, loses it).
    assert not jaxpr.effects


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_building_blocks_check_nothing_the_wrapper_does(name):
    block = BLOCKS[name]
    for option in ("on_nonfinite", "max_consecutive_skips", "check_finite_grads"):
        assert option not in inspect.signature(block).parameters, (name, option)
        with pytest.raises(TypeError):
            block(**{option: "raise" if option == "on_nonfinite" else True})
    params, bad = _params(), _poison(_grads(1))
    # bare block: the NaN goes through, no error, no counter
    tx = block()
    u, st = jax.jit(tx.update)(bad, tx.init(params), params)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert not isinstance(st, lp.SkipNonfiniteState) and int(lp.nonfinite_skips(st)) == 0
    # the same block inside the wrapper: raise names the path, ignore keeps the NaN
    tx = lp.guard_nonfinite(block(), "raise")
    with pytest.raises(lp.NonFiniteError, match=r"^\['lin'\]\['lora'\]\.a: non-finite gradient values \(NaN/inf\) in "
                       r"optimizer") as info:
        with lp.unwrap_nonfinite_errors():
            jax.block_until_ready(jax.jit(tx.update)(bad, tx.init(params), params))
    assert info.value.transform == "optimizer"  # the wrapper's default name
    tx = lp.guard_nonfinite(block(), "ignore")
    u_ignored, _ = jax.jit(tx.update)(bad, tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u_ignored, u)  # NaN == NaN here: bitwise the bare block


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_keep_on_nonfinite_and_wrap_their_chain_once(alias):
    factory = ALIASES[alias]
    sig = inspect.signature(factory).parameters
    assert sig["on_nonfinite"].default == "raise" and "max_consecutive_skips" in sig
    assert "check_finite_grads" not in sig
    with pytest.raises(TypeError):
        factory(1e-2, check_finite_grads=True)
    with pytest.raises(ValueError, match=alias + r": on_nonfinite must be one of \('raise', 'skip', 'ignore'\)"):
        factory(1e-2, on_nonfinite="warn")
    params = _params()
    state = factory(1e-2, on_nonfinite="skip").init(params)
    skip_states = []
    jax.tree.map(lambda x: skip_states.append(x) if isinstance(x, lp.SkipNonfiniteState) else x, state,
                 is_leaf=lambda x: isinstance(x, lp.SkipNonfiniteState))
    assert len(skip_states) == 1 and skip_states[0] is state  # one guard, the outermost one
    inner = jax.tree.leaves(state.inner_state, is_leaf=lambda x: isinstance(x, lp.SkipNonfiniteState))
    assert not any(isinstance(x, lp.SkipNonfiniteState) for x in inner)
    # "ignore" is the bare chain: the same state structure as the unguarded building blocks give
    ignored = factory(1e-2, on_nonfinite="ignore").init(params)
    assert jax.tree.structure(ignored) == jax.tree.structure(state.inner_state)
    with pytest.raises(ValueError, match=r"guard_nonfinite: on_nonfinite must be one of"):
        lp.guard_nonfinite(optax.sgd(0.1), "warn")


def test_nonfinite_skips_finds_nested_states():
    params = _params()
    bad = _poison(_grads(1))
    wrappers = {
        "chain": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
        "masked": lambda tx: optax.masked(tx, jax.tree.map(lambda _: True, params)),
        "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
    }
    for name, wrap in wrappers.items():
        tx = wrap(lp.lora_pro_adamw(1e-2, on_nonfinite="skip"))
        st = tx.init(params)
        _, st = jax.jit(tx.update)(bad, st, params)
        assert int(lp.nonfinite_skips(st)) == 1, name
    tx = optax.inject_hyperparams(lp.lora_pro_adamw, static_args=("form", "on_nonfinite"))(
        learning_rate=1e-2, on_nonfinite="skip", max_consecutive_skips=1
    )
    st = tx.init(params)
    update = jax.jit(tx.update)
    _, st = update(bad, st, params)
    assert int(lp.nonfinite_skips(st)) == 1
    with pytest.raises(lp.NonFiniteError, match="max_consecutive_skips=1"), lp.unwrap_nonfinite_errors():
        jax.block_until_ready(update(bad, st, params))
    assert int(lp.nonfinite_skips(optax.adam(1e-3).init(params))) == 0
    # two guarded transforms side by side are summed; jit-able
    tx = optax.partition({"p": lp.lora_pro_adamw(1e-2, on_nonfinite="skip"),
                          "b": lp.guard_nonfinite(optax.sgd(0.1), "skip")}, {"lin": "p", "bias": "b"})
    _, st = jax.jit(tx.update)(bad, tx.init(params), params)
    assert int(jax.jit(lp.nonfinite_skips)(st)) == 1  # only the pair's leaves were bad


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(N, M, rngs=rngs)
        self.head = nnx.Linear(M, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc(x)))


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nnx_optimizer_step_with_nan_input_leaves_the_model_untouched(mode):
    model = lp.apply_lora(_Net(nnx.Rngs(0)), lp.LoraConfig(rank=R, targets=["fc"]), rngs=nnx.Rngs(1))
    wrt = nnx.Any(lp.LoRAParam, nnx.PathContains("head"))
    opt = lp.LoraOptimizer(model, lp.lora_pro_adamw(1e-2, form="efficient", on_nonfinite=mode), wrt=wrt)
    x = jax.random.normal(jax.random.key(2), (8, N))
    y = jax.random.normal(jax.random.key(3), (8, 2))

    @nnx.jit
    def step(model, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, g)
        return loss

    step(model, opt, x)
    before = jax.tree.map(np.asarray, nnx.state(model, wrt))
    opt_before = jax.tree.map(np.asarray, opt.opt_state)
    if mode == "raise":
        with pytest.raises(lp.NonFiniteError, match=r"^\['fc'\]\['lora'\]\.a, \['fc'\]\['lora'\]\.b, \['head'\]"):
            with lp.unwrap_nonfinite_errors():
                step(model, opt, x.at[0, 0].set(jnp.nan))
        assert _equal(opt.opt_state, opt_before)
    else:
        step(model, opt, x.at[0, 0].set(jnp.nan))
        assert int(lp.nonfinite_skips(opt)) == 1 and int(lp.nonfinite_skips(nnx.state(opt))) == 1
        assert _equal(opt.opt_state.inner_state, opt_before.inner_state)
    assert _equal(nnx.state(model, wrt), before)
