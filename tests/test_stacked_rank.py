"""PRILoRA masks and ALoRA gates on stacked layers (scan-over-layers model): per slice, as the unrolled twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _stacked_models import D, L, Scanned, Unrolled, twins
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.rank import alora_reallocate, apply_alora, flat_gates, prilora_prune, rank_slots, set_active_ranks


def test_prilora_prune_per_slice_equals_unrolled():
    scanned, unrolled = twins(seed=0, targets=("q", "g"), a_mask=True, track_input_norm=True)
    for layer in list(lp.lora_layers(scanned).values()) + list(lp.lora_layers(unrolled).values()):
        layer.a_mask[...] = jnp.ones_like(layer.a_mask[...])
    x = jax.random.normal(jax.random.key(0), (6, D))
    scanned(x), unrolled(x)
    prilora_prune(scanned, keep=5)
    prilora_prune(unrolled, keep=5)
    for name in ("q", "g"):
        st = lp.lora_layers(scanned)[f"layers.{name}"]
        assert np.all(np.asarray(st.a_mask[...]).sum(axis=-2) == 5)  # 5 of 16 per rank row, in every slice
        for i in range(L):
            un = lp.lora_layers(unrolled)[f"layers.{i}.{name}"]
            np.testing.assert_array_equal(np.asarray(st.a_mask[...][i]), np.asarray(un.a_mask[...]))
            np.testing.assert_allclose(np.asarray(st.pair.a[i]), np.asarray(un.pair.a), rtol=1e-6)


def test_set_active_ranks_on_stacked_gates():
    model, _ = twins(seed=1, targets=("q",))
    set_active_ranks(model, 1)
    layer = lp.lora_layers(model)["layers.q"]
    np.testing.assert_array_equal(np.asarray(layer.gate[...]), np.tile([1.0, 0.0], (L, 1)))
    assert np.all(np.asarray(layer.pair.b)[:, 1] == 0) and np.all(np.asarray(layer.pair.a)[..., 1] == 0)


def _alora(model_cls, seed=0):
    return apply_alora(model_cls(nnx.Rngs(seed)), lp.LoraConfig(rank=2, alpha=4.0, targets=("q", "g")), max_rank=4,
                       rngs=nnx.Rngs(seed + 1))


def test_alora_reallocates_per_slice_like_the_unrolled_twin():
    st, un = _alora(Scanned), _alora(Unrolled)
    s_slots, u_slots = rank_slots(st), rank_slots(un)
    assert len(s_slots) == len(u_slots) == 2 * L * 4 and s_slots[0] == ("layers.g", (0, 0))
    imp_s = np.random.default_rng(0).normal(size=len(s_slots))
    u_index = {s: k for k, s in enumerate(u_slots)}
    imp_u = np.zeros(len(u_slots))
    for k, (path, (j, i)) in enumerate(s_slots):
        imp_u[u_index[(path.replace("layers.", f"layers.{j}."), i)]] = imp_s[k]
    rs = alora_reallocate(st, imp_s, n_prune=3, key=jax.random.key(0))
    ru = alora_reallocate(un, imp_u, n_prune=3, key=jax.random.key(0))
    as_u = lambda s: (s[0].replace("layers.", f"layers.{s[1][0]}."), s[1][1])
    assert sorted(map(as_u, rs.pruned)) == sorted(ru.pruned) and sorted(map(as_u, rs.grown)) == sorted(ru.grown)
    assert len(rs.grown) == 3 and int(np.sum(np.asarray(flat_gates(st)) != 0)) == 2 * L * 2
    for path, (j, i) in rs.grown:  # fresh a column, b row zero: the output is unchanged at re-enable
        layer = lp.lora_layers(st)[path]
        assert float(layer.gate[...][j, i]) == 1.0 and np.all(np.asarray(layer.pair.b)[j, i] == 0)
        assert np.any(np.asarray(layer.pair.a)[j, ..., i] != 0)


def _moments(opt_state, moment):
    """``{layer path: LoraPair of NumPy arrays}`` of Adam's ``mu`` or ``nu``."""
    tree = getattr(opt_state[0], moment)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    out = {}
    for kp, var in flat:
        path = ".".join(str(getattr(k, "key", k)) for k in kp)
        out[path[: -len(".lora")]] = jax.tree_util.tree_map(np.asarray, var.get_value())
    return out


def test_alora_resets_the_adam_moments_of_pruned_and_re_enabled_slots():
    for cls in (Scanned, Unrolled):
        model = _alora(cls, seed=2)
        for layer in lp.lora_layers(model).values():  # non-zero B so that every slot gets a gradient
            layer.lora.set_value(layer.pair.replace(b=layer.pair.b + 0.1))
        opt = lp.LoraOptimizer(model, optax.adam(1e-2), wrt=lp.LoRAParam)
        x = jax.random.normal(jax.random.key(1), (4, D))
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, lp.LoRAParam))(model)
        opt.update(model, grads)
        before = {m: _moments(opt.opt_state, m) for m in ("mu", "nu")}
        imp = np.random.default_rng(1).normal(size=len(rank_slots(model)))
        r = alora_reallocate(model, imp, n_prune=2, key=jax.random.key(0), optimizer=opt)
        touched = set(r.pruned + r.grown)
        assert r.grown and r.pruned
        for moment in ("mu", "nu"):
            after = _moments(opt.opt_state, moment)
            assert set(after) == set(lp.lora_layers(model))
            for path, slot in rank_slots(model):
                idx = slot if isinstance(slot, tuple) else (slot,)
                new, old = after[path], before[moment][path]
                a_new, a_old = new.a[idx[:-1] + (Ellipsis, idx[-1])], old.a[idx[:-1] + (Ellipsis, idx[-1])]
                if (path, slot) in touched:
                    assert np.all(a_new == 0) and np.all(new.b[idx] == 0), (moment, path, slot)
                else:
                    np.testing.assert_array_equal(a_new, a_old)
                    np.testing.assert_array_equal(new.b[idx], old.b[idx])
            assert any(np.any(before[moment][p].a != 0) for p, _ in touched)  # there was something to reset
