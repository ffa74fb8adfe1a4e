"""The pieces of ``experiments.finetune``: help text, warm-up, the traced peak lr, report order, env setup."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _finetune_models import write_tiny_bert

from experiments import cli, methods, report


def test_help_has_text_and_one_default_per_option():
    text = cli.build_parser().format_help()
    assert "(default: None)" not in text
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    opts = [b for b in blocks if b.startswith("--")]
    assert len(opts) == len([a for a in cli.build_parser()._actions if a.option_strings]) - 1  # minus -h
    for block in opts:
        flag = block.split()[0]
        body = " ".join(block.split()[1:])
        assert len(body) > 10, f"{flag} has no help"
        assert body.count("default") <= 1, f"{flag}: {body}"
    for flag in ("--epochs", "--batch-size", "--schedule", "--warmup-ratio", "--weight-decay", "--rank", "--alpha",
                 "--lora-dropout", "--lora-pro-form", "--x-mode", "--lora-ga-gamma", "--alora-start"):
        block = next(b for b in opts if b.split()[0] == flag)
        assert "(default:" in " ".join(block.split()), flag
    lr = " ".join(next(b for b in opts if b.startswith("--lr ")).split())
    assert "default: 0.001" in lr


def test_max_length_default_per_task():
    """bbc cuts articles to 32 tokens (the quick embedded default), other tasks 128; --max-length wins."""
    args = cli.parse_args([])
    assert (cli.max_length_for(args, "bbc"), cli.max_length_for(args, "local")) == (32, 128)
    assert cli.max_length_for(args, "glue:sst2") == cli.DEFAULT_MAX_LENGTH == 128
    args = cli.parse_args(["--max-length", "64"])
    assert (cli.max_length_for(args, "bbc"), cli.max_length_for(args, "local")) == (64, 64)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_never_starts_at_zero(schedule):
    total, ratio = 26, 0.03
    w = int(np.ceil(ratio * total))  # 1 warm-up step, as in the default run
    shape = methods.lr_shape(schedule, ratio, total)
    values = np.array([float(shape(k)) for k in range(total)])
    assert values[0] == pytest.approx(1.0 / (w + 1))  # the first step trains at peak / 2, not 0
    assert values[w] == pytest.approx(1.0)
    assert np.all(values > 0)
    shape = methods.lr_shape(schedule, 0.25, 20)  # w = 5: 1/6, 2/6, ..., 1
    np.testing.assert_allclose([float(shape(k)) for k in range(6)], np.arange(1, 7) / 6, rtol=1e-6)
    if schedule != "constant":
        assert float(methods.lr_shape(schedule, 0.0, 10)(10)) == pytest.approx(0.0, abs=1e-7)


def test_traced_peak_lr_matches_optax_and_compiles_once():
    """The same updates as optax.adamw with the schedule peak * shape; one compile for two peaks."""
    shape = methods.lr_shape("cosine", 0.2, 10)
    holder = methods.PeakLr()
    tx = methods.with_traced_peak_lr(lambda lr: optax.adamw(lr, weight_decay=0.01), shape, holder)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    rng = np.random.default_rng(0)
    grads = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(4)]
    for peak in (1e-2, 3e-3):
        holder.value = peak
        ref_tx = optax.adamw(lambda c, peak=peak: peak * shape(c), weight_decay=0.01)
        p = q = jnp.ones((3, 4))
        s, rs = tx.init(p), ref_tx.init(q)
        for g in grads:
            p, s = step(p, s, g)
            u, rs = ref_tx.update(g, rs, q)
            q = optax.apply_updates(q, u)
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-6, atol=1e-7)
        assert float(s.peak) == pytest.approx(peak)
    assert len(traces) == 1


def _summary(method, seed, acc, lr=1e-3):
    return {"task": "bbc", "method": method, "seed": seed, "final_split": "test", "primary_metric": "accuracy",
            "final_metrics": {"accuracy": acc}, "final_train_loss": 0.5, "trainable_params": 10, "wall_time_s": 2.0,
            "mean_step_time_s": 0.1, "peak_lr": lr}


def test_report_orders_methods_like_finetune_and_no_fake_spread():
    runs = [_summary("full", 0, 0.9), _summary("alora", 0, 0.8), _summary("lora-pro", 0, 0.85),
            _summary("lora", 0, 0.7)]
    rows = report.aggregate(runs)
    assert [r["method"] for r in rows] == ["lora", "lora-pro", "alora", "full"]
    table = report.format_mean_table(runs, markdown=True)
    assert "±" not in table.split("\n", 2)[2] and "| bbc | lora | 1 | accuracy | 70.00 |" in table
    per_run = report.format_runs_table(runs, markdown=True).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in per_run] == ["lora", "lora-pro", "alora", "full"]
    two = report.format_mean_table(runs + [_summary("lora", 1, 0.8)], markdown=True)
    assert "| bbc | lora | 2 | accuracy | 75.00 ± 7.07 |" in two


def test_entry_sets_openblas_and_silences_transformers_advice():
    code = ("import os, experiments, transformers; "
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.split() == ["1", "1"]
    assert "PyTorch was not found" not in out.stderr


@pytest.mark.slow
def test_learning_rates_share_one_compiled_step(tmp_path):
    """A second run at another lr in the same session compiles nothing (counted by JAX's own monitoring)."""
    from jax import monitoring

    from experiments import runner

    model = write_tiny_bert(tmp_path / "bert")
    args = cli.parse_args(["--model", str(model), "--method", "lora-pro", "--max-per-class", "4",
                           "--eval-max-per-class", "2", "--max-length", "16", "--batch-size", "4",
                           "--eval-batch-size", "8", "--epochs", "1", "--max-steps", "3", "--no-progress",
                           "--rank", "2", "--out-dir", str(tmp_path / "runs")])
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    session = runner.open_session(args, "bbc")
    first = runner.run_single(session, "lora-pro", 0, lr=1e-3, name="a")
    assert len(compiles) > 0  # the listener sees compilations
    compiles.clear()
    second = runner.run_single(session, "lora-pro", 0, lr=1e-2, name="b")
    assert compiles == []
    train = lambda name: [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").open()
                          if '"train"' in line]
    lrs_a = [r["lr"] for r in train("a")]
    lrs_b = [r["lr"] for r in train("b")]
    np.testing.assert_allclose(np.array(lrs_b) / np.array(lrs_a), 10.0, rtol=1e-6)
    assert first["final_train_loss"] != second["final_train_loss"]  # the lr really changed the training
    assert (tmp_path / "runs" / "b" / "predictions.npz").is_file()


def test_method_variants_are_their_base_method_with_options():
    args = cli.parse_args(["--method", "rslora,lora-pro-lean,lora-pro", "--lora-pro-form", "efficient"])
    base, vargs = cli.resolve_method("lora-pro-lean", args)
    assert (base, vargs.lora_pro_form, args.lora_pro_form) == ("lora-pro", "lean", "efficient")  # args untouched
    assert cli.resolve_method("lora-pro", args) == ("lora-pro", args)
    base, vargs = cli.resolve_method("rslora", args)
    assert base == "lora" and vargs.rslora is True and methods.lora_config(vargs, base, "bert").rslora
    assert set(cli.METHOD_VARIANTS) <= set(cli.METHODS)
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "lora-pro-fast"])


