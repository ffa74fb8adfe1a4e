"""The model side of ``experiments.finetune``: which checkpoint, which architecture, a fresh copy per run.

``load_base_model`` reads the pretrained Hugging Face checkpoint once per task (with a fresh head);
every run starts from ``fresh_copy(base, arch, seed)``: the same pretrained weights, a head re-drawn from
``seed`` and dropout streams re-keyed from it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .cli import csv_list

__all__ = [
    "HEADS",
    "arch_of",
    "fresh_copy",
    "gguf_file_of",
    "load_base_model",
    "load_model_tokenizer",
    "lora_targets",
    "model_dir",
    "model_type_of",
]


def model_dir(args: argparse.Namespace) -> Path:
    """``--model``, or the default model of the task: SmolLM2-135M-Instruct (GGUF) for the causal-LM tasks,
    else the installed all-MiniLM-L6-v2 directory."""
    if args.model:
        return Path(args.model)
    from .cli import LLM_TASKS

    tasks = getattr(args, "tasks", None) or [getattr(args, "task", "")]
    if tasks and all(t in LLM_TASKS for t in tasks):
        return _smollm2_path()
    from lorapro_jax.models import minilm_path

    return minilm_path()


def _smollm2_path() -> Path:
    from lorapro_jax.models import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file ``path`` names or holds (:func:`lorapro_jax.models.find_gguf`), else None."""
    from lorapro_jax.models import find_gguf

    try:
        return find_gguf(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--model {path}: {e}") from None


def load_model_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint folder, or the one stored in a GGUF file (vocabulary and chat template)."""
    gguf = gguf_file_of(path)
    if gguf is None:
        from lorapro_jax.data import load_tokenizer

        return load_tokenizer(path)
    from lorapro_jax.models import gguf_tokenizer

    return gguf_tokenizer(gguf)


def model_type_of(path: Path) -> str:
    """``model_type`` of the checkpoint's ``config.json`` (``general.architecture`` of a GGUF file)."""
    gguf = gguf_file_of(path)
    if gguf is not None:
        from lorapro_jax.models import gguf_config

        return getattr(gguf_config(gguf), "model_type", "")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SystemExit(f"--model {path}: no config.json (expected a local Hugging Face checkpoint directory)")
    return json.loads(cfg_file.read_text()).get("model_type", "")


def arch_of(model_type: str, head: str) -> str:
    """The call signature of the model: ``bert``, ``t5-cls``, ``t5-seq2seq`` or ``llama``."""
    if model_type == "bert":
        if head == "seq2seq":
            raise SystemExit("--head seq2seq needs an encoder-decoder (T5) model")
        return "bert"
    if model_type == "t5":
        return "t5-cls" if head == "classifier" else "t5-seq2seq"
    if model_type == "llama":
        if head == "seq2seq":
            raise SystemExit("--head seq2seq needs an encoder-decoder (T5) model")
        return "llama"
    raise SystemExit(f"model_type {model_type!r} is not supported (bert, t5, llama)")


#: The trainable head attribute of each architecture (None: the LM head of T5 / Llama, trained only by full FT).
HEADS = {"bert": "classifier", "t5-cls": "classifier", "llama": "score", "t5-seq2seq": None, "llama-lm": None}


def load_base_model(path: Path, arch: str, num_labels: int, args: argparse.Namespace) -> nnx.Module:
    """Load the pretrained checkpoint with a fresh head (no LoRA yet; a causal LM keeps its LM head)."""
    from lorapro_jax.models import (
        BertForSequenceClassification,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        T5EncoderForSequenceClassification,
        T5ForConditionalGeneration,
        load_pretrained,
    )

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kw: dict[str, Any] = {}
    if arch == "bert":
        cls, kw = BertForSequenceClassification, dict(pooling=args.pooling, num_labels=num_labels)
    elif arch == "t5-cls":
        cls, kw = T5EncoderForSequenceClassification, dict(num_labels=num_labels)
    elif arch == "llama":
        cls, kw = LlamaForSequenceClassification, dict(num_labels=num_labels)
    elif arch == "llama-lm":
        cls = LlamaForCausalLM
    else:
        cls = T5ForConditionalGeneration
    return load_pretrained(cls, path, dtype=dtype, rngs=nnx.Rngs(0), **kw)


def fresh_copy(base: nnx.Module, arch: str, seed: int) -> nnx.Module:
    """A copy of ``base`` with the head re-drawn and the dropout RNG streams re-keyed from ``seed``.

    The head keeps the scale of its original initialisation (``std`` of the loaded fresh kernel).
    """
    model = nnx.clone(base)
    key = jax.random.key(seed)
    head = HEADS[arch]
    if head is not None:
        layer = getattr(model, head)
        k = layer.kernel[...]
        std = float(jnp.std(k.astype(jnp.float32)))
        layer.kernel[...] = (std * jax.random.normal(jax.random.fold_in(key, 0), k.shape, jnp.float32)).astype(k.dtype)
        if getattr(layer, "bias", None) is not None:
            layer.bias[...] = jnp.zeros_like(layer.bias[...])
    rng_state = list(nnx.to_flat_state(nnx.state(model, nnx.RngKey)))
    if rng_state:
        keys = jax.random.split(jax.random.fold_in(key, 1), len(rng_state))
        nnx.update(model, nnx.from_flat_state({p: keys[i] for i, (p, _) in enumerate(rng_state)}))
    counts = list(nnx.to_flat_state(nnx.state(model, nnx.RngCount)))
    if counts:
        nnx.update(model, nnx.from_flat_state({p: jnp.zeros(v.shape, v.dtype) for p, v in counts}))
    return model


def _default_targets(model_type: str) -> str:
    from lorapro_jax.models import DEFAULT_LORA_TARGETS

    return DEFAULT_LORA_TARGETS[model_type]  # valid as a full match (LoraConfig.targets)


def lora_targets(args: argparse.Namespace, model_type: str) -> str | list[str]:
    """``--targets`` as a regex or a list of module-name suffixes (default: the family's query/value)."""
    t = args.targets
    if t is None:
        return _default_targets(model_type)
    if isinstance(t, list):
        return [str(x) for x in t]
    if re.fullmatch(r"[\w.]+(,[\w.]+)*", t):  # plain names: suffix list
        return csv_list(t)
    return t

