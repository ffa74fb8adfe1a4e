"""Instruction data: reading jsonl / csv / parquet, errors naming file and row, loss masks, buckets, prompts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from _sft_models import char_tokenizer

from lorapro_jax.data import BucketedBatcher
from lorapro_jax.data.sft import (
    InstructionDataError,
    InstructionExample,
    encode_instructions,
    iterate_prompt_batches,
    read_instruction_file,
    sft_bucket_lengths,
)
from lorapro_jax.errors import CorruptFileError


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _ex(prompt, response, row=""):
    return InstructionExample(({"role": "user", "content": prompt},), response, row)


def test_reads_the_three_formats_alike(tmp_path):
    recs = [{"q": "1+1?", "a": "2"}, {"q": "x", "a": "y z"}]
    _jsonl(tmp_path / "d.jsonl", recs)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["q", "a"])
        w.writeheader()
        w.writerows(recs)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    got = [read_instruction_file(tmp_path / f"d.{ext}", prompt_column="q", response_column="a")
           for ext in ("jsonl", "csv", "parquet")]
    for examples in got:
        assert [(e.messages[0]["content"], e.response) for e in examples] == [("1+1?", "2"), ("x", "y z")]
        assert examples[0].messages[0]["role"] == "user"
    assert [e.row for e in got[0]] == ["line 1", "line 2"]
    assert [e.row for e in got[1]] == ["row 1", "row 2"]


def test_several_column_names_read_metamathqa_and_gsm8k_alike(tmp_path):
    meta = _jsonl(tmp_path / "m.jsonl", [{"query": "Q1", "response": "R1 The answer is: 5", "type": "GSM_Rv"}])
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": "Q2", "answer": "R2\n#### 7"}])
    cols = dict(prompt_column=("query", "question"), response_column=("response", "answer"))
    got = read_instruction_file(meta, **cols) + read_instruction_file(gsm, **cols)
    assert [(e.messages[0]["content"], e.response) for e in got] == [("Q1", "R1 The answer is: 5"), ("Q2", "R2\n#### 7")]
    bad = _jsonl(tmp_path / "b.jsonl", [{"question": "Q"}])
    with pytest.raises(InstructionDataError, match="line 1: missing field 'response'"):
        read_instruction_file(bad, **cols)


def test_messages_form_last_assistant_turn_is_the_response(tmp_path):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    (e,) = read_instruction_file(_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]))
    assert e.response == "A2" and list(e.messages) == chat[:-1]


@pytest.mark.parametrize("record, fragment", [
    ({"prompt": "p"}, "line 2: missing field 'response'"),
    ({"prompt": "p", "response": 3}, "line 2: field 'response' is a int, not a string"),
    ({"prompt": "p", "response": "  "}, "line 2: empty response"),
    ({"prompt": None, "response": "r"}, "line 2: field 'prompt' is empty (null)"),
    ({"text": "t"}, "line 2: neither 'prompt' + 'response' nor 'messages'"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]},
     "line 2: the last turn is 'user', not 'assistant'"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
     "line 2: empty response"),
    ({"messages": [{"role": "user", "content": ["u"]}, {"role": "assistant", "content": "a"}]},
     "line 2: messages[0].content is a list, not a string"),
    ({"messages": "hello"}, "line 2: field 'messages' holds a str"),
    ([1, 2], "line 2: a list, not an object"),
])
def test_bad_jsonl_records_name_file_line_and_problem(tmp_path, record, fragment):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, record])
    with pytest.raises(InstructionDataError) as info:
        read_instruction_file(path)
    assert isinstance(info.value, CorruptFileError)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)
    assert info.value.row == "line 2"


def test_invalid_json_and_blank_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n')
    with pytest.raises(InstructionDataError, match=r"x\.jsonl: line 3: not valid JSON"):
        read_instruction_file(path)
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    assert [e.row for e in read_instruction_file(path)] == ["line 1", "line 3"]  # blank lines hold no record


def test_csv_errors_name_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\na,b\nc,\n")
    with pytest.raises(InstructionDataError, match=r"d\.csv: row 2: empty response in field 'response'"):
        read_instruction_file(path)
    path.write_text("prompt,answer\na,b\n")
    with pytest.raises(InstructionDataError, match=r"row 1: missing field 'response'"):
        read_instruction_file(path)
    path.write_text("prompt,response\na,b,c\n")
    with pytest.raises(InstructionDataError, match=r"row 1: 1 cell\(s\) more than the header"):
        read_instruction_file(path)


def test_empty_file_and_unknown_type(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(InstructionDataError, match="no records"):
        read_instruction_file(tmp_path / "e.jsonl")
    (tmp_path / "e.txt").write_text("x")
    with pytest.raises(InstructionDataError, match="unknown file type"):
        read_instruction_file(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        read_instruction_file(tmp_path / "missing.jsonl")


def test_loss_mask_covers_response_and_eos_only(tok):
    ds = encode_instructions([_ex("hi", "42")], tok, max_length=64)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # CHATML with one user turn
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    expected = p_ids + tok("42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ds.input_ids[0].tolist() == expected
    assert ds.loss_masks[0].tolist() == [0.0] * len(p_ids) + [1.0, 1.0, 1.0]
    assert int(ds.prompt_lengths[0]) == len(p_ids) and ds.prompt_ids(0).tolist() == p_ids
    assert ds.references == ("42",)


def test_raw_text_without_template(tok):
    ex = InstructionExample(({"role": "system", "content": "S"}, {"role": "user", "content": "U"}), "R")
    ds = encode_instructions([ex], tok, max_length=64, chat_template=False)
    assert tok.decode(ds.prompt_ids(0).tolist()) == "S\n\nU"
    assert ds.loss_masks[0].sum() == 2  # "R" + EOS
    bare = char_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        encode_instructions([ex], bare, max_length=64, chat_template=True)
    assert encode_instructions([ex], bare, max_length=64).prompt_lengths[0] == len("S\n\nU")  # None: raw


def test_overflow_is_dropped_and_reported_never_cut(tok):
    short, long = _ex("a", "b", "line 1"), _ex("a", "b" * 40, "line 2")
    n_short = len(encode_instructions([short], tok, max_length=200).input_ids[0])
    ds = encode_instructions([short, long, short._replace(row="line 3")], tok, max_length=n_short, source="f.jsonl")
    assert len(ds) == 2 and ds.rows == ("line 1", "line 3") and ds.dropped == ("line 2",)
    assert "f.jsonl: 1 of 3 examples are longer than max_length" in ds.overflow_message
    assert "line 2" in ds.overflow_message
    assert all(x.size <= n_short for x in ds.input_ids)
    with pytest.raises(ValueError, match="1 of 3 examples"):
        encode_instructions([short, long, short], tok, max_length=n_short, on_overflow="error")
    with pytest.raises(ValueError, match="no example fits"):
        encode_instructions([long], tok, max_length=n_short)


def test_bucket_lengths():
    assert sft_bucket_lengths(96) == (16, 32, 48, 64, 80, 96)
    b = sft_bucket_lengths(1024)
    assert b[-1] == 1024 and all(y > x for x, y in zip(b, b[1:]))
    assert all(y <= max(x + 16, 1.25 * x + 16) for x, y in zip(b, b[1:]))  # little padding per bucket
    assert len(b) <= 16  # few shapes, few compiles


def test_batches_carry_the_loss_mask_with_static_shapes(tok):
    exs = [_ex("q" * k, "r" * (k % 5 + 1), f"line {k}") for k in range(1, 30)]
    ds = encode_instructions(exs, tok, max_length=80)
    batcher = BucketedBatcher(ds, 4, seed=0)
    assert batcher.buckets == ds.buckets
    seen = 0
    for batch in batcher.epoch(0):
        assert batch["input_ids"].shape == batch["loss_mask"].shape
        assert batch["input_ids"].shape[1] in ds.buckets
        for r, i in enumerate(batch["index"]):
            if i < 0:
                assert batch["loss_mask"][r].sum() == 0
                continue
            seen += 1
            n = ds.input_ids[i].size
            np.testing.assert_array_equal(batch["input_ids"][r, :n], ds.input_ids[i])
            np.testing.assert_array_equal(batch["loss_mask"][r, :n], ds.loss_masks[i])
            assert batch["loss_mask"][r, n:].sum() == 0
            assert batch["loss_mask"][r].sum() == len(exs[i].response) + 1
    assert seen == len(exs)


def test_prompt_batches_are_left_padded(tok):
    exs = [_ex("q" * k, "r") for k in (1, 5, 9, 30)]
    ds = encode_instructions(exs, tok, max_length=80)
    seen = set()
    for batch in iterate_prompt_batches(ds, 3):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == (3, ids.shape[1]) and ids.shape[1] in ds.buckets
        assert np.all(mask[:, -1] == 1) and np.all(np.diff(mask, axis=1) >= 0)  # 0...0 1...1
        for r, i in enumerate(batch["index"]):
            if i >= 0:
                seen.add(int(i))
                p = ds.prompt_ids(int(i))
                np.testing.assert_array_equal(ids[r, -p.size:], p)
                assert mask[r].sum() == p.size
    assert seen == set(range(len(exs)))