def _session(tmp_path, *extra):
    from experiments import runner

    model = write_tiny_bert(tmp_path / "bert")
    args = cli.parse_args(["--model", str(model), "--max-per-class", "4", "--eval-max-per-class", "2",
                           "--max-length", "16", "--batch-size", "4", "--eval-batch-size", "8", "--epochs", "1",
                           "--max-steps", "2", "--no-progress", "--rank", "2", "--weight-decay", "0",
                           "--out-dir", str(tmp_path / "runs"), *extra])
    return runner.open_session(args, "bbc")


@pytest.mark.slow
def test_variant_run_equals_the_base_method_run_with_the_option(tmp_path):
    """``--method lora-pro-sgd`` trains exactly like ``--method lora-pro --lora-pro-form sgd``."""
    from experiments import runner

    losses = lambda name: [json.loads(line)["loss"] for line in (tmp_path / "runs" / name / "metrics.jsonl").open()
                           if '"train"' in line]
    a = runner.run_single(_session(tmp_path), "lora-pro-sgd", 0, lr=0.5, name="variant")
    b = runner.run_single(_session(tmp_path, "--lora-pro-form", "sgd"), "lora-pro", 0, lr=0.5, name="option")
    assert (a["method"], a["base_method"], b["method"]) == ("lora-pro-sgd", "lora-pro", "lora-pro")
    assert losses("variant") == losses("option") and len(losses("variant")) == 2
    assert a["final_metrics"] == b["final_metrics"]


