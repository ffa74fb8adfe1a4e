"""Instruction data for causal-LM fine-tuning: records, chat template, response-only loss mask, buckets.

Data flow::

    records (jsonl / csv / tsv / parquet)           read_instruction_file
      -> InstructionExample(messages, response)      prompt turns + the response text
      -> token ids + loss mask over the response     encode_instructions (chat template, EOS appended)
      -> SftDataset                                  an EncodedDataset with per-token loss masks
      -> BucketedBatcher(ds, B)                      fixed (B, L) shapes from ds.buckets, "loss_mask" (B, L)
      -> iterate_prompt_batches(ds, B)               left-padded prompts for generation

Record forms (column names configurable):

* ``prompt`` / ``response`` columns: one user turn and its answer.
* a ``messages`` column in chat form, ``[{"role": ..., "content": ...}, ...]``: the last turn must be the
  ``assistant``'s and is the response; the turns before it are the prompt (at least one).

Every bad record raises :class:`InstructionDataError` (a :class:`~lorapro_jax.errors.CorruptFileError`) that
names the file, the line (jsonl) or row (csv / parquet, 1-based, header excluded) and what was wrong (missing
field, ``None``, not a string, empty response, malformed messages). No record is skipped silently; blank
lines of a jsonl file are not records.

Tokenisation: with a chat template (the default when the tokenizer has one), the prompt is
``apply_chat_template(prompt turns, add_generation_prompt=True)`` tokenised without extra special tokens (the
template writes them); without (``chat_template=False``), the prompt turns' contents are joined by blank
lines, put into ``prompt_template`` when one is given (its ``{prompt}``), and tokenised with the tokenizer's
own special tokens (e.g. BOS). The response is tokenised without
special tokens and the tokenizer's EOS is appended. The loss mask is 1 on the response tokens and the EOS,
0 on the prompt: position ``t`` of the mask says whether token ``t`` is a target of the next-token loss.

Truncation policy (``max_length``): an example is never cut. One whose prompt + response + EOS is longer than
``max_length`` is dropped and reported (``SftDataset.dropped`` holds the rows; the count and the first rows are
in ``SftDataset.overflow_message``), or, with ``on_overflow="error"``, raises ``ValueError`` naming them.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lorapro_jax.data.batching import EncodedDataset
from lorapro_jax.errors import CorruptFileError

__all__ = [
    "InstructionDataError",
    "InstructionExample",
    "SftDataset",
    "encode_instructions",
    "examples_from_records",
    "iterate_prompt_batches",
    "read_instruction_file",
    "sft_bucket_lengths",
]


class InstructionDataError(CorruptFileError):
    """A record of an instruction file is unusable.

    Attributes:
        path: the file.
        row: ``"line 5"`` (jsonl) or ``"row 5"`` (csv / parquet), or ``None`` for the whole file.
        expected: what the record should hold.
        detail: what was wrong.
    """

    def __init__(self, path: str | os.PathLike, row: str | None, detail: str, expected: str = "an instruction record"):
        self.row = row
        super().__init__(path, expected, detail)
        where = f"{self.path}: {row}: " if row else f"{self.path}: "
        self.args = (f"{where}{detail} (expected {expected})",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return (type(self), (self.path, self.row, self.detail, self.expected))


class InstructionExample(NamedTuple):
    """One instruction record: the prompt turns and the response text.

    Attributes:
        messages: prompt turns, ``({"role": str, "content": str}, ...)`` (at least one).
        response: the answer the model is trained to produce (non-empty).
        row: where it came from, e.g. ``"line 3"`` (for reports).
    """

    messages: tuple[dict[str, str], ...]
    response: str
    row: str = ""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructionDataError(path, f"line {n}", f"not valid JSON ({e.msg} at column {e.colno})",
                                           "one JSON object per line") from None
            out.append((f"line {n}", rec))
    return out


def _read_csv(path: Path, delimiter: str) -> list[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = []
        for n, rec in enumerate(reader, start=1):
            if None in rec:  # more cells than header columns
                raise InstructionDataError(path, f"row {n}", f"{len(rec[None])} cell(s) more than the header has",
                                           f"the {len(reader.fieldnames or [])} columns of the header")
            rows.append((f"row {n}", rec))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise InstructionDataError(path, None, f"cannot read it as parquet ({type(e).__name__}: {e})",
                                   "a parquet file") from None
    return [(f"row {n}", rec) for n, rec in enumerate(table.to_pylist(), start=1)]


def _raw_records(path: Path) -> list[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise InstructionDataError(path, None, f"unknown file type {suffix!r}", "a .jsonl, .csv, .tsv or .parquet file")


def _string_field(path: Path, row: str, rec: dict, name: str, what: str) -> str:
    if name not in rec:
        raise InstructionDataError(path, row, f"missing field {name!r} (the record has {sorted(rec)})",
                                   f"a string {what} in {name!r}")
    value = rec[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise InstructionDataError(path, row, f"field {name!r} is empty (null)", f"a string {what} in {name!r}")
    if not isinstance(value, str):
        raise InstructionDataError(path, row, f"field {name!r} is a {type(value).__name__}, not a string",
                                   f"a string {what} in {name!r}")
    if not value.strip():
        raise InstructionDataError(path, row, f"empty {what} in field {name!r}", f"a non-empty {what}")
    return value


def _messages(path: Path, row: str, rec: dict, name: str) -> InstructionExample:
    expected = f"{name!r}: a list of {{'role', 'content'}} turns ending with the assistant's"
    turns = rec[name]
    if not isinstance(turns, (list, tuple)) or len(turns) < 2:
        got = f"{len(turns)} turn(s)" if isinstance(turns, (list, tuple)) else f"a {type(turns).__name__}"
        raise InstructionDataError(path, row, f"field {name!r} holds {got}; need prompt turn(s) and a response",
                                   expected)
    clean = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise InstructionDataError(path, row, f"{name}[{i}] is not a {{'role', 'content'}} mapping: {t!r:.80}",
                                       expected)
        role, content = t["role"], t["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            bad = "role" if not isinstance(role, str) else "content"
            raise InstructionDataError(path, row, f"{name}[{i}].{bad} is a {type(t[bad]).__name__}, not a string",
                                       expected)
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "assistant":
        raise InstructionDataError(path, row, f"the last turn is {clean[-1]['role']!r}, not 'assistant'", expected)
    if not clean[-1]["content"].strip():
        raise InstructionDataError(path, row, f"empty response (the content of {name}[{len(clean) - 1}])",
                                   "a non-empty assistant response")
    return InstructionExample(tuple(clean[:-1]), clean[-1]["content"], row)


def _names(columns: str | Sequence[str]) -> tuple[str, ...]:
    return (columns,) if isinstance(columns, str) else tuple(columns)


def _pick(rec: dict, names: tuple[str, ...]) -> str:
    """The first of ``names`` that ``rec`` has (the first name when it has none: the error names it)."""
    return next((n for n in names if n in rec), names[0])


def examples_from_records(
    records: Sequence[tuple[str, Any]], path: str | os.PathLike, *, prompt_column: str | Sequence[str] = "prompt",
    response_column: str | Sequence[str] = "response", messages_column: str = "messages",
) -> list[InstructionExample]:
    """Validated examples from ``(row label, record)`` pairs (the records of ``path``).

    A record with ``messages_column`` (and no prompt field) is read in chat form; otherwise it needs a prompt
    and a response field (non-empty strings). A column given as several names takes, per record, the first
    name the record has, so one setting reads files of different layouts (MetaMathQA ``query`` / ``response``
    and GSM8K ``question`` / ``answer``: ``prompt_column=("query", "question")``,
    ``response_column=("response", "answer")``).

    Raises:
        InstructionDataError: a record that is not a mapping, lacks a field, holds a non-string or empty value.
    """
    path = Path(path)
    prompts, responses = _names(prompt_column), _names(response_column)
    out = []
    for row, rec in records:
        if not isinstance(rec, dict):
            raise InstructionDataError(path, row, f"a {type(rec).__name__}, not an object", "a JSON object per line")
        p_name, r_name = _pick(rec, prompts), _pick(rec, responses)
        if messages_column in rec and p_name not in rec:
            out.append(_messages(path, row, rec, messages_column))
            continue
        if p_name not in rec and r_name not in rec:
            raise InstructionDataError(path, row, f"neither {'/'.join(prompts)!r} + {'/'.join(responses)!r} nor "
                                       f"{messages_column!r} (the record has {sorted(rec)})",
                                       "prompt/response fields or a messages field (set the column names)")
        prompt = _string_field(path, row, rec, p_name, "prompt")
        response = _string_field(path, row, rec, r_name, "response")
        out.append(InstructionExample(({"role": "user", "content": prompt},), response, row))
    if not out:
        raise InstructionDataError(path, None, "no records", "at least one instruction record")
    return out


def read_instruction_file(
    path: str | os.PathLike, *, prompt_column: str | Sequence[str] = "prompt",
    response_column: str | Sequence[str] = "response", messages_column: str = "messages",
) -> list[InstructionExample]:
    """Read and validate the instruction records of a ``.jsonl`` / ``.csv`` / ``.tsv`` / ``.parquet`` file.

    Args:
        path: the file.
        prompt_column, response_column: the fields of the prompt / response form (a name, or several: the
            first one a record has).
        messages_column: the field of the chat form (used when a record has it and no prompt field).

    Returns:
        One :class:`InstructionExample` per record, in file order.

    Raises:
        FileNotFoundError: no such file.
        InstructionDataError: unreadable file, unknown type, or a bad record (named by line / row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such instruction file")
    return examples_from_records(_raw_records(path), path, prompt_column=prompt_column,
                                 response_column=response_column, messages_column=messages_column)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------


def sft_bucket_lengths(max_length: int, min_length: int = 16, growth: float = 1.25, multiple: int = 16) -> tuple[int, ...]:
    """Bucket lengths growing by ``growth`` or ``multiple`` tokens, whichever is more (rounded up to multiples of
    ``multiple``), then ``max_length``.

    Finer than :func:`~lorapro_jax.data.batching.bucket_lengths` (powers of two), so that instruction
    batches waste less on padding (at most ``multiple`` tokens or ~25 %); only the buckets that hold examples
    compile.

    Returns:
        Strictly increasing, e.g. ``sft_bucket_lengths(96) == (16, 32, 48, 64, 80, 96)``.
    """
    if max_length < 1 or min_length < 1 or growth <= 1.0 or multiple < 1:
        raise ValueError("max_length, min_length, multiple must be positive and growth > 1")
    out, length = [], -(-min_length // multiple) * multiple
    while length < max_length:
        out.append(length)
        length = max(length + multiple, -(-int(math.ceil(length * growth)) // multiple) * multiple)
    out.append(int(max_length))
    return tuple(out)


@dataclass(frozen=True)
class SftDataset(EncodedDataset):
    """Tokenised instruction examples (an :class:`EncodedDataset`, so :class:`BucketedBatcher` batches it).

    Besides the :class:`EncodedDataset` fields (``labels`` are zeros; the filler row is the EOS token):

    Attributes:
        loss_masks: ``N`` float32 arrays, 1 where the token is a response target (response and EOS).
        prompt_lengths: ``(N,)`` int64 prompt tokens of each example.
        references: ``N`` response texts (the reference answers).
        rows: ``N`` row labels of the source file (``"line 3"``).
        dropped: row labels of the examples dropped for being longer than ``max_length``.
        buckets: sequence lengths of the batches (:func:`sft_bucket_lengths`).
        eos_token_id: the EOS appended to every response.
        source: the file (or task name) the examples came from.
    """

    loss_masks: list[np.ndarray]
    prompt_lengths: np.ndarray
    references: tuple[str, ...]
    rows: tuple[str, ...]
    dropped: tuple[str, ...]
    buckets: tuple[int, ...]
    eos_token_id: int
    source: str

    def prompt_ids(self, i: int) -> np.ndarray:
        """The prompt token ids of example ``i``."""
        return self.input_ids[i][: int(self.prompt_lengths[i])]

    @property
    def overflow_message(self) -> str | None:
        """A line reporting the dropped examples (``None`` when none was dropped)."""
        if not self.dropped:
            return None
        shown = ", ".join(self.dropped[:10]) + (" ..." if len(self.dropped) > 10 else "")
        total = len(self.dropped) + len(self)
        return (f"{self.source}: {len(self.dropped)} of {total} examples are longer than max_length "
                f"{self.max_length} tokens (prompt + response + EOS) and were dropped, not cut: {shown}")


def _prompt_text(tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: bool,
                 prompt_template: str | None) -> str:
    if chat_template:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    text = "\n\n".join(m["content"] for m in messages)
    return prompt_template.replace("{prompt}", text) if prompt_template else text


def _token_lists(tokenizer: Any, texts: list[str], add_special_tokens: bool, chunk: int = 1024) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(texts), chunk):
        enc = tokenizer(texts[s: s + chunk], add_special_tokens=add_special_tokens, padding=False, truncation=False,
                        return_attention_mask=False)
        out.extend(list(x) for x in enc["input_ids"])
    return out


def _use_template(tokenizer: Any, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError("chat_template=True but the tokenizer has no chat template (pass chat_template=False "
                         "to feed the raw prompt text)")
    return has if chat_template is None else bool(chat_template)


def encode_instructions(
    examples: Sequence[InstructionExample], tokenizer: Any, *, max_length: int, chat_template: bool | None = None,
    prompt_template: str | None = None, on_overflow: str = "drop", buckets: Sequence[int] | None = None,
    source: str = "",
) -> SftDataset:
    """Tokenise instruction examples into token ids with a response-only loss mask (EOS appended).

    Args:
        examples: from :func:`read_instruction_file` (or made in code).
        tokenizer: a Hugging Face tokenizer with an EOS token (and a chat template, unless ``chat_template``
            is ``False``).
        max_length: longest example (prompt + response + EOS), in tokens; see the module's truncation policy.
        chat_template: apply the tokenizer's chat template (``None``: when it has one).
        prompt_template: without a chat template, a text holding ``{prompt}`` that the raw prompt is put into
            (e.g. the Alpaca template MetaMathQA models are trained with); ignored with a chat template.
        on_overflow: ``"drop"`` (drop and report in ``dropped``) or ``"error"`` (raise) for too-long examples.
        buckets: batch lengths (default :func:`sft_bucket_lengths` of ``max_length``).
        source: name used in reports (the file).

    Returns:
        An :class:`SftDataset` of the examples that fit, in input order.

    Raises:
        ValueError: no EOS token, ``on_overflow="error"`` and an example is too long, or nothing fits.
    """
    if on_overflow not in ("drop", "error"):
        raise ValueError(f"on_overflow must be 'drop' or 'error', got {on_overflow!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (needed to end every response)")
    use = _use_template(tokenizer, chat_template)
    if prompt_template is not None and "{prompt}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
    prompts = _token_lists(tokenizer, [_prompt_text(tokenizer, e.messages, use, prompt_template) for e in examples],
                           add_special_tokens=not use)
    responses = _token_lists(tokenizer, [e.response for e in examples], add_special_tokens=False)
    ids, masks, plens, refs, rows, dropped = [], [], [], [], [], []
    for e, p, r in zip(examples, prompts, responses):
        r = r + [int(eos)]
        if len(p) + len(r) > max_length:
            dropped.append(e.row or f"example {len(rows) + len(dropped)}")
            continue
        ids.append(np.asarray(p + r, np.int32))
        masks.append(np.concatenate([np.zeros(len(p), np.float32), np.ones(len(r), np.float32)]))
        plens.append(len(p))
        refs.append(e.response)
        rows.append(e.row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ds = SftDataset(
        input_ids=ids, token_type_ids=None, labels=np.zeros(len(ids), np.int32),
        lengths=np.asarray([x.size for x in ids], np.int64), max_length=int(max_length), pad_token_id=int(pad),
        filler_input_ids=np.asarray([eos], np.int32), filler_token_type_ids=None, loss_masks=masks,
        prompt_lengths=np.asarray(plens, np.int64), references=tuple(refs), rows=tuple(rows), dropped=tuple(dropped),
        buckets=tuple(buckets) if buckets is not None else sft_bucket_lengths(max_length), eos_token_id=int(eos),
        source=source,
    )
    if dropped and on_overflow == "error":
        raise ValueError(ds.overflow_message)
    if not ids:
        raise ValueError(f"{source}: no example fits in max_length {max_length} tokens ({len(dropped)} dropped)")
    return ds


def iterate_prompt_batches(ds: SftDataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Left-padded prompt batches for generation, in dataset order within each prompt-length bucket.

    Yields:
        ``{"input_ids": (B, L) int32, "attention_mask": (B, L) int32, "index": (B,) int32}`` with ``L`` a bucket
        length (the smallest of ``ds.buckets`` holding the batch's prompts) and ``B = batch_size``; the prompt
        sits at the right end (left padding); filler rows (``index == -1``) hold the EOS token alone.
    """
    lengths = ds.prompt_lengths
    buckets = np.asarray(ds.buckets)
    which = np.searchsorted(buckets, lengths, side="left")
    for k in np.unique(which):
        members = np.flatnonzero(which == k)
        length = int(buckets[k])
        for s in range(0, members.size, batch_size):
            rows = np.full(batch_size, -1, np.int64)
            chunk = members[s: s + batch_size]
            rows[: chunk.size] = chunk
            ids = np.full((batch_size, length), ds.pad_token_id, np.int32)
            mask = np.zeros((batch_size, length), np.int32)
            for r, i in enumerate(rows):
                p = ds.prompt_ids(int(i)) if i >= 0 else ds.filler_input_ids
                ids[r, length - p.size:] = p
                mask[r, length - p.size:] = 1
            yield {"input_ids": ids, "attention_mask": mask, "index": rows.astype(np.int32)}
