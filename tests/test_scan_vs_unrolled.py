"""A scan-over-layers Llama against its unrolled twin: same forward, and the same LoRA factors after
3 steps of every LoRA-Pro form (SGD, full, efficient, lean), alone and with LoRA+ on top.

Both twins load one tiny random HF checkpoint; the unrolled model gets random non-zero A and B per
layer and the scanned model the same factors stacked along its layer axis, so any per-slice mistake in
the stacked pair handling (closed form, moments, Sylvester solve, grouping) shows as a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lorapro_jax as lp
from experiments.sharded_train import train_single_device
from lorapro_jax.models import DEFAULT_LORA_TARGETS, LlamaForCausalLM, load_pretrained

sys.path.insert(0, str(Path(__file__).parent / "models"))
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint  # noqa: E402

RANK, LR, STEPS = 2, 1e-2, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_llama_config(tied=False)
    return cfg, write_checkpoint(tmp_path_factory.mktemp("llama"), cfg, llama_state_dict(cfg, seed=0, tied=False))


def _twins(path, dtype):
    cfg = lp.LoraConfig(rank=RANK, alpha=4.0, targets=DEFAULT_LORA_TARGETS["llama"], param_dtype=jnp.dtype(dtype).name)
    unrolled = load_pretrained(LlamaForCausalLM, path, dtype)
    scanned = load_pretrained(LlamaForCausalLM, path, dtype, scan_layers=True)
    lp.apply_lora(unrolled, cfg, rngs=nnx.Rngs(1))
    lp.apply_lora(scanned, cfg, rngs=nnx.Rngs(1))
    key = jax.random.key(7)
    u_layers = lp.lora_layers(unrolled)
    for i, layer in enumerate(u_layers.values()):  # non-zero B: the general case of the closed form
        p = layer.pair
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        layer.lora.set_value(p.replace(a=0.3 * jax.random.normal(ka, p.a.shape, dtype),
                                       b=0.3 * jax.random.normal(kb, p.b.shape, dtype)))
    s_layers = lp.lora_layers(scanned)
    n_layers = scanned.config.num_hidden_layers
    for path, layer in s_layers.items():
        slices = [u_layers[path.replace("model.layers.", f"model.layers.{i}.")].pair for i in range(n_layers)]
        p = layer.pair
        assert p.stack_shape == (n_layers,), (path, p.a.shape, p.b.shape)
        layer.lora.set_value(p.replace(a=jnp.stack([s.a for s in slices]), b=jnp.stack([s.b for s in slices])))
    return unrolled, scanned


def _batches(vocab):
    rng = np.random.default_rng(11)
    return [jnp.asarray(rng.integers(1, vocab, (2, 6))) for _ in range(STEPS)]


def _loss(model, ids):
    return optax.softmax_cross_entropy_with_integer_labels(model(ids)[:, :-1], ids[:, 1:]).mean()


def _train(model, tx, batches):
    lora, _ = train_single_device(model, _loss, tx, batches)
    return _flat_pairs(lora)


def _flat_pairs(tree):
    out = {}
    for kp, pair in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lp.is_lora_pair)[0]:
        if lp.is_lora_pair(pair):
            name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
            out[name] = pair
    return out


def _relerr(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300))


OPTIMIZERS = {
    "sgd": lambda: lp.lora_pro_sgd(LR),
    "full": lambda: lp.lora_pro_adamw(LR, weight_decay=0.1, form="full"),
    "efficient": lambda: lp.lora_pro_adamw(LR, weight_decay=0.1, form="efficient"),
    "lean": lambda: lp.lora_pro_adamw(LR, weight_decay=0.1, form="lean"),
}


def _compare(ckpt, dtype, name, lora_plus, tol):
    _, path = ckpt
    unrolled, scanned = _twins(path, dtype)
    batches = _batches(unrolled.config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(scanned(batches[0])), np.asarray(unrolled(batches[0])), rtol=tol * 10, atol=tol * 10
    )
    before = _flat_pairs(nnx.as_pure(lp.lora_state(unrolled)))
    tx = OPTIMIZERS[name]()
    if lora_plus:
        tx = optax.chain(tx, lp.scale_by_lora_plus(4.0))
    pu = _train(unrolled, tx, batches)
    ps = _train(scanned, tx, batches)
    n_layers = unrolled.config.num_hidden_layers
    worst = 0.0
    for sname, sp in ps.items():
        for i in range(n_layers):
            up = pu[sname.replace("model.layers.", f"model.layers.{i}.")]
            worst = max(worst, _relerr(sp.a[i], up.a), _relerr(sp.b[i], up.b))
    assert worst < tol, (name, lora_plus, worst)
    # The factors moved: the comparison is not one of untouched initial values.
    assert min(_relerr(pu[k].b, before[k].b) for k in pu) > 1e-4


# One case (the efficient form, no LoRA+) in the quick tier; every other form and LoRA+ in the slow tier.
_FP32_CASES = [
    pytest.param(name, lora_plus, id=f"{name}-{'lora_plus' if lora_plus else 'plain'}",
                 marks=() if (name, lora_plus) == ("efficient", False) else pytest.mark.slow)
    for name in OPTIMIZERS
    for lora_plus in (False, True)
]


@pytest.mark.parametrize(("name", "lora_plus"), _FP32_CASES)
def test_scanned_equals_unrolled_fp32(ckpt, name, lora_plus):
    _compare(ckpt, jnp.float32, name, lora_plus, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scanned_equals_unrolled_float64(ckpt, x64, name):
    _compare(ckpt, jnp.float64, name, True, 1e-12)