@pytest.mark.slow
def test_no_train_head_freezes_the_head_for_every_method(tmp_path):
    from flax import nnx

    from experiments import runner
    from experiments.modeling import HEADS
    from experiments.steps import device_batch, train_step

    session = _session(tmp_path, "--no-train-head")
    head = HEADS[session.spec.arch]
    for method in ("full", "lora"):
        r = runner._build(session, method, 0, 1e-2, method, tmp_path / "runs", 0.0)
        trainable = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(r.model, r.mstate.wrt))]
        assert trainable and not any(head in p for p in trainable), method
        snap = lambda model: {jax.tree_util.keystr(p): np.array(x) for p, x in
                              jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
        before = snap(r.model)
        train_step(r.model, r.opt, device_batch(next(iter(r.batcher.epoch(0)))), session.spec)
        after = snap(r.model)
        changed = {p for p in before if not np.array_equal(before[p], after[p])}
        assert changed and not any(head in p for p in changed), (method, sorted(changed)[:3])
        if method == "full":  # every other weight trains
            assert any("query" in p for p in changed) and any("embeddings" in p for p in changed)


def test_finetune_help_says_what_no_arguments_does():
    text = cli.build_parser().format_help()
    assert "With no arguments it runs the embedded comparison" in text
    assert "python -m experiments.finetune --method lora-pro --seeds 0,1,2" in text


def test_lora_pro_form_full_is_a_deprecated_alias_of_adamw():
    assert cli.parse_args([]).lora_pro_form == "adamw"
    with pytest.warns(FutureWarning, match="--lora-pro-form full is deprecated.*--method full"):
        args = cli.parse_args(["--lora-pro-form", "full"])
    assert args.lora_pro_form == "adamw"
    tx = methods._method_optimizer(args, "lora-pro")
    assert tx.keywords["form"] == "full"  # the library's name of the same form


def test_full_lr_following_lr_is_said(capsys):
    from experiments import finetune

    args = cli.parse_args(["--lr", "0.01", "--method", "lora,full"])
    assert finetune.full_lr_follows_lr(args) and methods.peak_lr(args, "full") == 0.01
    assert "full 0.01 (from --lr: no --full-lr given)" in finetune.lr_note(args, args.methods)
    args = cli.parse_args(["--lr", "0.01", "--full-lr", "1e-4", "--method", "lora,full"])
    assert not finetune.full_lr_follows_lr(args) and methods.peak_lr(args, "full") == 1e-4
    note = finetune.lr_note(args, args.methods)
    assert "full 0.0001" in note and "from --lr" not in note


def test_default_task_uses_the_swept_lrs_and_says_so():
    """With no lr given, lora / lora-pro / full on bbc train at the lrs the shipped sweep chose on validation."""
    from experiments import finetune

    swept = Path(__file__).resolve().parents[1] / methods.TUNED_LRS_SOURCE
    text = swept.read_text()
    # the table's chosen lrs, read from the shipped results file (not from the code under test)
    chosen = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in text.splitlines()
              if line.startswith("| lora |") or line.startswith("| lora-pro |") or line.startswith("| full |")}
    args = cli.parse_args([])
    assert {m: methods.peak_lr(args, m, "bbc") for m in args.methods} == chosen
    note = finetune.lr_note(args, args.methods)
    assert "(tuned)" in note and methods.TUNED_LRS_SOURCE in note
    # variants, other tasks and an explicit --lr fall back to the fixed defaults
    assert methods.peak_lr(args, "lora-pro-lean", "bbc") == cli.DEFAULT_LR
    assert methods.peak_lr(args, "lora", "local") == cli.DEFAULT_LR
    lean = cli.resolve_method("lora-pro-lean", args)[1]
    assert methods.peak_lr(lean, "lora-pro", "bbc") == cli.DEFAULT_LR
    given = cli.parse_args(["--lr", "5e-4"])
    assert methods.peak_lr(given, "lora", "bbc") == 5e-4 and methods.peak_lr(given, "full", "bbc") == 5e-4
