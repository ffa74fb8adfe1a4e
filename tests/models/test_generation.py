"""Cached batched generation (``models.generate``) against a plain greedy loop over the full forward.

The reference feeds each prompt WITHOUT padding through the model's ordinary (training) forward, takes
the argmax of the last logits, appends it and repeats: no cache, no left padding, no position
arithmetic. ``generate`` must give the same tokens for the prompts generated together in one
left-padded batch, for plain, LoRA-adapted (unmerged), merged and scan-over-layers models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import llama_state_dict, tiny_llama_config, write_checkpoint

import lorapro_jax as lp
from lorapro_jax.models import DEFAULT_LORA_TARGETS, LlamaForCausalLM, generate, load_pretrained, sample_logits
from lorapro_jax.models.generation import _generate

VOCAB, NEW = 61, 8
PROMPTS = [[5, 17, 3, 44, 9], [12, 7], [30, 2, 8, 19, 51, 6, 23, 40]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_llama_config(vocab_size=VOCAB, tied=False)
    return write_checkpoint(tmp_path_factory.mktemp("llama"), cfg, llama_state_dict(cfg, seed=3, tied=False))


_full = nnx.jit(lambda m, ids, mask: m(ids, mask))


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax of the last logits of the full (uncached) forward, appended, n times; one prompt, no padding.

    The sequence lives right-aligned-free in a fixed buffer (real tokens first, so positions are
    ``arange``); causal attention never looks at the unused tail, so one compile serves every step."""
    size = len(PROMPTS[2]) + NEW + 4
    seq = list(prompt)
    for _ in range(n):
        ids = np.zeros((1, size), np.int32)
        ids[0, : len(seq)] = seq
        mask = (np.arange(size) < len(seq)).astype(np.int32)[None]
        logits = _full(model, jnp.asarray(ids), jnp.asarray(mask))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def left_padded(prompts, extra: int = 0):
    width = max(map(len, prompts)) + extra
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def with_random_lora(model, seed: int):
    """LoRA on all seven projections with non-zero B (so the adapters change the outputs)."""
    lp.apply_lora(model, lp.LoraConfig(rank=2, alpha=4.0, targets=DEFAULT_LORA_TARGETS["llama"]), rngs=nnx.Rngs(seed))
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for layer in lp.lora_layers(model).values():
        pair = layer.lora.get_value()
        layer.lora.set_value(pair.replace(b=0.5 * jax.random.normal(next(keys), pair.b.shape)))
    return model


