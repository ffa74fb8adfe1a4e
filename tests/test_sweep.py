"""``python -m experiments.sweep``: lr selection on validation only, resuming, the bootstrap intervals.

The selection / resume tests replace the training by a fake runner that writes finished runs with chosen
validation and test accuracies (so that test would pick another lr than validation); the intervals are
checked against a loop written here from the documented protocol and against the normal approximation;
one slow test runs a tiny real sweep end to end (worker processes, then a resumed extension in-process).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _finetune_models import write_tiny_bert

from experiments import sweep, sweep_stats

N_TEST = 100
# (method, lr) -> (validation accuracy, test accuracy): test would pick the other lr
FAKE = {
    ("lora", 1e-3): (0.80, 0.60), ("lora", 1e-2): (0.70, 0.90),
    ("full", 1e-4): (0.50, 0.95), ("full", 3e-5): (0.85, 0.70),
}


def _scores_with_accuracy(acc: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n, 3) whose argmax is right on exactly round(acc * n) examples (which ones depends on seed)."""
    labels = np.arange(N_TEST) % 3
    right = np.zeros(N_TEST, bool)
    right[np.random.default_rng(seed).permutation(N_TEST)[: round(acc * N_TEST)]] = True
    pred = np.where(right, labels, (labels + 1) % 3)
    return np.eye(3, dtype=np.float32)[pred], labels


def _fake_run_specs(calls):
    def run_specs(args, specs, runs_dir):
        for method, lr, seed in specs:
            calls.append((method, lr, seed))
            val, test = FAKE[(method, lr)]
            test = test + 0.01 * seed  # seeds differ a little
            d = runs_dir / sweep.run_dir_name(method, lr, seed)
            d.mkdir(parents=True, exist_ok=True)
            scores, labels = _scores_with_accuracy(test, seed)
            np.savez(d / "predictions.npz", scores=scores, labels=labels, index=np.arange(N_TEST))
            (d / "metrics.jsonl").write_text("".join(
                json.dumps({"type": "train", "step": i + 1, "loss": 1.0 / (i + 1) + lr}) + "\n" for i in range(5)))
            (d / "summary.json").write_text(json.dumps({
                "primary_metric": "accuracy", "last_eval_metrics": {"accuracy": val},
                "final_metrics": {"accuracy": float(np.mean(scores.argmax(-1) == labels))}, "final_split": "test",
                "eval_split": "validation", "final_train_loss": 0.5, "last_step_train_loss": 0.4, "steps": 5,
                "wall_time_s": 1.0, "trainable_params": 7}))
    return run_specs


ARGS = ["--task", "bbc", "--method", "lora,full", "--lrs", "1e-3,1e-2", "--full-lrs", "3e-5,1e-4", "--no-progress",
        "--bootstrap", "500", "--compile-cache", "none"]


