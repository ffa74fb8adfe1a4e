"""``modules_to_save`` in PEFT adapters: the file layout and the errors (no torch needed).

The numeric round trip against real torch PEFT is in tests/interop/test_peft_torch.py; here the
written tensors are checked against the head's own kernel in torch layout, and bad input must fail
with messages that name the module or key, without changing the model.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import lorapro_jax as lp
from lorapro_jax.export import load_peft_adapter, save_peft_adapter


class Block(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(8, 8, rngs=rngs)
        self.value = nnx.Linear(8, 8, rngs=rngs)


class WithHead(nnx.Module):
    def __init__(self, rngs):
        self.block = Block(rngs)
        self.classifier = nnx.Linear(8, 3, rngs=rngs)


def make(seed: int) -> WithHead:
    model = WithHead(nnx.Rngs(seed))
    lp.apply_lora(model, lp.LoraConfig(rank=2, alpha=4.0, targets=["query", "value"]), rngs=nnx.Rngs(seed + 1))
    return model


def test_head_written_in_torch_layout_and_loaded_back(tmp_path):
    model = make(0)
    out = save_peft_adapter(model, tmp_path / "ad", base_model_name_or_path=None, prefix="m.",
                            modules_to_save=["classifier"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["m.classifier"]
    np.testing.assert_array_equal(tensors["base_model.model.m.classifier.weight"], np.asarray(model.classifier.kernel[...]).T)
    np.testing.assert_array_equal(tensors["base_model.model.m.classifier.bias"], np.asarray(model.classifier.bias[...]))
    assert tensors["base_model.model.m.classifier.weight"].shape == (3, 8)

    other = make(5)
    load_peft_adapter(other, out, prefix="m.")
    np.testing.assert_array_equal(other.classifier.kernel[...], model.classifier.kernel[...])
    np.testing.assert_array_equal(other.classifier.bias[...], model.classifier.bias[...])


def test_modules_to_save_errors_name_the_module(tmp_path):
    model = make(0)
    with pytest.raises(ValueError, match=r"'block' holds LoRA layers"):
        save_peft_adapter(model, tmp_path / "x", base_model_name_or_path=None, modules_to_save=["block"])
    with pytest.raises(ValueError, match=r"'head' is not a module path"):
        save_peft_adapter(model, tmp_path / "x", base_model_name_or_path=None, modules_to_save=["head"])
    with pytest.raises(TypeError, match="list of module paths"):
        save_peft_adapter(model, tmp_path / "x", base_model_name_or_path=None, modules_to_save="classifier")


def test_incomplete_or_misshapen_head_fails_without_changing_the_model(tmp_path):
    out = save_peft_adapter(make(0), tmp_path / "ad", base_model_name_or_path=None, modules_to_save=["classifier"])
    file = out / "adapter_model.safetensors"
    tensors = load_file(str(file))
    target = make(5)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(target))]

    def unchanged():
        after = jax.tree.leaves(nnx.state(target))
        assert len(after) == len(before)
        for a, b in zip(after, before):
            np.testing.assert_array_equal(np.asarray(a), b)

    save_file({k: v for k, v in tensors.items() if k != "base_model.model.classifier.bias"}, str(file))
    with pytest.raises(ValueError, match=r"missing from the file: \['base_model\.model\.classifier\.bias'\]"):
        load_peft_adapter(target, out)
    unchanged()
    save_file({**tensors, "base_model.model.classifier.weight": np.zeros((4, 8), np.float32)}, str(file))
    with pytest.raises(ValueError, match=r"classifier\.weight.*\(8, 4\).*\(3, 8\)"):
        load_peft_adapter(target, out)
    unchanged()
    # A model without the head: the head's tensors are unexpected, unless explicitly ignored.
    save_file(tensors, str(file))
    bare = make(7)
    del bare.classifier
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        load_peft_adapter(bare, out)
    load_peft_adapter(bare, out, load_modules_to_save=False)
    np.testing.assert_allclose(
        np.asarray(lp.lora_layers(bare)["block.query"].pair.b), np.asarray(tensors["base_model.model.block.query.lora_B.weight"]).T
    )
