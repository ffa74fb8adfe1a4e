"""Checkpoint I/O: sharded indexes, key checking, dtype handling, prefixes, HF export round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_tiny import (
    llama_state_dict,
    t5_state_dict,
    tiny_llama_config,
    tiny_t5_config,
    write_checkpoint,
)

from lorapro_jax.models import (
    CheckpointKeyError,
    LlamaForCausalLM,
    LlamaModel,
    T5ForConditionalGeneration,
    load_pretrained,
    read_safetensors,
    save_hf_checkpoint,
    to_hf_state_dict,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cfg = tiny_llama_config(tied=False)
    sd = llama_state_dict(cfg, seed=11)
    return cfg, sd, write_checkpoint(tmp_path_factory.mktemp("llama"), cfg, sd)


_fwd = nnx.jit(lambda m, ids: m(ids))


def _params(model):
    return {k: np.asarray(v) for k, v in to_hf_state_dict(model).items()}


def test_sharded_index_matches_single_file(tmp_path, llama):
    cfg, sd, single = llama
    sharded = write_checkpoint(tmp_path / "sharded", cfg, sd, shards=3)
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    raw = read_safetensors(sharded)
    assert raw.keys() == sd.keys()
    a = _params(load_pretrained(LlamaForCausalLM, single))
    b = _params(load_pretrained(LlamaForCausalLM, sharded))
    assert a.keys() == b.keys() == sd.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(b[k], sd[k])


def test_linear_kernels_are_transposed(llama):
    _, sd, path = llama
    model = load_pretrained(LlamaForCausalLM, path)
    q = model.model.layers[1].self_attn.q_proj.kernel[...]
    k = model.model.layers[1].self_attn.k_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(q), sd["model.layers.1.self_attn.q_proj.weight"].T)
    assert k.shape == (32, 16)  # (in, out) with 2 kv heads * head_dim 8


def test_missing_key_error_names_the_key(tmp_path, llama):
    cfg, sd, _ = llama
    broken = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    path = write_checkpoint(tmp_path / "missing", cfg, broken)
    with pytest.raises(CheckpointKeyError, match=r"missing keys \(1\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(LlamaForCausalLM, path)
    model = load_pretrained(LlamaForCausalLM, path, allow_missing=r"mlp\.up_proj")
    got = _params(model)
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    assert got["model.layers.1.mlp.up_proj.weight"].shape == sd["model.layers.1.mlp.up_proj.weight"].shape


def test_unexpected_and_mismatched_keys(tmp_path, llama):
    cfg, sd, _ = llama
    extra = dict(sd, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32),
                        "model.layers.0.adapter.weight": np.ones((2, 2), np.float32)})
    path = write_checkpoint(tmp_path / "extra", cfg, extra)
    with pytest.raises(CheckpointKeyError, match=r"unexpected keys \(1\).*model\.layers\.0\.adapter\.weight"):
        load_pretrained(LlamaForCausalLM, path)  # the rotary buffer is ignored silently
    load_pretrained(LlamaForCausalLM, path, allow_unexpected=r"\.adapter\.")

    bad = dict(sd, **{"model.norm.weight": np.ones(7, np.float32)})
    with pytest.raises(CheckpointKeyError, match=r"shape mismatches.*model\.norm\.weight"):
        load_pretrained(LlamaForCausalLM, write_checkpoint(tmp_path / "bad", cfg, bad))


def test_base_model_prefix_is_added_and_stripped(tmp_path, llama):
    _, sd, causal_path = llama
    # Task checkpoint -> base model: "model." is stripped, the LM head is unexpected.
    with pytest.raises(CheckpointKeyError, match="lm_head.weight"):
        load_pretrained(LlamaModel, causal_path)
    base = load_pretrained(LlamaModel, causal_path, allow_unexpected=r"^lm_head\.")
    base_sd = _params(base)
    assert "embed_tokens.weight" in base_sd and "norm.weight" in base_sd
    np.testing.assert_array_equal(base_sd["layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"])
    # Base checkpoint -> task model: "model." is added back.
    base_path = save_hf_checkpoint(base, tmp_path / "base")
    causal = load_pretrained(LlamaForCausalLM, base_path, allow_missing=r"^lm_head\.")
    np.testing.assert_array_equal(
        _params(causal)["model.layers.1.mlp.down_proj.weight"], sd["model.layers.1.mlp.down_proj.weight"]
    )


def test_save_hf_checkpoint_round_trip(tmp_path):
    cfg = tiny_t5_config(feed_forward_proj="gated-gelu", tied=False)
    sd = t5_state_dict(cfg, seed=7, tied=False)
    model = load_pretrained(T5ForConditionalGeneration, write_checkpoint(tmp_path / "in", cfg, sd))
    out = save_hf_checkpoint(model, tmp_path / "out")
    assert (out / "config.json").is_file()
    again = read_safetensors(out)
    assert again.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k])
    reloaded = load_pretrained(T5ForConditionalGeneration, out)
    assert not reloaded.tie_word_embeddings and not reloaded.scale_decoder_outputs


def test_bfloat16_checkpoint_and_dtypes(tmp_path, llama):
    cfg, sd, path = llama
    sd16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    p16 = write_checkpoint(tmp_path / "bf16", cfg, sd16)
    raw = read_safetensors(p16)
    assert raw["model.norm.weight"].dtype == ml_dtypes.bfloat16

    m16 = load_pretrained(LlamaForCausalLM, p16, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.array([[3, 4, 5, 6]])
    assert _fwd(m16, ids).dtype == jnp.bfloat16

    # bf16 weights, fp32 params/compute: exact upcast.
    m32 = load_pretrained(LlamaForCausalLM, p16, dtype=jnp.float32)
    got = _params(m32)["model.layers.0.mlp.gate_proj.weight"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, sd16["model.layers.0.mlp.gate_proj.weight"].astype(np.float32))

    # fp32 params with bf16 compute.
    mixed = load_pretrained(LlamaForCausalLM, path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    full = load_pretrained(LlamaForCausalLM, path)
    out_mixed, out_full = _fwd(mixed, ids), _fwd(full, ids)
    assert out_mixed.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_mixed, np.float32), np.asarray(out_full), atol=0.25, rtol=0.05)


def test_model_resolution_errors(llama):
    _, _, path = llama
    with pytest.raises(ValueError, match="model_type"):
        load_pretrained(T5ForConditionalGeneration, path)
    with pytest.raises(ValueError, match="Unknown model"):
        load_pretrained("NoSuchModel", path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        read_safetensors(path.parent)


def test_dropout_stream_passes_through_loader(llama):
    _, _, path = llama
    on = load_pretrained(LlamaForCausalLM, path, rngs=nnx.Rngs(params=0, dropout=1))
    off = load_pretrained(LlamaForCausalLM, path)
    drops_on = [d for _, d in nnx.iter_graph(on) if isinstance(d, nnx.Dropout)]
    drops_off = [d for _, d in nnx.iter_graph(off) if isinstance(d, nnx.Dropout)]
    assert drops_on and not any(d.deterministic for d in drops_on)
    assert all(d.deterministic for d in drops_off)
