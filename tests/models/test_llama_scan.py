"""Scan-over-layers Llama (``scan_layers=True``) against the unrolled layout and the NumPy forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint

from lorapro_jax.models import (
    CheckpointKeyError,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    hf_stacked_prefixes,
    load_pretrained,
    save_hf_checkpoint,
    to_hf_state_dict,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_llama_config(tied=False)
    sd = llama_state_dict(cfg, seed=0, tied=False)
    return cfg, sd, write_checkpoint(tmp_path_factory.mktemp("llama"), cfg, sd)


def _inputs():
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 53, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


_fwd = nnx.jit(lambda m, ids, mask: m(ids, mask))


def test_scanned_layout_stacks_every_layer_parameter(ckpt):
    cfg, sd, path = ckpt
    model = load_pretrained(LlamaForCausalLM, path, scan_layers=True)
    assert hf_stacked_prefixes(model) == {"model.layers": cfg.num_hidden_layers}
    q = model.model.layers.self_attn.q_proj.kernel
    assert q.shape == (cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers):  # (out, in) per layer, transposed into the stacked kernel
        np.testing.assert_array_equal(np.asarray(q[...][i]), sd[f"model.layers.{i}.self_attn.q_proj.weight"].T)


def test_scanned_forward_equals_unrolled_and_numpy(ckpt):
    cfg, sd, path = ckpt
    ids, mask = _inputs()
    unrolled = load_pretrained(LlamaForCausalLM, path)
    scanned = load_pretrained(LlamaForCausalLM, path, scan_layers=True)
    remat = load_pretrained(LlamaForCausalLM, path, scan_layers=True, remat_policy="nothing_saveable")
    ref_u = np.asarray(_fwd(unrolled, ids, mask))
    np.testing.assert_allclose(np.asarray(_fwd(scanned, ids, mask)), ref_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_fwd(remat, ids, mask)), ref_u, rtol=1e-5, atol=1e-5)
    h = R.llama_forward(sd, cfg, np.asarray(ids), np.asarray(mask))
    ref = h @ sd["lm_head.weight"].T.astype(np.float64)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(_fwd(scanned, ids, mask))[real], ref[real], atol=1e-4, rtol=1e-4)


def test_scanned_gradients_equal_unrolled(ckpt):
    """Backward through nnx.scan (and remat) gives the unrolled model's gradients, layer by layer."""
    _, _, path = ckpt
    ids, mask = _inputs()

    def loss(m):
        return jnp.mean(m(ids, mask) ** 2)

    unrolled = load_pretrained(LlamaForCausalLM, path)
    scanned = load_pretrained(LlamaForCausalLM, path, scan_layers=True, remat_policy="dots_saveable")
    gu = nnx.grad(loss)(unrolled)
    gs = nnx.grad(loss)(scanned)
    ku = [np.asarray(gu["model"]["layers"][i]["mlp"]["down_proj"]["kernel"][...]) for i in range(2)]
    ks = np.asarray(gs["model"]["layers"]["mlp"]["down_proj"]["kernel"][...])
    for i in range(2):
        np.testing.assert_allclose(ks[i], ku[i], rtol=1e-4, atol=1e-6)


def test_save_from_scanned_round_trips_per_layer_keys(ckpt, tmp_path):
    cfg, sd, path = ckpt
    scanned = load_pretrained(LlamaForCausalLM, path, scan_layers=True)
    exported = to_hf_state_dict(scanned)
    assert set(exported) == set(sd)
    for k, v in exported.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape, k
        np.testing.assert_array_equal(v, sd[k])
    out = save_hf_checkpoint(scanned, tmp_path / "out")
    back = load_pretrained(LlamaForCausalLM, out)  # written by the scanned layout, read by the unrolled one
    ids, mask = _inputs()
    np.testing.assert_allclose(np.asarray(_fwd(back, ids, mask)), np.asarray(_fwd(scanned, ids, mask)), atol=1e-5)


def test_scanned_classifier_inits_head_and_dropout_state(ckpt):
    cfg, _, path = ckpt
    model = load_pretrained(LlamaForSequenceClassification, path, scan_layers=True, rngs=nnx.Rngs(params=1, dropout=2))
    ids, mask = _inputs()
    assert _fwd(model, ids, mask).shape == (2, cfg.num_labels)


def test_missing_layer_of_a_stacked_parameter_is_named(ckpt, tmp_path):
    cfg, sd, _ = ckpt
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    path = write_checkpoint(tmp_path, cfg, broken)
    with pytest.raises(CheckpointKeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(LlamaForCausalLM, path, scan_layers=True)


def test_bad_remat_policy_is_rejected_at_construction():
    with pytest.raises(ValueError, match="remat_policy='everything'"):
        LlamaForCausalLM(tiny_llama_config(), scan_layers=True, remat_policy="everything")


def test_scanned_compiles_one_layer():
    """The scanned forward's HLO holds one while loop instead of num_hidden_layers unrolled copies."""
    cfg = tiny_llama_config(num_hidden_layers=4)
    ids = jnp.ones((1, 4), jnp.int32)
    for scan, loops in ((True, 1), (False, 0)):
        model = LlamaForCausalLM(cfg, scan_layers=scan)
        graphdef, state = nnx.split(model)
        hlo = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).as_text()
        assert hlo.count("stablehlo.while") == loops, (scan, hlo.count("stablehlo.while"))
