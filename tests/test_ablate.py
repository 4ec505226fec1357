"""regate-ablate's plan and analysis on hand-made metrics (the runs themselves: test_cli.py)."""

import json
import math

import pytest

from regate_megatron.tools.ablate import (
    _finished,
    _layout_flags,
    format_table,
    plan_runs,
    plot_bands,
    summarize,
)


def test_plan_runs_dense_first_and_flags():
    runs = plan_runs(["random", "excess"], [1, 2], 0.3, "store", {"weak": "store_weak"})
    assert [r.name for r in runs] == ["dense-s1", "random-s1", "excess-s1", "teacher-weak-s1",
                                      "dense-s2", "random-s2", "excess-s2", "teacher-weak-s2"]
    by_name = {r.name: r for r in runs}
    assert by_name["dense-s1"].flags == []
    assert "--regate-ref-store" not in by_name["random-s1"].flags  # random needs no store
    assert by_name["excess-s1"].flags[-4:] == ["--regate-selector", "excess",
                                               "--regate-ref-store", "store"]
    weak = by_name["teacher-weak-s2"].flags
    assert weak[weak.index("--regate-ref-store") + 1] == "store_weak"
    assert weak[weak.index("--regate-lambda") + 1] == "0.5"
    with pytest.raises(ValueError, match="needs a reference-loss store"):
        plan_runs(["regate"], [1], 0.3, None)
    with pytest.raises(ValueError, match="unknown"):
        plan_runs(["nope"], [1], 0.3, "store")


def _evals(points):
    """Metrics rows: (step, cumulative computed target tokens, elapsed s, accuracy)."""
    return [{"step": s, "cum_kept_target_tokens": t, "elapsed": e, "eval_accuracy": a,
             "keep_ratio": 1.0 if s % 10 == 1 else 0.5} for s, t, e, a in points]


def test_summary_by_hand():
    runs = plan_runs(["random"], [1, 2], 0.5, None)
    metrics = {
        # dense peaks at 0.6 (seed 1) and 0.5 (seed 2), first reached at 200 / 300 tokens
        "dense-s1": _evals([(10, 100, 1.0, 0.2), (20, 200, 2.0, 0.6), (30, 300, 3.0, 0.6)]),
        "dense-s2": _evals([(10, 100, 1.0, 0.1), (20, 200, 2.0, 0.4), (30, 300, 3.0, 0.5)]),
        "random-s1": _evals([(10, 60, 0.8, 0.3), (20, 120, 1.6, 0.6), (30, 180, 2.4, 0.7)]),
        "random-s2": _evals([(10, 60, 0.8, 0.1), (20, 120, 1.6, 0.2), (30, 150, 2.0, 0.4)]),
    }
    summary = summarize(metrics, runs)
    r1, r2 = summary["runs"]["random-s1"], summary["runs"]["random-s2"]
    assert (r1["tokens_to_dense_peak"], r1["wall_to_dense_peak"]) == (120, 1.6)
    assert r2["tokens_to_dense_peak"] is None  # never reached 0.5
    # equal tokens: the smallest final count of the seed's runs (180 / 150); dense's last
    # evaluation at or below it is at 100 tokens
    assert (r1["token_budget"], r1["accuracy_at_budget"]) == (180, 0.7)
    assert summary["runs"]["dense-s1"]["accuracy_at_budget"] == 0.2
    assert summary["runs"]["dense-s2"]["accuracy_at_budget"] == 0.1
    random = summary["variants"]["random"]
    reached = random["tokens_to_dense_peak"]
    assert (reached["mean"], reached["n"], reached["of"]) == (120, 1, 2)
    assert random["final_accuracy"]["mean"] == pytest.approx(0.55)
    assert random["final_accuracy"]["std"] == pytest.approx(math.sqrt(2 * 0.15 ** 2))
    dense = summary["variants"]["dense"]
    assert dense["tokens_to_dense_peak"]["mean"] == 250 and dense["final_accuracy"]["n"] == 2
    table = format_table(summary)
    assert "| dense | 250 ± 71 | 2.5 ± 0.7 | 0.150 ± 0.071 | 0.550 ± 0.071 | 0.50 ± 0.00 |" \
        in table
    assert "| random | 120 (1/2) | 1.6 (1/2) | 0.550 ± 0.212 | 0.550 ± 0.212 | 0.50 ± 0.00 |" \
        in table
    json.dumps(summary)  # the summary is what ablation.json holds


def test_plot_and_finished(tmp_path):
    runs = plan_runs([], [1], 0.5, None)
    rows = _evals([(10, 100, 1.0, 0.2), (20, 200, 2.0, 0.6)])
    assert plot_bands({"dense-s1": rows}, runs, str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000
    (tmp_path / "dense-s1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _finished(str(tmp_path), "dense-s1", 20, checkpoints=False)
    assert not _finished(str(tmp_path), "dense-s1", 30, checkpoints=False)  # stopped early
    assert not _finished(str(tmp_path), "dense-s1", 20, checkpoints=True)   # no checkpoint
    assert not _finished(str(tmp_path), "other-s1", 20, checkpoints=False)


def test_layout_flags_for_precompute():
    extra = ["--num-layers", "2", "--seq-length", "48", "--img-h=8", "--patch-dim", "4", "--lr",
             "1e-3"]
    assert _layout_flags(extra) == ["--seq-length", "48", "--img-h=8", "--patch-dim", "4"]
