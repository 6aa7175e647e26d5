"""Retention flags exactly the metrics that got worse past their tolerance."""

import math

import pytest
from rich.console import Console

from keepmix.eval.retention import compute_retention, format_retention_table, higher_is_better, summary_line

BASELINE = {
    "valid/general/loss": 2.0,
    "valid/general/ppl": 7.39,
    "valid/general/token_acc": 0.415,
    "valid/code/loss": 2.0,
    "valid/code/token_acc": 0.30,
    "task/mc/acc": 0.50,
    "task/mc/acc_norm": 0.50,
    "task/mc/n": 20.0,
    "task/sql/acc": 0.0,
    "task/sql/acc/seen": 0.80,
    "task/gen/exact_match": 0.40,
    "valid/old/loss": 1.0,
}
NOW = {
    "valid/general/loss": 2.039,  # 1.95 % worse: within 2 %
    "valid/general/ppl": 7.0,  # better
    "valid/general/token_acc": 0.409,  # -0.006: within 0.02
    "valid/code/loss": 2.05,  # 2.5 % worse: flagged
    "valid/code/token_acc": 0.27,  # -0.03: flagged
    "task/mc/acc": 0.48,  # exactly at the tolerance: not flagged
    "task/mc/acc_norm": 0.46,  # -0.04: flagged
    "task/mc/n": 10.0,  # a count: skipped
    "task/sql/acc": 0.62,
    "task/sql/acc/seen": 0.70,  # -0.10, but the sql task allows 0.15
    "task/gen/exact_match": 0.45,
    "valid/old/loss": math.nan,  # diverged: flagged
    "valid/new/loss": 1.0,  # no baseline: skipped
}
FLAGGED = {"valid/code/loss", "valid/code/token_acc", "task/mc/acc_norm", "valid/old/loss"}


@pytest.fixture
def retention():
    return compute_retention(BASELINE, NOW, 0.02, per_metric_tolerance={"task/sql": 0.15})


def test_flags_exactly_the_metrics_past_tolerance(retention):
    assert {k for k, e in retention.items() if e["flagged"]} == FLAGGED
    assert set(retention) == set(BASELINE) - {"task/mc/n"}


def test_entries_carry_direction_delta_and_tolerance(retention):
    loss = retention["valid/code/loss"]
    assert loss == {
        "baseline": 2.0, "now": 2.05, "delta": pytest.approx(0.05), "higher_is_better": False,
        "tolerance": 0.02, "flagged": True,
    }
    assert retention["task/sql/acc/seen"]["tolerance"] == 0.15
    assert retention["task/sql/acc"]["tolerance"] == 0.15
    assert retention["task/mc/acc"]["tolerance"] == 0.02
    assert higher_is_better("valid/x/token_acc") and not higher_is_better("valid/x/ppl")
    assert higher_is_better("task/lossy_name/acc")  # only the last path part decides


def test_tolerance_is_relative_for_loss_and_absolute_for_accuracy():
    # The same +0.05 change: 2.5 % of a loss of 2 (flagged at 2 %) but 1 % of a loss of 5 (not).
    r = compute_retention({"a/loss": 2.0, "b/loss": 5.0}, {"a/loss": 2.05, "b/loss": 5.05}, 0.02)
    assert r["a/loss"]["flagged"] and not r["b/loss"]["flagged"]
    # Accuracy: 0.03 points worse is flagged at 0.02 whatever the baseline.
    r = compute_retention({"a/acc": 0.9, "b/acc": 0.1}, {"a/acc": 0.87, "b/acc": 0.07}, 0.02)
    assert r["a/acc"]["flagged"] and r["b/acc"]["flagged"]
    # The longest matching override wins.
    r = compute_retention({"task/s/acc": 0.5, "task/s/acc/x": 0.5}, {"task/s/acc": 0.4, "task/s/acc/x": 0.4},
                          0.02, {"task/s": 0.05, "task/s/acc/x": 0.2})
    assert r["task/s/acc"]["flagged"] and not r["task/s/acc/x"]["flagged"]


def test_table_marks_the_flagged_rows(retention):
    console = Console(width=200, record=True, color_system=None)
    console.print(format_retention_table(retention))
    lines = console.export_text().splitlines()
    flagged_rows = {line.split()[1] for line in lines if "FLAGGED" in line}
    assert flagged_rows == FLAGGED
    assert sum(" ok " in line for line in lines) == len(retention) - len(FLAGGED)


def test_summary_line_states_gain_and_worst_retention():
    r = compute_retention(
        {"task/sql/acc": 0.0, "valid/general/token_acc": 0.415},
        {"task/sql/acc": 0.62, "valid/general/token_acc": 0.409},
        0.02,
    )
    assert summary_line(r, ["task/sql/acc"]) == (
        "task: sql/acc 0.00 → 0.62 (+0.62) · "
        "worst retention: valid/general/token_acc 0.415 → 0.409 (-0.006, within 0.02)"
    )


def test_summary_line_picks_the_worst_relative_to_tolerance(retention):
    line = summary_line(retention, ["task/sql/acc"])
    assert line.startswith("task: sql/acc 0.00 → 0.62 (+0.62) · worst retention: ")
    assert "valid/old/loss" in line and "past 2 %" in line  # a diverged loss is the worst of all
    without_nan = {k: e for k, e in retention.items() if k != "valid/old/loss"}
    # In units of tolerance: code/loss 1.25, code/token_acc 1.5, mc/acc_norm 2.
    assert "worst retention: task/mc/acc_norm 0.500 → 0.460 (-0.040, past 0.02)" in summary_line(
        without_nan, ["task/sql/acc"]
    )
