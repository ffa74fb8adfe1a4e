"""Tests for lorapro_jax.export: merged weights and PEFT-format adapters.

Every numeric check is against an independent NumPy computation: merged kernels as ``W0 + s a b``
from the raw factors, PEFT's reconstruction ``W0ᵀ + scaling · B @ A`` in torch layout with
``scaling`` derived from the config fields the way PEFT does, or the effective weight probed through
the model's forward pass on unit vectors. Files are read back with the official ``safetensors``
reader where the dtype allows it.
"""

from __future__ import annotations

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import lorapro_jax as lp
from lorapro_jax.export import (
    export_merged,
    export_merged_hf,
    load_peft_adapter,
    save_peft_adapter,
)

HIDDEN = 8


# -- a tiny BERT-like module tree (HF attribute names), no network ----------------------------------------
class SelfAttention(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.key = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.value = nnx.Linear(HIDDEN, 6, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.self = SelfAttention(rngs)


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.attention = Attention(rngs)


class Encoder(nnx.Module):
    def __init__(self, n_layers, rngs):
        self.layer = nnx.List([Layer(rngs) for _ in range(n_layers)])


class TinyBert(nnx.Module):
    def __init__(self, rngs, n_layers=2):
        self.encoder = Encoder(n_layers, rngs)
        self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)


PATHS = [f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]


def make(config: lp.LoraConfig, seed: int = 1, *, randomize: bool = True, gates: bool = True):
    model = TinyBert(nnx.Rngs(0))
    lp.apply_lora(model, config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for layer in lp.lora_layers(model).values():
        p = layer.pair
        if randomize:  # non-zero B (a freshly initialised B = 0 would make every check trivial)
            b = jnp.asarray(rng.normal(size=p.b.shape), p.b.dtype)
            layer.lora.set_value(lp.LoraPair(p.a, b, p.scale))
        if gates:
            g = rng.uniform(0.2, 1.0, size=p.rank)
            g[0] = 0.0
            layer.gate[...] = jnp.asarray(g, layer.gate[...].dtype)
            if layer.a_mask is not None:
                layer.a_mask[...] = jnp.asarray(rng.random(p.a.shape) > 0.3, jnp.float32)
        layer.deterministic = True
    return model


def raw(layer):
    """NumPy copies of W0 (in, out), a, b, mask, gate, scale."""
    p = layer.pair
    mask = np.ones(p.a.shape, np.float64) if layer.a_mask is None else np.asarray(layer.a_mask[...], np.float64)
    return (
        np.asarray(layer.base.kernel[...], np.float64),
        np.asarray(p.a, np.float64),
        np.asarray(p.b, np.float64),
        mask,
        np.asarray(layer.gate[...], np.float64),
        p.scale,
    )


def probe_weight(layer) -> np.ndarray:
    """The effective (in, out) weight of a Linear LoRA layer from its forward pass on unit vectors."""
    eye = jnp.eye(layer.spec.n, dtype=jnp.float32)
    zero = jnp.zeros((1, layer.spec.n), jnp.float32)
    return np.asarray(layer(eye) - layer(zero), np.float64)


def peft_scaling(cfg: dict, name: str) -> tuple[int, float]:
    """PEFT's rank and scaling of module ``name``: first pattern key k with re.match(rf"(.*\\.)?({k})$")."""

    def pick(pattern: dict, default):
        for k, v in pattern.items():
            if re.match(rf"(.*\.)?({k})$", name):
                return v
        return default

    r = pick(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pick(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


CFG = lp.LoraConfig(
    rank=4,
    alpha=8.0,
    targets=r"encoder\.layer\.\d+\.attention\.self\.(query|value)",
    rank_overrides={r"encoder\.layer\.1\.attention\.self\.query": 2},
    a_mask=True,
)


# -- PEFT ---------------------------------------------------------------------------------------------------
def test_peft_keys_shapes_and_config(tmp_path):
    model = make(CFG)
    out = save_peft_adapter(
        model, tmp_path / "ad", base_model_name_or_path="org/tiny-bert", prefix="bert", task_type="SEQ_CLS", config=CFG
    )
    tensors = load_file(str(out / "adapter_model.safetensors"))  # the official reader
    cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = {p: (2 if p == "encoder.layer.1.attention.self.query" else 4) for p in PATHS}
    outs = {p: (6 if p.endswith("value") else HIDDEN) for p in PATHS}
    expected = {}
    for p in PATHS:
        expected[f"base_model.model.bert.{p}.lora_A.weight"] = (ranks[p], HIDDEN)
        expected[f"base_model.model.bert.{p}.lora_B.weight"] = (outs[p], ranks[p])
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert cfg["base_model_name_or_path"] == "org/tiny-bert"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] is False
    assert cfg["lora_dropout"] == 0.0 and cfg["fan_in_fan_out"] is False and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == sorted(f"bert.{p}" for p in PATHS)
    assert cfg["rank_pattern"] == {"bert.encoder.layer.1.attention.self.query": 2}
    assert cfg["alpha_pattern"] == {}
    # the A and B written are the transposed factors with gate/mask folded into A
    layer = lp.lora_layers(model)["encoder.layer.0.attention.self.value"]
    _, a, b, mask, gate, _ = raw(layer)
    np.testing.assert_allclose(tensors["base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.weight"], (a * mask * gate).T, rtol=1e-6)
    np.testing.assert_array_equal(tensors["base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight"], b.T.astype(np.float32))


def _check_peft_reconstruction(model, out, prefix):
    tensors = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    for path, layer in lp.lora_layers(model).items():
        name = prefix + path
        r, scaling = peft_scaling(cfg, name)
        A = tensors[f"base_model.model.{name}.lora_A.weight"].astype(np.float64)
        B = tensors[f"base_model.model.{name}.lora_B.weight"].astype(np.float64)
        assert A.shape[0] == r and B.shape[1] == r
        w0 = np.asarray(layer.base.kernel[...], np.float64)
        w_torch = w0.T + scaling * B @ A  # what PEFT's merge computes, (out, in)
        np.testing.assert_allclose(w_torch, probe_weight(layer).T, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_reproduces_weights(tmp_path, rslora):
    cfg = lp.LoraConfig(**{**CFG.__dict__, "rslora": rslora, "alpha": 6.0})
    model = make(cfg)
    out = save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None, config=cfg)
    _check_peft_reconstruction(model, out, "")


def test_peft_scales_without_config_use_patterns(tmp_path):
    """Mixed ranks and one layer with an odd scale: rank_pattern / alpha_pattern make PEFT agree."""
    model = make(CFG)
    odd = lp.lora_layers(model)["encoder.layer.0.attention.self.value"]
    p = odd.pair
    odd.lora.set_value(lp.LoraPair(p.a, p.b, 0.37))
    for rslora in (False, True):
        out = save_peft_adapter(model, tmp_path / f"ad{rslora}", base_model_name_or_path="x", use_rslora=rslora)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["use_rslora"] is rslora
        assert cfg["rank_pattern"] == {"encoder.layer.1.attention.self.query": 2}
        assert "encoder.layer.0.attention.self.value" in cfg["alpha_pattern"]
        _check_peft_reconstruction(model, out, "")


def test_peft_round_trip(tmp_path):
    model = make(CFG)
    save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None, prefix="model.", config=CFG)
    fresh = make(CFG, seed=7, gates=True)  # other factors, other gates and masks
    cfg = load_peft_adapter(fresh, tmp_path / "ad", prefix="model.")
    assert cfg["r"] == 4
    for path, layer in lp.lora_layers(fresh).items():
        ref = lp.lora_layers(model)[path]
        _, a, b, mask, gate, s = raw(ref)
        np.testing.assert_allclose(np.asarray(layer.pair.a), a * mask * gate, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(layer.pair.b), b.astype(np.float32))
        assert layer.pair.scale == pytest.approx(s, rel=1e-12)
        np.testing.assert_array_equal(layer.gate[...], 1.0)
        np.testing.assert_array_equal(layer.a_mask[...], 1.0)
        np.testing.assert_allclose(probe_weight(layer), probe_weight(ref), rtol=1e-5, atol=1e-6)


def test_import_pytorch_style_adapter(tmp_path):
    """A PEFT directory written with NumPy only (as PyTorch would) loads with PEFT's scaling, ranks resized."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    cfg = {
        "peft_type": "LORA", "r": 3, "lora_alpha": 12, "use_rslora": False, "target_modules": ["query", "value"],
        "rank_pattern": {"layer.1.attention.self.value": 5}, "alpha_pattern": {"value": 2.5},
        "fan_in_fan_out": False, "bias": "none",
    }
    tensors, expect = {}, {}
    for p in PATHS:
        r, scaling = peft_scaling(cfg, "bert." + p)
        m = 6 if p.endswith("value") else HIDDEN
        A, B = rng.normal(size=(r, HIDDEN)), rng.normal(size=(m, r))
        tensors[f"base_model.model.bert.{p}.lora_A.weight"] = A.astype(np.float32)
        tensors[f"base_model.model.bert.{p}.lora_B.weight"] = B.astype(np.float32)
        expect[p] = (r, scaling, A, B)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})

    model = make(lp.LoraConfig(rank=4, targets=["query", "value"], a_mask=True))
    load_peft_adapter(model, tmp_path, prefix="bert.")
    for p, layer in lp.lora_layers(model).items():
        r, scaling, A, B = expect[p]
        assert layer.pair.rank == r and layer.gate[...].shape == (r,) and layer.a_mask[...].shape == (HIDDEN, r)
        w0 = np.asarray(layer.base.kernel[...], np.float64)
        np.testing.assert_allclose(probe_weight(layer).T, w0.T + scaling * B @ A, rtol=1e-5, atol=1e-5)
    assert lp.lora_layers(model)["encoder.layer.1.attention.self.value"].pair.scale == pytest.approx(2.5 / 5)
    assert lp.lora_layers(model)["encoder.layer.0.attention.self.query"].pair.scale == pytest.approx(12 / 3)


def test_load_errors(tmp_path):
    model = make(CFG)
    save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None)
    other = make(lp.LoraConfig(rank=4, targets=["query", "key", "value"]))
    with pytest.raises(ValueError, match=r"without both lora_A and lora_B: \['encoder.layer.0.attention.self.key'"):
        load_peft_adapter(other, tmp_path / "ad")
    with pytest.raises(ValueError, match="Keys without a LoRA layer"):
        load_peft_adapter(make(CFG), tmp_path / "ad", prefix="bert.")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_peft_adapter(make(CFG), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3, "rank_pattern": {}}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_peft_adapter(make(CFG), tmp_path / "ad")


class Heads(nnx.Module):
    """A multi-axis projection (hidden -> heads x head_dim), as in attention implementations."""

    def __init__(self, rngs):
        self.q_proj = nnx.LinearGeneral(HIDDEN, (2, 3), rngs=rngs)
        self.o_proj = nnx.Einsum("bhd,hdo->bo", (2, 3, HIDDEN), rngs=rngs)


def test_multi_axis_layers_need_allow_flatten(tmp_path):
    model = Heads(nnx.Rngs(0))
    lp.apply_lora(model, lp.LoraConfig(rank=2, targets=["q_proj", "o_proj"]), rngs=nnx.Rngs(1))
    for layer in lp.lora_layers(model).values():
        p = layer.pair
        layer.lora.set_value(lp.LoraPair(p.a, p.b + 0.5, p.scale))
    with pytest.raises(ValueError, match=r"'o_proj' wraps an nnx.Einsum .*allow_flatten=True"):
        save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None)
    out = save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None, allow_flatten=True)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.q_proj.lora_A.weight"].shape == (2, HIDDEN)
    assert tensors["base_model.model.q_proj.lora_B.weight"].shape == (6, 2)
    assert tensors["base_model.model.o_proj.lora_A.weight"].shape == (2, 6)
    # flattened weight: row-major over (heads, head_dim) equals the flattened LoRA delta
    for name, layer in lp.lora_layers(model).items():
        _, a, b, _, gate, s = raw(layer)
        delta = s * (a * gate).reshape(-1, 2) @ b.reshape(2, -1)
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        np.testing.assert_allclose((B @ A).T * s, delta, rtol=1e-5, atol=1e-6)
    fresh = Heads(nnx.Rngs(0))
    lp.apply_lora(fresh, lp.LoraConfig(rank=2, targets=["q_proj", "o_proj"]), rngs=nnx.Rngs(5))
    load_peft_adapter(fresh, out, allow_flatten=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 3)), jnp.float32)
    np.testing.assert_allclose(fresh.o_proj(x), model.o_proj(x), rtol=1e-5, atol=1e-6)


def test_bf16_adapter_round_trip(tmp_path):
    cfg = lp.LoraConfig(rank=2, targets=["query"], param_dtype="bfloat16")
    model = make(cfg, gates=False)
    out = save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None, dtype=None)
    header_len = int.from_bytes((out / "adapter_model.safetensors").read_bytes()[:8], "little")
    header = json.loads((out / "adapter_model.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"]["dtype"] == "BF16"
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="numpy") as f:  # a valid file
        assert len(list(f.keys())) == 4
    fresh = make(cfg, seed=9, gates=False)
    load_peft_adapter(fresh, out)
    for path, layer in lp.lora_layers(fresh).items():
        ref = lp.lora_layers(model)[path]
        assert layer.pair.a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(layer.pair.a, np.float32), np.asarray(ref.pair.a, np.float32))
        np.testing.assert_array_equal(np.asarray(layer.pair.b, np.float32), np.asarray(ref.pair.b, np.float32))


# -- merged weights -------------------------------------------------------------------------------------------
def test_export_merged_matches_numpy():
    model = make(CFG)
    before = {p: np.asarray(l.base.kernel[...]) for p, l in lp.lora_layers(model).items()}
    merged = export_merged(model)
    layers = lp.lora_layers(model)
    for p in PATHS:
        w0, a, b, mask, gate, s = raw(layers[p])
        np.testing.assert_allclose(merged[f"{p}.kernel"], w0 + s * (a * mask * gate) @ b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(merged[f"{p}.bias"], np.asarray(layers[p].base.bias[...]))
        np.testing.assert_array_equal(layers[p].base.kernel[...], before[p])  # model not modified
    key = "encoder.layer.0.attention.self.key.kernel"  # not adapted: unchanged
    np.testing.assert_array_equal(merged[key], model.encoder.layer[0].attention.self.key.kernel[...])
    assert "norm.scale" in merged
    assert not any(".base." in k or "lora" in k or "gate" in k for k in merged)
    # identical to merge_and_unwrap's parameter set (the structure of the model without LoRA)
    plain = TinyBert(nnx.Rngs(0))
    plain_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(plain, nnx.Param))}
    assert set(merged) == plain_keys
    # an already merged model exports the same weights
    lp.merge_lora(model)
    again = export_merged(model)
    for k in merged:
        np.testing.assert_allclose(again[k], merged[k], rtol=1e-6, atol=1e-7)


def _hf_names(model):
    """Independent minimal HF mapping for the test tree: Linear kernel -> weight (transposed)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        leaf = names[-1]
        arr = np.asarray(var[...])
        hf_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
        out[".".join(names[:-1] + [hf_leaf])] = arr.T if leaf == "kernel" else arr
    return out


@pytest.mark.parametrize("use_models_fn", [False, True])
def test_export_merged_hf(tmp_path, use_models_fn):
    fn = None
    if use_models_fn:
        models = pytest.importorskip("lorapro_jax.models")
        assert hasattr(models, "to_hf_state_dict")
    else:
        fn = _hf_names
    model = make(CFG)
    sd = export_merged_hf(model, tmp_path / "model.safetensors", to_hf_state_dict=fn)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert on_disk.keys() == sd.keys()
    layers = lp.lora_layers(model)
    for p in PATHS:
        w0, a, b, mask, gate, s = raw(layers[p])
        w_torch = (w0 + s * (a * mask * gate) @ b).T
        np.testing.assert_allclose(on_disk[f"{p}.weight"], w_torch, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(on_disk[f"{p}.bias"], np.asarray(layers[p].base.bias[...]))
    np.testing.assert_array_equal(on_disk["norm.weight"], np.asarray(model.norm.scale[...]))
    assert lp.lora_layers(model)  # the model itself is still adapted
