"""LoRA-GA init and PEFT export through a pairing, checked against the native (apply_lora) implementations."""

import jax
import numpy as np
import pytest
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.export import load_peft_adapter, peft_state_dict

from ._common import ALPHA, RANK, X, Y, Net, native_model

qwix = pytest.importorskip("qwix")
from .test_qwix import qwix_model  # noqa: E402


def _kernel_grads(native):
    batch = (X, Y)
    return lp.estimate_full_gradients(native, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), [batch])


def test_lora_ga_through_qwix_pairing_matches_native():
    native = native_model()
    q, provider = qwix_model()
    for layer in lp.lora_layers(native).values():  # standard LoRA start (B = 0): LoRA-GA keeps the output
        layer.lora.set_value(layer.lora.get_value().replace(b=0.0 * layer.lora.get_value().b))
    q.fc.kernel_lora_b.set_value(0.0 * q.fc.kernel_lora_b.get_value())
    q.head.kernel_lora_b.set_value(0.0 * q.head.kernel_lora_b.get_value())
    grads = {"fc": _kernel_grads(native)["fc"]}  # LoRA-GA needs 2r <= min(m, n): fc (8 x 6), not head (3 x 8)
    before = q(X)
    lp.lora_ga_init(native, grads, svd="full", key=3)
    new, record = lp.lora_ga_init_paired(
        nnx.as_pure(nnx.state(q)), {f"{k}/kernel": g for k, g in grads.items()}, lp.qwix_pairing(provider), svd="full", key=3
    )
    nnx.update(q, new)
    np.testing.assert_allclose(q(X), before, rtol=1e-5, atol=1e-5)  # W0 - s a0 b0 + s a0 b0
    for name in ["fc"]:
        layer, own = lp.lora_layers(native)[name], getattr(q, name)
        np.testing.assert_allclose(own.kernel_lora_a.get_value(), layer.lora.get_value().a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(own.kernel_lora_b.get_value(), layer.lora.get_value().b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(own.kernel.get_value(), layer.base.kernel.get_value(), rtol=1e-6, atol=1e-6)
        assert record[f"{name}/kernel"].scale == ALPHA / RANK


def test_lora_ga_not_supported_errors():
    q, provider = qwix_model(weight_qtype="int8")
    g = {"fc/kernel": np.ones((6, 8), np.float32)}
    with pytest.raises(ValueError, match=r"layer 'fc/kernel'.*quantized"):
        lp.lora_ga_init_paired(nnx.as_pure(nnx.state(q)), g, lp.qwix_pairing(provider))
    tree = {"fc": {"kernel": np.ones((6, 8), np.float32), "lora_A": np.ones((6, 2), np.float32), "lora_B": np.ones((2, 8), np.float32)}}
    plain = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", 1.0)
    with pytest.raises(ValueError, match=r"not supported for this pairing.*'fc'.*kernel_path"):
        lp.lora_ga_init_paired(tree, {"fc": np.ones((6, 8), np.float32)}, plain)
    with_kernel = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", 1.0, kernel_path=lambda l: f"{l}/kernel")
    new, _ = lp.lora_ga_init_paired(tree, {"fc": np.arange(48, dtype=np.float32).reshape(6, 8)}, with_kernel, svd="full")
    d = np.asarray(new["fc"]["lora_A"]) @ np.asarray(new["fc"]["lora_B"])
    np.testing.assert_allclose(np.asarray(new["fc"]["kernel"]) + d, tree["fc"]["kernel"], rtol=1e-6, atol=1e-6)


def test_peft_export_through_qwix_pairing_matches_native(tmp_path):
    native = native_model()
    q, provider = qwix_model()
    st = nnx.as_pure(nnx.state(q, nnx.LoRAParam))
    got = lp.peft_state_dict_paired(st, lp.qwix_pairing(provider), prefix="bert")
    want = peft_state_dict(native, prefix="bert")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # the directory loads with our PEFT loader into a fresh native model: same factors, same scale
    out = lp.save_peft_adapter_paired(st, lp.qwix_pairing(provider), tmp_path / "ad", base_model_name_or_path=None)
    fresh = lp.apply_lora(Net(nnx.Rngs(0)),
                          lp.LoraConfig(rank=RANK, alpha=1.0, targets=["fc", "head"]), rngs=nnx.Rngs(9))
    load_peft_adapter(fresh, out)
    for name, layer in lp.lora_layers(fresh).items():
        p = layer.lora.get_value()
        assert p.scale == pytest.approx(ALPHA / RANK)
        np.testing.assert_allclose(p.a, getattr(q, name).kernel_lora_a.get_value(), rtol=1e-7)
        np.testing.assert_allclose(p.b, getattr(q, name).kernel_lora_b.get_value(), rtol=1e-7)


def test_peft_export_refuses_multi_axis_factors():
    tree = {"att": {"lora_A": np.ones((6, 2), np.float32), "lora_B": np.ones((2, 2, 4), np.float32)}}
    pairing = lp.name_pairing(r"(?P<layer>.*)/lora_A$", r"(?P<layer>.*)/lora_B$", 1.0)
    with pytest.raises(ValueError, match=r"not supported for layer 'att'.*more than 2 axes"):
        lp.peft_state_dict_paired(tree, pairing)
