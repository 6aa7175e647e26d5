"""The memorization experiment end to end at a toy scale: pretrain a tiny model from scratch on prose,
train the low- and high-LR arms for exactly three passes over the QA items, diagnose and compare both."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keepmix.diagnostics.exposures import read_exposures
from keepmix.errors import KeepmixError
from keepmix.experiments.memorization import (ARMS, Scale, TinyModel, fictional_facts, model_section,
                                              one_length, run_experiment)
from tests.conftest import TINY_LLAMA, train_records

TINY = TinyModel(dict(TINY_LLAMA), vocab_size=300, steps=2, batch_size=4, seq_len=64, valid_docs=4)
SCALE = Scale(items=8, valid_items=4, batch_size=4, low_lr=1e-3, high_lr=1e-2, warmup_steps=1, threads=1, tiny=TINY)


def test_facts_are_seeded_and_every_subject_differs():
    facts = fictional_facts(200, seed=3)
    assert facts == fictional_facts(200, seed=3) and facts != fictional_facts(200, seed=4)
    subjects = [f["prompt"].split(" of ")[-1] for f in facts]
    assert len(set(subjects)) == 200
    assert all(f["prompt"].startswith("Question: ") and f["prompt"].endswith("\nAnswer:") for f in facts)


def test_one_length_picks_items_of_the_most_common_shared_length():
    chosen, seq_len = one_length([5, 9, 9, 12, 7, 9, 12, 12, 12], 3)
    assert seq_len == 12 and chosen == [3, 6, 7]  # 12 is the most common length; 9 also has 3 items
    assert one_length([5, 9, 9, 12, 7, 9, 12, 12, 12], 4) == ([3, 6, 7, 8], 12)
    with pytest.raises(KeepmixError, match="only 2 of 5 .* 3 are needed"):
        one_length([2, 4, 4, 8, 16], 3)


def test_model_argument(tmp_path):
    assert model_section("scratch") is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert model_section(str(gguf)) == {"name": str(tmp_path.resolve()), "gguf_file": "m.gguf"}
    with pytest.raises(KeepmixError, match="no such GGUF file"):
        model_section(str(tmp_path / "missing.gguf"))
    assert model_section("org/some-model") == {"name": "org/some-model"}


def test_both_arms_make_three_passes_and_are_compared(tmp_path, capsys):
    summary = run_experiment(tmp_path / "x", SCALE, None, progress="quiet")
    steps = 3 * SCALE.items // SCALE.batch_size
    for arm, lr in zip(ARMS, (SCALE.low_lr, SCALE.high_lr)):
        run_dir = tmp_path / "x" / arm
        log = read_exposures(run_dir).to_pydict()
        # every item exactly once per pass, one item per row, and nothing of a fourth pass
        seen = sorted(zip(log["doc_id"], log["view"]))
        assert seen == [(d, v) for d in range(SCALE.items) for v in (1, 2, 3)]
        assert sorted(set(log["step"])) == list(range(1, steps + 1))
        first_of = {v: min(s for s, w in zip(log["step"], log["view"]) if w == v) for v in (1, 2, 3)}
        assert first_of == {1: 1, 2: steps // 3 + 1, 3: 2 * steps // 3 + 1}
        # each item fills its row exactly: the epoch events name the first step of each new pass
        epochs = train_records(run_dir, "epoch")
        assert [(r["epoch"], r["step"]) for r in epochs] == [(2, first_of[2]), (3, first_of[3])]
        seq_len = summary["seq_len"]
        assert all(r["tokens_seen"] == r["step"] * SCALE.batch_size * seq_len for r in train_records(run_dir))
        lrs = np.array(log["lr"])[np.array(log["step"]) > SCALE.warmup_steps]
        assert np.allclose(lrs, lr)  # constant after warmup
        diagnostics = json.loads((run_dir / "diagnostics.json").read_text())
        assert [r["view"] for r in diagnostics["loss_by_view"]["qa"]] == [1, 2, 3]
        arm_summary = summary["arms"][arm]
        assert arm_summary["lr"] == lr and arm_summary["steps"] == steps
        assert arm_summary["loss_by_view"] == {r["view"]: r["mean_loss"] for r in diagnostics["loss_by_view"]["qa"]}
        assert {b["epoch"] for b in arm_summary["boundaries"]} >= {2, 3}
    assert (tmp_path / "x" / "pretrain" / "run" / "final").is_dir()
    text = (tmp_path / "x" / "summary.txt").read_text()
    assert "low LR 1e-03" in text and "high LR 1e-02" in text and "boundary, pass 2" in text
    assert "loss at view 3" in text and "LR vs 2nd-view fall" in text
    assert json.loads((tmp_path / "x" / "summary.json").read_text())["comparison"] == summary["comparison"]
    printed = capsys.readouterr().out
    assert printed.count("Memorization diagnostics") == 2 and "high LR 1e-02" in printed

    # a second call reuses the completed runs; a different scale in the same folder is refused
    again = run_experiment(tmp_path / "x", SCALE, None, progress="quiet")
    assert "reusing the completed run" in capsys.readouterr().out
    assert again["arms"]["high_lr"]["loss_by_view"] == summary["arms"]["high_lr"]["loss_by_view"]
    with pytest.raises(KeepmixError, match=r"arm low_lr: .*low_lr holds a run of another config \(train\.lr differ\)"):
        run_experiment(tmp_path / "x", Scale(**{**SCALE.__dict__, "low_lr": 5e-4}), None, progress="quiet")
