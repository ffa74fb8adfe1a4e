"""LoRA-GA gradient estimation: the mean full gradient over batches, checked against NumPy backprop (itself
checked by finite differences), layer-by-layer groups, errors (data parallelism: test_lora_ga_data_parallel.py)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.init import estimate_full_gradients, lora_kernel_paths, paper_gradient

sys.path.insert(0, os.path.dirname(__file__))
from _lora_ga_ref import N_IN, N_OUT, Net, loss_fn, make_batches, np_loss, np_loss_and_grads, to_paper, weights  # noqa: E402

NAMES = ("fc", "gen", "ein")


def _model(rank=2, **kw):
    m = Net(nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=rank, alpha=4.0, targets=list(NAMES), **kw), rngs=nnx.Rngs(1))
    return m


def _np_mean_grads(model, batches):
    w = weights(model)
    per = [np_loss_and_grads(w, x, t)[1] for x, t in batches]
    return {k: np.mean([g[k] for g in per], axis=0) for k in NAMES}


def test_numpy_reference_backprop_matches_finite_differences():
    # The NumPy reference itself, against central differences in float64.
    m = _model()
    w = weights(m)
    x, t = make_batches(1, 5, seed=3, dtype=np.float64)[0]
    _, g = np_loss_and_grads(w, x, t)
    rng = np.random.default_rng(0)
    h = 1e-6
    for name in NAMES:
        k, bias = w[name]
        for _ in range(4):
            idx = tuple(rng.integers(0, d) for d in k.shape)
            vals = []
            for sign in (1, -1):
                k2 = k.copy()
                k2[idx] += sign * h
                vals.append(np_loss({**w, name: (k2, bias)}, x, t))
            fd = (vals[0] - vals[1]) / (2 * h)
            assert abs(fd - g[name][idx]) < 1e-7 * max(1.0, abs(fd)), (name, idx, fd, g[name][idx])


def test_estimate_equals_numpy_mean_over_batches():
    m = _model()
    batches = make_batches(3, 4, seed=1)
    want = _np_mean_grads(m, batches)
    got = estimate_full_gradients(m, loss_fn, batches)
    assert list(got) == list(lp.lora_layers(m)) and set(got) == set(NAMES)
    for name in NAMES:
        assert got[name].shape == want[name].shape == tuple(getattr(m, name).base.kernel[...].shape)
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=2e-4, atol=2e-6)
    # The mean over batches is not the gradient of one batch.
    one = np_loss_and_grads(weights(m), *batches[0])[1]
    assert np.abs(one["fc"] - want["fc"]).max() > 1e-3


def test_estimate_ignores_current_adapter_value_and_leaves_model_unchanged():
    # dL/dW0 equals dL/dW at W = W0 + s a b; the estimate must use the adapted weight.
    m = _model()
    for i, layer in enumerate(lp.lora_layers(m).values()):
        p = layer.pair
        layer.lora.set_value(lp.LoraPair(p.a, 0.3 * np.random.default_rng(i).normal(size=p.b.shape).astype(np.float32), p.scale))
    before = {k: np.asarray(v) for k, v in jax_leaves(m).items()}
    batches = make_batches(2, 4, seed=2)
    got = estimate_full_gradients(m, loss_fn, batches)
    w = weights(m)
    for name in NAMES:  # effective kernel = W0 + delta_kernel
        layer = getattr(m, name)
        w[name] = (w[name][0] + np.asarray(layer.delta_kernel(), np.float64), w[name][1])
    per = [np_loss_and_grads(w, x, t)[1] for x, t in batches]
    for name in NAMES:
        np.testing.assert_allclose(np.asarray(got[name]), np.mean([g[name] for g in per], 0), rtol=2e-4, atol=2e-6)
    after = {k: np.asarray(v) for k, v in jax_leaves(m).items()}
    for k, v in before.items():
        np.testing.assert_array_equal(v, after[k])


def jax_leaves(m):
    return {str(p): v for p, v in nnx.to_flat_state(nnx.state(m)) if hasattr(v, "shape")}


@pytest.mark.parametrize("layer_by_layer", [True, 2])
def test_layer_by_layer_groups_equal_all_at_once_and_live_on_host(layer_by_layer):
    m = _model()
    batches = make_batches(3, 4, seed=4)
    full = estimate_full_gradients(m, loss_fn, batches)
    calls = []

    def source():
        calls.append(1)
        return iter(batches)

    grouped = estimate_full_gradients(m, loss_fn, source, layer_by_layer=layer_by_layer)
    assert len(calls) == (3 if layer_by_layer is True else 2)  # one pass over the batches per group
    for name in NAMES:
        assert isinstance(grouped[name], np.ndarray)
        np.testing.assert_allclose(grouped[name], np.asarray(full[name]), rtol=1e-6, atol=1e-7)


def test_targets_subset_regex_and_paper_layout():
    m = _model()
    batches = make_batches(2, 4, seed=5)
    got = estimate_full_gradients(m, loss_fn, batches, targets=r"gen|ein")
    assert set(got) == {"gen", "ein"}
    got2 = estimate_full_gradients(m, loss_fn, batches, targets=["ein"])
    assert list(got2) == ["ein"]
    want = _np_mean_grads(m, batches)
    # paper_gradient: kernel layout -> G (m, n) (out x in), compared with the hand-written conversion.
    for name in ("gen", "ein"):
        G = np.asarray(paper_gradient(getattr(m, name), got[name]))
        np.testing.assert_allclose(G, to_paper(name, want[name]), rtol=2e-4, atol=2e-6)
    assert np.asarray(paper_gradient(m.ein, got["ein"])).shape == (6, 8)
    assert lora_kernel_paths(m)["gen"] == ("gen", "base", "kernel")


def test_errors():
    m = _model()
    batches = make_batches(2, 4)
    with pytest.raises(ValueError, match=r"not LoRA layers.*\['nope'\]|\['nope'\] are not LoRA layers"):
        estimate_full_gradients(m, loss_fn, batches, targets=["nope"])
    with pytest.raises(ValueError, match="matches no LoRA layer"):
        estimate_full_gradients(m, loss_fn, batches, targets="zzz")
    with pytest.raises(ValueError, match="empty"):
        estimate_full_gradients(m, loss_fn, [])
    with pytest.raises(ValueError, match="one-shot iterator"):
        estimate_full_gradients(m, loss_fn, iter(batches), layer_by_layer=True)
    with pytest.raises(ValueError, match="layer_by_layer"):
        estimate_full_gradients(m, loss_fn, batches, layer_by_layer=0)
    with pytest.raises(ValueError, match="needs a `mesh`"):
        estimate_full_gradients(m, loss_fn, batches, data_parallel="shard_map")
    with pytest.raises(ValueError, match="no LoRA layers"):
        estimate_full_gradients(Net(nnx.Rngs(0)), loss_fn, batches)
    with pytest.raises(ValueError, match=r"expected the base kernel shape \(10, 8\)"):
        paper_gradient(m.fc, jnp.zeros((8, 10)))


def test_forward_state_is_carried_across_batches_and_written_back():
    # Dropout RNG counters advance once per batch (different masks per batch), as in training forwards.
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(N_IN, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(8, N_OUT, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(self.fc(x)))

    m = Drop(nnx.Rngs(0))
    lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["fc", "out"]), rngs=nnx.Rngs(1))
    batches = make_batches(3, 4, seed=8)
    count0 = int(m.drop.rngs.count[...])
    g1 = estimate_full_gradients(m, loss_fn, batches)
    assert int(m.drop.rngs.count[...]) == count0 + 3
    g2 = estimate_full_gradients(m, loss_fn, batches)  # new masks: a different estimate
    assert np.abs(np.asarray(g1["out"]) - np.asarray(g2["out"])).max() > 1e-6
    m.eval()  # deterministic: repeated estimates agree and the counters stay
    g3 = estimate_full_gradients(m, loss_fn, batches)
    g4 = estimate_full_gradients(m, loss_fn, batches)
    np.testing.assert_array_equal(np.asarray(g3["out"]), np.asarray(g4["out"]))
