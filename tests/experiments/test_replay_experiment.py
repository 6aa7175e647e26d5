"""The replay experiment end to end at a toy scale: one sweep per seed (the A prefix, one arm per replay
share on B), the curve over seeds with intervals, and the files it writes."""

from __future__ import annotations

import json
import math

import pytest

from keepmix.cli import main
from keepmix.diagnostics.stats import seed_interval
from keepmix.errors import KeepmixError
from keepmix.experiments.replay import (PUBLISHED_OLD_LOSS, ReplayScale, check_scale, gap_closed, run_replay,
                                        run_replay_experiment)
from keepmix.experiments.tiny import TINY_QUICK, TinyModel
from tests.conftest import train_records

TINY = TinyModel(dict(TINY_QUICK.architecture), vocab_size=300, steps=150, batch_size=8, seq_len=64, valid_docs=12)
SCALE = ReplayScale(tiny=TINY, steps_b=60, shares=(0.0, 0.5), seeds=(0, 1), warmup=2, code_docs=200)


def test_seed_interval_is_the_student_t_interval():
    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5) and mean - lo == pytest.approx(hi - mean)
    mean, lo, hi = seed_interval([5.0])
    assert mean == 5.0 and math.isnan(lo) and math.isnan(hi)


def test_gap_closed_reads_the_published_curve():
    closed = gap_closed(PUBLISHED_OLD_LOSS)
    assert closed[0.0] == 0 and closed[0.5] == 1
    assert closed[0.05] == pytest.approx((3.56 - 2.57) / (3.56 - 2.24)) and closed[0.25] == pytest.approx(1.23 / 1.32)
    assert gap_closed({0.05: 1.0, 0.5: 0.9}) == {}  # no 0 % arm: nothing to measure the gap from


def test_bad_shares_and_seeds_are_refused_before_anything_runs(tmp_path):
    for shares, text in (((0.0, 1.0), r"share 1\.0 lies outside \[0, 1\)"), ((-0.1, 0.5), "share -0.1"),
                         ((0.0, 0.0), "repeat a value"), ((), "no shares")):
        with pytest.raises(KeepmixError, match=text):
            check_scale(ReplayScale(tiny=TINY, steps_b=2, shares=shares))
    with pytest.raises(KeepmixError, match="--seeds 0"):
        run_replay_experiment(tmp_path, seeds=0)
    assert main(["experiment", "replay", "--shares", "0,2", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_curve_has_every_share_and_seed_and_replay_keeps_domain_a(tmp_path, capsys):
    out = tmp_path / "replay"
    summary = run_replay(out, SCALE, progress="quiet")
    c = summary["curve"]
    assert c["seeds"] == [0, 1] and [row["share"] for row in c["rows"]] == [0.0, 0.5]
    for row in c["rows"]:
        for key in ("valid/prose/loss", "valid/prose/token_acc", "valid/code/loss", "valid/code/token_acc",
                    "old_loss_rise"):
            assert len(row[key]["values"]) == 2 and row[key]["lo"] <= row[key]["mean"] <= row[key]["hi"]
    for seed in (0, 1):
        prefix = out / f"seed-{seed}" / "prefix"
        assert [r["step"] for r in train_records(prefix, "eval")] == [0, 150]  # the A-only phase, evaluated at its end
        assert train_records(prefix)[-1]["realized_cum"] == {"prose": 1.0, "code": 0.0}
        for name, share in (("replay-0", 0.0), ("replay-50", 0.5)):
            run_dir = out / f"seed-{seed}" / name
            start = train_records(run_dir, "start")[0]
            assert start["init_from"]["step"] == 150 and start["init_from"]["run"] == str(prefix)
            rows = train_records(run_dir)
            assert len(rows) == 60 and rows[-1]["realized_cum"]["prose"] == pytest.approx(share, abs=0.1)
    # the two seeds are different runs, and the same seed would give the same numbers
    assert c["after_a"]["valid/prose/loss"]["values"][0] != c["after_a"]["valid/prose/loss"]["values"][1]
    zero, half = c["rows"]
    assert zero["old_loss_rise"]["mean"] > 0  # training on B alone forgets A ...
    assert zero["old_loss_rise"]["mean"] > half["old_loss_rise"]["mean"]  # ... and replaying half of A forgets less
    assert zero["valid/code/loss"]["mean"] < half["valid/code/loss"]["mean"]  # while B gets more rows at 0 %
    for name in ("replay.md", "replay.json", "replay.png", "seed-0.yaml", "seed-1.yaml"):
        assert (out / name).stat().st_size > 0
    text = (out / "replay.md").read_text()
    assert "| 0 % |" in text and "| 50 % |" in text and "after A (before B)" in text
    assert summary["reading"][0] in text and "95% t-interval" in text
    assert json.loads((out / "replay.json").read_text())["reading"] == summary["reading"]
    again = run_replay(out, SCALE, progress="quiet")  # completed arms and prefixes are reused
    assert "reusing the completed run" in capsys.readouterr().out
    assert again["curve"] == json.loads(json.dumps(c))
