"""The generated arithmetic task: deterministic, disjoint splits, answers that check out."""

from __future__ import annotations

import json
import re

from lorapro_jax.data.arith import ARITH_LICENSE, arith_splits, write_arith_jsonl
from lorapro_jax.data.metrics import extract_answer

_NUM = re.compile(r"\d+")


def _parse(prompt: str) -> tuple[int, tuple]:
    """An independent reading of the problem text: the start count and the operations ``(kind, numbers)``."""
    first, rest = prompt.split(". ", 1)
    ops = []
    for part in rest.split("How many")[0].rstrip(". ").split(", then "):
        nums = tuple(int(x) for x in _NUM.findall(part))
        if any(w in part for w in ("bags of", "boxes of", "packs of")):
            ops.append(("*", nums))
        elif any(w in part for w in ("gives away", "loses", "sells")):
            ops.append(("-", nums))
        else:
            ops.append(("+", nums))
    return int(_NUM.findall(first)[0]), tuple(ops)


def _solve(prompt: str) -> int:
    count, ops = _parse(prompt)
    for kind, nums in ops:
        count += nums[0] * nums[1] if kind == "*" else (-nums[0] if kind == "-" else nums[0])
    return count


def test_deterministic_and_seeded():
    a = arith_splits(seed=0, sizes={"train": 50, "validation": 10, "test": 10})
    b = arith_splits(seed=0, sizes={"train": 50, "validation": 10, "test": 10})
    c = arith_splits(seed=1, sizes={"train": 50, "validation": 10, "test": 10})
    assert a == b and a != c


def test_default_splits_are_disjoint_and_correct():
    splits = arith_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "validation": 100, "test": 200}
    texts = {k: {e.messages[-1]["content"] for e in v} for k, v in splits.items()}
    assert all(len(texts[k]) == len(splits[k]) for k in splits)  # no duplicate within a split
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    problems = {k: {_parse(t) for t in v} for k, v in texts.items()}  # rewordings (other names, items) too
    assert sum(len(v) for v in problems.values()) == sum(len(v) for v in splits.values())
    assert not problems["train"] & problems["test"] and not problems["validation"] & problems["test"]
    assert not problems["train"] & problems["validation"]
    for examples in splits.values():
        for e in examples:
            assert e.messages[0]["role"] == "system" and e.messages[-1]["role"] == "user"
            assert e.response.rsplit("\n", 1)[1].startswith("#### ")
            assert int(extract_answer(e.response)) == _solve(e.messages[-1]["content"]) >= 0


def test_jsonl_round_trip(tmp_path):
    from lorapro_jax.data.sft import read_instruction_file

    paths = write_arith_jsonl(tmp_path, sizes={"train": 5, "test": 3})
    assert set(paths) == {"train", "test"}
    got = read_instruction_file(paths["test"])
    want = arith_splits(sizes={"train": 5, "test": 3})["test"]
    assert [(g.messages, g.response) for g in got] == [(w.messages, w.response) for w in want]
    assert json.loads(paths["train"].read_text().splitlines()[0])["messages"][-1]["role"] == "assistant"
    assert "Apache-2.0" in ARITH_LICENSE
