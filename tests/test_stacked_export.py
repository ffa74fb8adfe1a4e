"""PEFT export/import of stacked adapters: per-layer keys equal to the unrolled twin's, and back."""

import jax
import numpy as np
import pytest
from _stacked_models import D, L, twins
from flax import nnx

import lorapro_jax as lp
from lorapro_jax.export import load_peft_adapter, peft_state_dict, save_peft_adapter

STACKED = {"layers": L}
BASE = nnx.All(nnx.Param, nnx.Not(lp.LoRAParam))  # base weights only


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (3, D))


def test_stacked_peft_keys_and_tensors_equal_the_unrolled_twins():
    scanned, unrolled = twins(seed=0, targets=("q", "g"), a_mask=True)
    got = peft_state_dict(scanned, allow_flatten=True, stacked_prefixes=STACKED)
    want = peft_state_dict(unrolled, allow_flatten=True)
    assert sorted(got) == sorted(want)
    assert "base_model.model.layers.3.q.lora_A.weight" in got
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_stacked_peft_round_trip(tmp_path):
    scanned, unrolled = twins(seed=1, targets=("q", "g"))
    save_peft_adapter(scanned, tmp_path / "ad", base_model_name_or_path="toy", allow_flatten=True,
                      stacked_prefixes=STACKED)
    # the unrolled twin loads the stacked model's adapter file as an ordinary PEFT adapter ...
    fresh_u = twins(seed=4, targets=("q", "g"))[1]
    load_peft_adapter(fresh_u, tmp_path / "ad", allow_flatten=True)
    nnx.update(fresh_u, nnx.state(unrolled, BASE))
    np.testing.assert_allclose(np.asarray(fresh_u(_x())), np.asarray(scanned(_x())), rtol=1e-5, atol=1e-5)
    # ... and a fresh scanned model loads it back into stacked pairs
    fresh = twins(seed=5, targets=("q", "g"))[0]
    cfg = load_peft_adapter(fresh, tmp_path / "ad", allow_flatten=True, stacked_prefixes=STACKED)
    assert cfg["r"] == 2
    for path, layer in lp.lora_layers(fresh).items():
        ref = lp.lora_layers(scanned)[path]
        assert layer.pair.stack_shape == (L,) and layer.pair.in_ndim == ref.pair.in_ndim
        assert layer.gate[...].shape == (L, 2)
        eff = ref.effective_pair()
        np.testing.assert_allclose(np.asarray(layer.pair.a), np.asarray(eff.a), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(layer.pair.b), np.asarray(eff.b), rtol=1e-6)
    nnx.update(fresh, nnx.state(scanned, BASE))
    np.testing.assert_allclose(np.asarray(fresh(_x(1))), np.asarray(scanned(_x(1))), rtol=1e-5, atol=1e-5)


def test_stacked_export_needs_to_know_where_the_layer_index_goes():
    scanned, _ = twins(seed=2, targets=("q",))
    with pytest.raises(ValueError, match=r"'layers\.q' is stacked over 4 layers \(kernel \(4, 16, 16\)\).*stacked_prefixes=\{'<module path>': 4\}"):
        peft_state_dict(scanned)
    with pytest.raises(ValueError, match=r"stacked over 4 layers but stacked_prefixes says 'layers' holds 3"):
        peft_state_dict(scanned, stacked_prefixes={"layers": 3})


def test_stacked_export_reads_hf_stacked_declarations():
    scanned, unrolled = twins(seed=3, targets=("q",))
    type(scanned).hf_stacked = lambda self: {"layers": L}
    try:
        got = peft_state_dict(scanned)
    finally:
        del type(scanned).hf_stacked
    want = peft_state_dict(unrolled)
    assert sorted(got) == sorted(want)


def test_batched_einsum_is_refused_by_peft_export():
    scanned, _ = twins(seed=4, targets=("e",))
    with pytest.raises(ValueError, match=r"'layers\.e'.*batch axes \(2,\).*no batched Linear"):
        peft_state_dict(scanned, stacked_prefixes=STACKED)
