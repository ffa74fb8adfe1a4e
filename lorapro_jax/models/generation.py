"""Batched autoregressive generation for causal LMs with a key/value cache.

One jitted program per (model structure, batch, prompt length, kind of decoding): a prefill over the whole
left-padded prompt fills a preallocated :class:`~lorapro_jax.models.llama.KVCache`, then a
``lax.while_loop`` feeds one token per step (static shapes throughout) and stops as soon as every row
has produced its end-of-sequence token. Padding never leaks into the result: padded slots are masked
out of every attention row and positions follow the mask (``cumsum(mask) - 1``), so a row's tokens do
not depend on how much padding the batch forced on it (batched generation without the mask is a known
way of getting wrong scores; LoRA-Pro's GSM8K evaluation, arXiv 2407.18242, scores generated answers).

Works on any model with ``init_cache(batch, max_len)`` and ``decode(ids, positions, kv_mask, cache,
index) -> (last logits, cache)`` (:class:`~lorapro_jax.models.LlamaForCausalLM`): plain, LoRA-adapted
(unmerged adapters run as in training, in eval mode) or merged, unrolled or ``scan_layers=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

__all__ = ["GenerateOutput", "generate", "sample_logits"]


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``(batch, max_new_tokens)`` generated ids; after a row's end-of-sequence token (and
            after an early stop) the row is filled with the first ``eos_token_id`` (0 without one).
        lengths: ``(batch,)`` number of generated tokens of each row, its end-of-sequence token
            included (``max_new_tokens`` for a row that never produced one).
    """

    tokens: Int[Array, "batch max_new_tokens"]
    lengths: Int[Array, " batch"]


def sample_logits(
    logits: Float[Array, "batch vocab"], key: Array | None, temperature: float = 0.0, top_p: float = 1.0
) -> Int[Array, " batch"]:
    """Pick one token per row: argmax for ``temperature == 0``, else nucleus sampling.

    Sampling draws from ``softmax(logits / temperature)`` restricted to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (Holtzman et al., 2020; the most likely token is
    always kept, so a tiny ``top_p`` is greedy). Tokens tied with the last kept logit are kept too.

    Args:
        logits: ``(batch, vocab)``.
        key: PRNG key (unused when greedy).
        temperature: ``0`` for greedy, else the softmax temperature.
        top_p: nucleus mass in ``(0, 1]``.
    """
    return _pick(logits, key, float(temperature) == 0.0, float(top_p) < 1.0, temperature, top_p)