def test_lr_chosen_on_validation_only_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "_run_specs", _fake_run_specs(calls))
    argv = [*ARGS, "--out-dir", str(tmp_path), "--sweep-name", "s", "--seeds", "0,1,2", "--tune-seeds", "0"]
    res = sweep.main(argv)
    assert {m: r["chosen_lr"] for m, r in res["methods"].items()} == {"lora": 1e-3, "full": 3e-5}
    # grid on the tuning seed only, the other seeds only at the chosen lr
    assert sorted(calls) == sorted([("lora", 1e-3, 0), ("lora", 1e-2, 0), ("full", 3e-5, 0), ("full", 1e-4, 0),
                                    ("lora", 1e-3, 1), ("lora", 1e-3, 2), ("full", 3e-5, 1), ("full", 3e-5, 2)])
    lora = res["methods"]["lora"]
    assert lora["test_per_seed"] == pytest.approx([0.60, 0.61, 0.62])
    assert lora["test_mean"] == pytest.approx(0.61) and lora["test_std"] == pytest.approx(0.01)
    assert lora["ci_low"] <= 0.61 <= lora["ci_high"]
    # each method against each baseline in the sweep (full, lora), paired: the same difference with opposite signs
    to_full, to_lora = res["differences"]["full"]["lora - full"], res["differences"]["lora"]["full - lora"]
    assert to_full["diff"] == pytest.approx(0.61 - 0.71) and to_lora["diff"] == pytest.approx(0.10)
    assert (to_full["low"], to_full["high"]) == pytest.approx((-to_lora["high"], -to_lora["low"]), abs=0.03)
    assert res["compute"]["lora"] == {"runs": 4, "run_wall_time_s": 4.0}
    out = tmp_path / "s"
    assert json.loads((out / "results.json").read_text())["methods"]["full"]["chosen_lr"] == 3e-5
    md = (out / "results.md").read_text()
    assert "| lora | 0.001 | 3 |" in md and "| full - lora | +10.00 |" in md and "lora 4 runs" in md
    for png in ("accuracy_vs_lr.png", "loss_at_chosen_lr.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming: nothing runs again; a run without summary.json (interrupted) runs again, alone
    calls.clear()
    sweep.main(argv)
    assert calls == []
    (out / "runs" / "lora-lr0.01-s0" / "summary.json").unlink()
    sweep.main(argv)
    assert calls == [("lora", 1e-2, 0)]
    # other settings in the same directory are refused
    with pytest.raises(SystemExit, match="other settings"):
        sweep.main([*argv, "--rank", "4"])


def test_failed_lr_is_never_chosen(tmp_path, monkeypatch):
    calls = []
    fake = _fake_run_specs(calls)

    def run_specs(args, specs, runs_dir):
        fake(args, [s for s in specs if s[:2] != ("full", 3e-5)], runs_dir)
        for s in specs:
            if s[:2] == ("full", 3e-5):  # diverged
                d = runs_dir / sweep.run_dir_name(*s)
                d.mkdir(parents=True, exist_ok=True)
                (d / "failed.json").write_text(json.dumps({"error": "FloatingPointError: non-finite loss"}))

    monkeypatch.setattr(sweep, "_run_specs", run_specs)
    res = sweep.main([*ARGS, "--out-dir", str(tmp_path), "--seeds", "0"])
    assert res["methods"]["full"]["chosen_lr"] == 1e-4
    assert res["validation_by_lr"]["full"]["3e-05"]["failed"] == 1
    json.loads((tmp_path / "bbc-sweep" / "results.json").read_text())  # strict JSON (no -Infinity)


def test_select_lr_ties_and_tuning_seeds():
    runs = [
        {"method": "m", "lr": 1e-3, "seed": 0, "val": 0.9, "train_loss": 0.3},
        {"method": "m", "lr": 1e-2, "seed": 0, "val": 0.9, "train_loss": 0.2},  # tie: lower train loss wins
        {"method": "m", "lr": 1e-1, "seed": 0, "val": 0.5, "train_loss": 0.1},
        {"method": "m", "lr": 1e-1, "seed": 5, "val": 1.0, "train_loss": 0.1},  # not a tuning seed: ignored
    ]
    assert sweep_stats.select_lr(runs, [0]) == {"m": 1e-2}
    assert sweep_stats.select_lr(runs, [0, 5]) == {"m": 1e-2}  # 1e-1: mean 0.75 < 0.9
    with pytest.raises(ValueError, match="every learning rate"):
        sweep_stats.select_lr([{"method": "m", "lr": 1.0, "seed": 0, "val": None, "failed": True}], [0])


def _loop_bootstrap(scores, labels, replicates, level, seed):
    """The documented protocol, written as plain loops."""
    rng = np.random.default_rng(seed)
    n_seeds, n = len(scores), len(labels)
    s_idx = rng.integers(0, n_seeds, (replicates, n_seeds))
    e_idx = rng.integers(0, n, (replicates, n))
    stats = []
    for b in range(replicates):
        accs = []
        for j in range(n_seeds):
            pred = scores[s_idx[b, j]].argmax(-1)
            accs.append(sum(int(pred[i] == labels[i]) for i in e_idx[b]) / n)
        stats.append(sum(accs) / n_seeds)
    return np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])


def test_bootstrap_matches_the_documented_protocol():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 60)
    scores = [rng.normal(size=(60, 4)) + 2.0 * np.eye(4)[labels] * (k + 1) / 3 for k in range(3)]
    got = sweep_stats.bootstrap_interval(scores, [labels] * 3, replicates=300, level=0.9, seed=7)
    low, high = _loop_bootstrap(scores, labels, 300, 0.9, 7)
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)
    accs = [float(np.mean(s.argmax(-1) == labels)) for s in scores]
    assert got["mean"] == pytest.approx(np.mean(accs)) and got["std"] == pytest.approx(np.std(accs, ddof=1))
    # a generic metric (not the vectorised accuracy path) gives the same interval for accuracy
    slow = sweep_stats.bootstrap_interval(scores, [labels] * 3, metric=lambda s, y: float(np.mean(s.argmax(-1) == y)),
                                          replicates=300, level=0.9, seed=7)
    assert (slow["low"], slow["high"]) == pytest.approx((low, high), abs=1e-12)


