"""The models' naming contract, exercised through the package's own LoRA transform and export."""

from __future__ import annotations

import jax.numpy as jnp
import np_reference as R
import numpy as np
import pytest
from flax import nnx
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint

from lorapro_jax.models import DEFAULT_LORA_TARGETS, LlamaForCausalLM, load_pretrained

lora_cfg = pytest.importorskip("lorapro_jax.lora.config")
nnx_lora = pytest.importorskip("lorapro_jax.lora.nnx_lora")
pairing = pytest.importorskip("lorapro_jax.lora.pair")
export = pytest.importorskip("lorapro_jax.export")


def test_default_targets_adapt_and_export_under_hf_names(tmp_path):
    cfg = tiny_llama_config(tied=False)
    sd = llama_state_dict(cfg, seed=21)
    model = load_pretrained(LlamaForCausalLM, write_checkpoint(tmp_path / "llama", cfg, sd))
    config = lora_cfg.LoraConfig(rank=2, alpha=4.0, targets=DEFAULT_LORA_TARGETS["llama"])
    nnx_lora.apply_lora(model, config, rngs=nnx.Rngs(0))
    layers = nnx_lora.lora_layers(model)
    expected = {
        f"model.layers.{i}.{m}"
        for i in range(cfg.num_hidden_layers)
        for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    }
    assert set(layers) == expected

    # Give every adapter a non-zero B so the merge is visible, then export under HF names.
    rng = np.random.default_rng(0)
    for layer in layers.values():
        p = layer.lora.get_value()
        b = jnp.asarray(rng.standard_normal(p.b.shape).astype(np.float32) * 0.1)
        layer.lora.set_value(pairing.LoraPair(p.a, b, p.scale))
    merged = export.export_merged_hf(model)
    assert set(merged) == set(sd)  # no ".base", no LoRA tensors, HF names only
    for key, w in sd.items():
        module = key.removesuffix(".weight")
        if module in layers:
            p = layers[module].lora.get_value()
            delta = p.scale * (np.asarray(p.a, np.float64) @ np.asarray(p.b, np.float64))  # (in, out)
            np.testing.assert_allclose(merged[key], w + delta.T, atol=1e-5)
        else:
            np.testing.assert_array_equal(merged[key], w)

    # The merged export is a loadable HF checkpoint whose forward matches the NumPy reference.
    from safetensors.numpy import save_file

    out = tmp_path / "merged"
    cfg.save_pretrained(str(out))
    save_file({k: np.ascontiguousarray(v) for k, v in merged.items()}, str(out / "model.safetensors"))
    reloaded = load_pretrained(LlamaForCausalLM, out)
    ids = jnp.array([[5, 9, 14, 2, 33]])
    ref = R.llama_forward(merged, cfg, np.asarray(ids), np.ones((1, 5))) @ merged["lm_head.weight"].T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(reloaded, ids)), ref, atol=1e-4)