@pytest.fixture(scope="module")
def base(ckpt):
    model = load_pretrained(LlamaForCausalLM, ckpt)
    return model, [naive_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.timeout(60)
def test_greedy_matches_plain_loop_in_one_left_padded_batch(base):
    model, ref = base
    for extra in (0, 3):  # more padding than needed changes nothing
        ids, mask = left_padded(PROMPTS, extra)
        out = generate(model, ids, mask, max_new_tokens=NEW)
        assert np.asarray(out.tokens).tolist() == ref
        assert np.asarray(out.lengths).tolist() == [NEW] * 3


@pytest.mark.timeout(60)
def test_scan_layers_model_generates_the_same_tokens(ckpt, base):
    _, ref = base
    scanned = load_pretrained(LlamaForCausalLM, ckpt, scan_layers=True)
    ids, mask = left_padded(PROMPTS)
    assert np.asarray(generate(scanned, ids, mask, max_new_tokens=NEW).tokens).tolist() == ref


@pytest.mark.timeout(60)
def test_unmerged_and_merged_lora(ckpt, base):
    _, base_ref = base
    ids, mask = left_padded(PROMPTS)
    lora = with_random_lora(load_pretrained(LlamaForCausalLM, ckpt), seed=1)
    ref = [naive_greedy(lora, p, NEW) for p in PROMPTS]
    assert ref != base_ref  # the adapters matter
    assert np.asarray(generate(lora, ids, mask, max_new_tokens=NEW).tokens).tolist() == ref
    merged = lp.merge_and_unwrap(nnx.clone(lora))
    assert not lp.lora_layers(merged)
    assert np.asarray(generate(merged, ids, mask, max_new_tokens=NEW).tokens).tolist() == ref


@pytest.mark.timeout(60)
def test_lora_on_scanned_layers(ckpt):
    ids, mask = left_padded(PROMPTS)
    scan_lora = with_random_lora(load_pretrained(LlamaForCausalLM, ckpt, scan_layers=True), seed=2)
    assert scan_lora.model.layers.self_attn.q_proj.lora.get_value().a.shape[0] == 2  # stacked pairs
    ref = [naive_greedy(scan_lora, p, NEW) for p in PROMPTS]
    assert np.asarray(generate(scan_lora, ids, mask, max_new_tokens=NEW).tokens).tolist() == ref


@pytest.mark.timeout(60)
def test_stops_each_row_at_eos(base):
    model, ref = base
    eos = ref[0][2]  # row 0 ends at its third token; other rows end wherever they first produce it
    ids, mask = left_padded(PROMPTS)
    out = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos)
    for row, tokens, length in zip(ref, np.asarray(out.tokens).tolist(), np.asarray(out.lengths).tolist()):
        want = row.index(eos) + 1 if eos in row else NEW
        assert length == want
        assert tokens[:want] == row[:want]
        assert tokens[want:] == [eos] * (NEW - want)  # padded with the EOS id after the end
    # Several EOS ids: the first one met ends the row.
    out2 = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=[ref[1][1], eos])
    assert int(out2.lengths[1]) == min(ref[1].index(ref[1][1]), ref[1].index(eos) if eos in ref[1] else NEW) + 1


@pytest.mark.timeout(60)
def test_sampling_tiny_top_p_is_greedy_and_keys_matter(base):
    model, ref = base
    ids, mask = left_padded(PROMPTS)
    tiny = generate(model, ids, mask, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, rng=jax.random.key(0))
    assert np.asarray(tiny.tokens).tolist() == ref
    a = generate(model, ids, mask, max_new_tokens=NEW, temperature=2.0, rng=jax.random.key(1))
    b = generate(model, ids, mask, max_new_tokens=NEW, temperature=2.0, rng=jax.random.key(1))
    c = generate(model, ids, mask, max_new_tokens=NEW, temperature=2.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, max_new_tokens=NEW, temperature=1.0)


def test_sample_logits_nucleus_frequencies():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (4000, 1))))
    draw = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    assert set(np.unique(draw)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    assert abs(np.mean(draw == 0) - 0.5 / 0.8) < 0.03
    full = np.asarray(sample_logits(logits, jax.random.key(1), temperature=1.0, top_p=1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, probs, atol=0.03)
    hot = np.asarray(sample_logits(logits, jax.random.key(2), temperature=1e6))  # ~uniform
    np.testing.assert_allclose(np.bincount(hot, minlength=4) / 4000, 0.25, atol=0.03)
    np.testing.assert_array_equal(sample_logits(logits[:3], None), [0, 0, 0])


@pytest.mark.timeout(60)
def test_compiles_once_per_shape(base):
    model, _ = base
    ids, mask = left_padded(PROMPTS)
    before = _generate._cache_size()
    generate(model, ids, mask, max_new_tokens=3)
    generate(model, (ids + 1) * mask, mask, max_new_tokens=3)  # new values, same shapes: no compile
    generate(model, ids, mask, max_new_tokens=3, eos_token_id=7)  # one EOS id: a new program
    generate(model, ids, mask, max_new_tokens=3, eos_token_id=9)  # another value: no compile
    assert _generate._cache_size() == before + 2


def test_rejects_bad_inputs(base):
    model, _ = base
    ids, mask = left_padded(PROMPTS)
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="shape"):
        generate(model, ids, mask[:, 1:], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, mask, max_new_tokens=2, temperature=1.0, top_p=0.0, rng=jax.random.key(0))
    with pytest.raises(TypeError, match="KV cache"):
        generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), ids, mask, max_new_tokens=2)