def _pick(logits: Array, key: Array | None, greedy: bool, nucleus: bool, temperature: Any, top_p: Any) -> Array:
    """:func:`sample_logits` with the branches static and ``temperature`` / ``top_p`` possibly traced."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if nucleus:
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _is_eos(tokens: Array, eos: Array) -> Array:
    return jnp.any(tokens[..., None] == eos, axis=-1)  # False for an empty ``eos``


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "nucleus"))
def _generate(graphdef, state, input_ids, attention_mask, rng, temperature, top_p, eos, *, max_new_tokens,
              greedy, nucleus):
    def merged() -> Any:
        # Built afresh at each trace level (prefill, loop body): NNX transforms inside the model
        # (nnx.scan over stacked layers) refuse variables created at an outer level.
        model = nnx.merge(graphdef, state, copy=True)
        model.eval()  # LoRA dropout off, no input statistics updated (this copy only)
        return model

    def pick(logits, key):
        return _pick(logits, key, greedy, nucleus, temperature, top_p)

    batch, prompt = input_ids.shape
    mask = attention_mask.astype(jnp.int32)
    kv_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    model = merged()
    cache = model.init_cache(batch, prompt + max_new_tokens)
    logits, cache = model.decode(input_ids, positions, kv_mask, cache, 0)
    start = jnp.sum(mask, axis=1)  # position of the first generated token
    pad = eos[0] if eos.shape[0] else jnp.int32(0)
    key, sub = jax.random.split(rng)
    first = pick(logits, sub)
    done = _is_eos(first, eos)
    tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    lengths = jnp.where(done, 1, max_new_tokens).astype(jnp.int32)

    def cond(carry):
        step, _, _, done, _, _, _ = carry
        return jnp.logical_and(step < max_new_tokens, jnp.logical_not(jnp.all(done)))

    def body(carry):
        step, last, tokens, done, lengths, cache, key = carry
        pos = (start + step - 1)[:, None]
        logits, cache = merged().decode(last[:, None], pos, kv_mask, cache, prompt + step - 1)
        key, sub = jax.random.split(key)
        new = jnp.where(done, pad, pick(logits, sub))
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        ended = jnp.logical_and(jnp.logical_not(done), _is_eos(new, eos))
        lengths = jnp.where(ended, step + 1, lengths)
        return step + 1, new, tokens, jnp.logical_or(done, ended), lengths, cache, key

    carry = (jnp.int32(1), first, tokens, done, lengths, cache, key)
    _, _, tokens, _, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens, lengths)


def _check_inputs(model: Any, input_ids: Any, attention_mask: Any, max_new_tokens: Any, temperature: float,
                  top_p: float, rng: Any) -> tuple[np.ndarray, np.ndarray]:
    if not (callable(getattr(model, "decode", None)) and callable(getattr(model, "init_cache", None))):
        raise TypeError(f"generate: `model` must be a causal LM with a KV cache (e.g. LlamaForCausalLM), "
                        f"got {type(model).__name__}")
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
        raise ValueError(f"generate: `input_ids` must be a non-empty (batch, seq) integer array, got {ids.shape} {ids.dtype}")
    if mask.shape != ids.shape:
        raise ValueError(f"generate: `attention_mask` shape {mask.shape} differs from `input_ids` shape {ids.shape}")
    real = mask > 0
    if not np.all(real[:, -1]) or np.any(real[:, :-1] & ~real[:, 1:]):
        raise ValueError("generate: prompts must be LEFT-padded (the mask of every row is 0...0 1...1 and ends "
                         "with a real token); use tokenizer.padding_side = 'left'")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: `max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: `temperature` must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: `top_p` must be in (0, 1], got {top_p}")
    if temperature > 0.0 and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs `rng`, e.g. jax.random.key(0)")
    return ids, mask


def generate(
    model: nnx.Module,
    input_ids: Int[Array, "batch prompt"],
    attention_mask: Int[Array, "batch prompt"],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    rng: Array | None = None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after each (left-padded) prompt.

    Greedy for ``temperature == 0`` (the argmax of the next-token logits, exactly what a plain loop
    over the full forward does), else temperature / nucleus (``top_p``) sampling
    (:func:`sample_logits`). A row stops at its first ``eos_token_id``; the loop stops when every row
    has. Compiled once per model structure, ``(batch, prompt)`` shape, ``max_new_tokens``, number of
    EOS ids and kind of decoding (greedy / sampling / nucleus sampling; the temperature, ``top_p`` and
    EOS values are runtime inputs), so repeated calls with same-shaped batches (e.g. an evaluation set bucketed to a fixed
    prompt length) reuse the program. The model is run in eval mode (no dropout); it is not modified.

    Args:
        model: a causal LM with a KV-cache path (:class:`~lorapro_jax.models.LlamaForCausalLM`), with
            or without (merged or unmerged) LoRA adapters, unrolled or ``scan_layers=True``.
        input_ids: ``(batch, prompt)`` token ids, LEFT-padded.
        attention_mask: ``(batch, prompt)`` 1 for prompt tokens, 0 for the leading padding.
        max_new_tokens: number of tokens to generate (the length of the output).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling mass in ``(0, 1]`` (1: plain temperature sampling).
        eos_token_id: end-of-sequence id(s); ``None``: always generate ``max_new_tokens``.
        rng: PRNG key, required when sampling.

    Returns:
        :class:`GenerateOutput` ``(tokens (batch, max_new_tokens), lengths (batch,))``.

    Raises:
        ValueError: right-padded or malformed inputs, bad settings, sampling without ``rng``.
        TypeError: a model without a KV-cache path.
    """
    temperature, top_p = float(temperature), float(top_p)
    ids, mask = _check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, rng)
    if eos_token_id is None:
        eos: tuple[int, ...] = ()
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), rng,
                     jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p), jnp.asarray(eos, jnp.int32),
                     max_new_tokens=int(max_new_tokens), greedy=temperature == 0.0, nucleus=top_p < 1.0)
