"""Smoke test of benchmarks/bench_many_pairs.py at tiny sizes: it runs both layouts, holds the same numbers in
both, reports every asked method against AdamW, and its CLI parses and rejects bad input.

Timings are not tested (machines are noisy); only that they were measured.
"""

import json
import math

import jax
import numpy as np
import pytest

import lorapro_jax as lp
from benchmarks import bench_many_pairs as bench

PAIRS, WIDTH, RANK, MLP = (
    9,
    4,
    2,
    6,
)  # 9 pairs: two layers of q only partly filled (7 + 2)


def test_layouts_hold_the_same_pairs():
    st = bench.make_tree(PAIRS, WIDTH, RANK, "stacked", mlp_width=MLP)
    un = bench.make_tree(PAIRS, WIDTH, RANK, "unstacked", mlp_width=MLP)
    assert (
        set(st) == set(bench.PROJECTIONS)
        and st["q"].stack_shape == (2,)
        and st["v"].stack_shape == (1,)
    )
    assert (
        st["gate"].in_shape == (WIDTH,)
        and st["gate"].out_shape == (MLP,)
        and st["down"].in_shape == (MLP,)
    )
    flat = jax.tree.leaves(un, is_leaf=lp.is_lora_pair)
    assert len(flat) == PAIRS and all(lp.is_lora_pair(p) for p in flat)
    np.testing.assert_array_equal(
        np.asarray(un["layers"]["1"]["k"].a), np.asarray(st["k"].a[1])
    )
    np.testing.assert_array_equal(
        np.asarray(un["layers"]["0"]["down"].b), np.asarray(st["down"].b[0])
    )
    with pytest.raises(ValueError, match="rank"):
        bench.make_tree(3, 4, 5, "stacked")


def test_runs_both_layouts_against_adamw():
    res = bench.run_benchmark(
        PAIRS,
        WIDTH,
        RANK,
        mlp_width=MLP,
        methods=["lora_pro_sgd"],
        reps=2,
        warmup=1,
        verbose=False,
    )
    got = {(r["layout"], r["method"]) for r in res["rows"]}
    assert got == {(lay, m) for lay in bench.LAYOUTS for m in ("adamw", "lora_pro_sgd")}
    for row in res["rows"]:
        assert (
            row["compile_s"] > 0
            and row["step_ms_p25"] <= row["step_ms_median"] <= row["step_ms_p75"]
        )
        assert math.isfinite(row["step_ratio_vs_adamw"]) and row["finite"]
        assert row["pair_nodes"] == (
            PAIRS if row["layout"] == "unstacked" else len(bench.PROJECTIONS)
        )
        if row["method"] == "adamw":
            assert (
                row["step_ratio_vs_adamw"] == 1.0
                and row["compile_ratio_vs_adamw"] == 1.0
            )
    md = bench.format_markdown(res)
    assert "lora_pro_sgd" in md and "| stacked |" in md
    assert json.loads(json.dumps(res))["meta"]["pairs"] == PAIRS


def test_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [
        "--pairs",
        "2",
        "--width",
        "4",
        "--rank",
        "1",
        "--methods",
        "adamw",
        "--layouts",
        "stacked",
    ]
    res = bench.main(
        args + ["--reps", "1", "--warmup", "0", "--json", str(out), "--quiet"]
    )
    assert [(r["layout"], r["method"]) for r in res["rows"]] == [("stacked", "adamw")]
    assert json.loads(out.read_text())["meta"]["width"] == 4
    assert "adamw" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown methods"):
        bench.run_benchmark(2, 4, 1, methods=["nope"], verbose=False)
    with pytest.raises(ValueError, match="layouts"):
        bench.run_benchmark(2, 4, 1, layouts=["diagonal"], verbose=False)
    with pytest.raises(SystemExit):
        bench.main(["--pairs", "0"])