def test_bootstrap_one_seed_matches_normal_approximation():
    n, p = 4000, 0.8
    labels = np.zeros(n, int)
    scores, _ = np.eye(2)[(np.arange(n) >= p * n).astype(int)], None
    got = sweep_stats.bootstrap_interval([scores], [labels], replicates=2000, seed=0)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert got["std"] is None and got["mean"] == pytest.approx(p)
    assert got["low"] == pytest.approx(p - half, abs=0.003) and got["high"] == pytest.approx(p + half, abs=0.003)


def test_bootstrap_difference_is_paired_over_examples():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    base = [rng.normal(size=(200, 3)) for _ in range(2)]
    same = sweep_stats.bootstrap_difference(base, base, [labels], replicates=400, seed=3)
    assert same["diff"] == 0.0 and same["low"] <= 0.0 <= same["high"]
    better = [s + 5.0 * np.eye(3)[labels] for s in base]
    d = sweep_stats.bootstrap_difference(better, base, [labels], replicates=400, seed=3)
    assert d["excludes_zero"] and d["low"] > 0.3
    # against the protocol in loops: seed draws of a, of b, then examples
    r = np.random.default_rng(3)
    sa, sb, e = r.integers(0, 2, (400, 2)), r.integers(0, 2, (400, 2)), r.integers(0, 200, (400, 200))
    acc = lambda s, idx: np.mean(s.argmax(-1)[idx] == labels[idx])
    diffs = [np.mean([acc(better[j], e[b]) for j in sa[b]]) - np.mean([acc(base[j], e[b]) for j in sb[b]])
             for b in range(400)]
    assert (d["low"], d["high"]) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)


@pytest.mark.slow
def test_tiny_real_sweep(tmp_path):
    """Worker processes for the grid, then an in-process resumed extension to a third seed."""
    model = write_tiny_bert(tmp_path / "bert")
    words = {"a": "goal match team", "b": "chip code data", "c": "bread soup cook"}
    for split, n in (("train", 12), ("validation", 6), ("test", 6)):
        rows = ["text,label"] + [f"{words[k]} {i},{k}" for i in range(n) for k in [sorted(words)[i % 3]]]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    files = ",".join(f"{s}={tmp_path / f'{s}.csv'}" for s in ("train", "validation", "test"))
    common = ["--model", str(model), "--task", "local", "--data-files", files, "--method", "lora,full",
              "--lrs", "1e-3,1e-2", "--full-lrs", "1e-4", "--max-length", "16", "--batch-size", "4", "--epochs", "1",
              "--rank", "2", "--out-dir", str(tmp_path / "runs"), "--sweep-name", "tiny", "--tune-seeds", "0",
              "--bootstrap", "200", "--no-progress"]
    res = sweep.main([*common, "--seeds", "0,1", "--jobs", "2"])
    out = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "full-lr0.0001-s0", "full-lr0.0001-s1", "lora-lr0.001-s0", f"lora-lr{res['methods']['lora']['chosen_lr']:g}-s1",
        "lora-lr0.01-s0"]
    for m in ("lora", "full"):
        r = res["methods"][m]
        assert r["seeds"] == [0, 1] and r["ci_low"] <= r["test_mean"] <= r["ci_high"]
        assert len(r["loss_curve_mean"]) == 3 and r["wall_time_per_run_s"] > 0
    assert (out / "loss_at_chosen_lr.png").is_file() and list((tmp_path / "runs" / ".jax_cache").iterdir())
    before = {p: p.stat().st_mtime for p in (out / "runs").glob("*/summary.json")}
    res3 = sweep.main([*common, "--seeds", "0,1,2", "--jobs", "1"])
    after = {p: p.stat().st_mtime for p in (out / "runs").glob("*/summary.json")}
    assert set(after) - set(before) == {out / "runs" / f"lora-lr{res['methods']['lora']['chosen_lr']:g}-s2" / "summary.json",
                                        out / "runs" / "full-lr0.0001-s2" / "summary.json"}
    assert all(after[p] == t for p, t in before.items())  # finished runs were not redone
    assert res3["methods"]["full"]["seeds"] == [0, 1, 2]


