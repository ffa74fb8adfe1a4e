"""``python -m experiments.finetune --task local``: the user's own labelled files, no code.

Files are written here in every supported format (csv / tsv / jsonl / parquet) with string or
integer labels; bad files must fail with a message naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _finetune_models import minilm_dir, write_tiny_bert

from experiments import finetune

WORDS = {"sport": "goal match team win", "tech": "chip software code data", "food": "bread soup cook taste"}
SMALL = ["--max-length", "16", "--batch-size", "4", "--eval-batch-size", "8", "--epochs", "1",
         "--warmup-ratio", "0", "--no-progress", "--rank", "2"]


def _rows(n: int, int_labels: bool = False) -> list[dict]:
    names = sorted(WORDS)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        out.append({"body": f"{WORDS[name]} number {i}", "y": names.index(name) if int_labels else name})
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        df.to_parquet(path)
    return path


def _files(tmp_path: Path, ext: str, splits=("train", "validation", "test"), int_labels=False) -> str:
    sizes = {"train": 9, "validation": 6, "test": 6}
    return ",".join(f"{s}={_write(tmp_path / f'{s}.{ext}', _rows(sizes[s], int_labels))}" for s in splits)


@pytest.fixture(scope="module")
def tokenizer():
    from lorapro_jax.data import load_tokenizer

    return load_tokenizer(minilm_dir())


def _load(files: str, tokenizer, *extra: str):
    args = finetune.parse_args(["--task", "local", "--data-files", files, "--text-column", "body",
                                "--label-column", "y", *extra])
    return finetune.load_task(args, "local", tokenizer, seq2seq=False)


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
@pytest.mark.parametrize("int_labels", [False, True])
def test_formats_and_labels(tmp_path, tokenizer, ext, int_labels):
    task = _load(_files(tmp_path, ext, int_labels=int_labels), tokenizer)
    assert task.num_labels == 3 and len(task.train) == 9
    assert task.label_names == (("0", "1", "2") if int_labels else tuple(sorted(WORDS)))
    assert (task.eval_split, task.final_split) == ("validation", "test")
    assert sorted(task.evals) == ["test", "validation"] and len(task.evals["test"]) == 6
    # string labels -> ids in sorted order: row i has class i % 3 in both cases
    assert list(task.train.labels) == [i % 3 for i in range(9)]


def test_without_test_split_validation_is_final(tmp_path, tokenizer):
    task = _load(_files(tmp_path, "csv", splits=("train", "validation")), tokenizer)
    assert (task.eval_split, task.final_split) == ("validation", "validation")


def test_bad_files_name_file_and_problem(tmp_path, tokenizer, capsys):
    good = _files(tmp_path, "csv")
    val = tmp_path / "validation.csv"
    with pytest.raises(SystemExit, match=r"validation=.*validation\.csv.*\['y'\] not found"):
        _write(val, [{"body": "x", "label": "tech"}])
        _load(good, tokenizer)
    val.write_text("body,y\n")  # header only
    with pytest.raises(SystemExit, match=r"validation=.*validation\.csv.*empty"):
        _load(good, tokenizer)
    with pytest.raises(SystemExit, match=r"test=.*nope\.csv: file not found"):
        _load(f"train={tmp_path / 'train.csv'},validation={tmp_path / 'test.csv'},test={tmp_path / 'nope.csv'}", tokenizer)
    with pytest.raises(SystemExit, match="needs a validation=PATH"):
        _load(f"train={tmp_path / 'train.csv'}", tokenizer)
    with pytest.raises(SystemExit, match=r"unknown split.*'dev'"):
        _load(f"train={tmp_path / 'train.csv'},dev={tmp_path / 'test.csv'}", tokenizer)
    _write(tmp_path / "f.csv", [{"body": f"t {i}", "y": 0.5 + i} for i in range(4)])
    with pytest.raises(SystemExit, match="strings or integers"):
        _load(f"train={tmp_path / 'f.csv'},validation={tmp_path / 'f.csv'}", tokenizer)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "local"])
    assert "--task local needs --data-files" in capsys.readouterr().err


def test_train_on_local_files(tmp_path):
    model = write_tiny_bert(tmp_path / "bert")
    files = _files(tmp_path, "jsonl")
    s = finetune.main(["--model", str(model), "--task", "local", "--data-files", files, "--text-column", "body",
                       "--label-column", "y", "--method", "lora", "--max-steps", "2", "--out-dir",
                       str(tmp_path / "runs"), *SMALL])[0]
    assert s["task"] == "local" and s["final_split"] == "test" and s["steps"] == 2 and s["max_length"] == 16
    assert 0.0 <= s["final_metrics"]["accuracy"] <= 1.0 and math.isfinite(s["final_train_loss"])
    recs = [json.loads(line) for line in (tmp_path / "runs" / "local-lora-s0" / "metrics.jsonl").open()]
    assert {r["split"] for r in recs if r["type"] == "eval"} == {"validation", "test"}
    # the head has one output per class: trainable = LoRA on q, v of 2 layers + head (32 -> 3)
    assert s["trainable_params"] == 2 * 2 * 2 * (32 + 32) + 32 * 3 + 3