def test_method_lrs_and_alignment_in_the_results(tmp_path, monkeypatch):
    """``--method-lrs`` replaces one method's grid; the cosines logged at the chosen lr are averaged."""
    calls = []
    fake = _fake_run_specs(calls)
    monkeypatch.setitem(FAKE, ("lora", 3.0), (0.99, 0.5))  # best on validation

    def run_specs(args, specs, runs_dir):
        fake(args, specs, runs_dir)
        for method, lr, seed in specs:  # two measured steps per run
            with open(runs_dir / sweep.run_dir_name(method, lr, seed) / "metrics.jsonl", "a") as f:
                f.writelines(json.dumps({"type": "alignment", "step": step, "cos_overall": c}) + "\n" for step, c in ((1, 0.1 + seed + lr), (25, 0.3 + seed + lr)))

    monkeypatch.setattr(sweep, "_run_specs", run_specs)
    argv = [*ARGS, "--out-dir", str(tmp_path), "--seeds", "0,1", "--tune-seeds", "0", "--method-lrs", "lora=1e-3,3"]
    res = sweep.main(argv)
    assert res["grid"] == {"lora": [1e-3, 3.0], "full": [3e-5, 1e-4]}
    assert ("lora", 1e-2, 0) not in calls and ("lora", 3.0, 1) in calls  # --lrs no longer applies to lora
    lora = res["methods"]["lora"]
    assert lora["chosen_lr"] == 3.0
    assert lora["alignment_cos_mean"] == pytest.approx(np.mean([3.1, 3.3, 4.1, 4.3])) and lora["alignment_points"] == 4
    assert lora["alignment_cos_by_step"] == pytest.approx({"1": 3.6, "25": 3.8})
    assert "| 3.700 |" in (tmp_path / "bbc-sweep" / "results.md").read_text()
    with pytest.raises(SystemExit, match="METHOD=LR"):
        sweep.main([*ARGS, "--out-dir", str(tmp_path / "x"), "--method-lrs", "alora=1e-3"])


def test_edge_warnings_name_the_method_and_the_side():
    grid = {"lora": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4], "alone": [1e-3]}
    got = sweep.edge_warnings(grid, {"lora": 3e-3, "full": 1e-4, "alone": 1e-3})
    assert len(got) == 1 and got[0].startswith("full: the chosen lr 0.0001 is the largest of its grid")
    assert "--full-lrs" in got[0]
    got = sweep.edge_warnings(grid, {"lora": 1e-3, "full": 3e-5, "alone": 1e-3})
    assert [g.split(":")[0] for g in got] == ["lora", "full"]
    assert "smallest" in got[0] and "--lrs" in got[0] and "smaller" in got[0]


def test_sweep_warns_on_grid_edges_and_resumes_with_checkpoint_options(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep, "_run_specs", _fake_run_specs(calls))
    argv = [*ARGS, "--out-dir", str(tmp_path), "--sweep-name", "e", "--seeds", "0"]
    res = sweep.main(argv)
    # lora picks 1e-3 and full 3e-5 (FAKE): both the smallest of their two-point grids
    assert [w.split(":")[0] for w in res["lr_edge_warnings"]] == ["lora", "full"]
    err = capsys.readouterr().err
    assert "[sweep] warning: lora: the chosen lr 0.001 is the smallest" in err
    assert "**Warning: full: the chosen lr 3e-05 is the smallest" in (tmp_path / "e" / "results.md").read_text()
    # checkpointing / resume options do not change what a run computes: the sweep directory is reused
    n = len(calls)
    sweep.main([*argv, "--checkpoint-dir", str(tmp_path / "ck"), "--resume"])
    assert len(calls) == n


def test_sweep_help_is_plain_text_and_says_what_it_does():
    text = sweep.build_parser().format_help()
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    for phrase in ("how the lr is picked", "results.json", "settings.json", "resuming:", "--checkpoint-dir",
                   "names not in --method are ignored"):
        assert phrase in text, phrase
    assert "where in the sweep" not in text
    # not offered as an option (run directories are <method>-lr<lr>-s<seed>); the epilog says why
    assert "[--run-name" not in text and "\n  --run-name" not in text and "--run-name does not apply" in text


def test_plan_runs_gives_named_specs():
    specs = sweep.plan_runs(["lora"], {"lora": [1e-3, 1e-2]}, [0], [0, 1])
    assert specs == [("lora", 1e-3, 0), ("lora", 1e-2, 0)]
    assert all(isinstance(s, sweep.RunSpec) for s in specs) and specs[1].lr == 1e-2
    rest = sweep.plan_runs(["lora"], {"lora": [1e-3, 1e-2]}, [0], [0, 1], chosen={"lora": 1e-2})
    assert rest == [sweep.RunSpec("lora", 1e-2, 1)] and sweep.run_dir_name(*rest[0]) == "lora-lr0.01-s1"
