"""The anneal experiment end to end at a toy scale: one sweep whose branch prefix is the stable phase on
general data, three anneals from its checkpoint, the task and retention table."""

from __future__ import annotations

import json

import pytest

from keepmix.cli import main
from keepmix.errors import KeepmixError
from keepmix.experiments.anneal import ARMS, METRIC, AnnealScale, check_scale, kind_items, run_anneal
from keepmix.experiments.tiny import TinyModel
from tests.conftest import TINY_LLAMA, train_records

TINY = TinyModel(dict(TINY_LLAMA), vocab_size=300, steps=20, batch_size=8, seq_len=64, valid_docs=12)
SCALE = AnnealScale(tiny=TINY, anneal_steps=30, task_items=800, task_eval_items=16, code_docs=150, warmup=2)


def test_kind_items_are_seeded_balanced_snippets_of_their_kind():
    docs = {"prose": ["The quick brown fox jumps over the lazy dog " * 4], "code": ["def f(x):\n    return x + 1\n" * 6]}
    items = kind_items(docs, 40, seed=1, chars=20)
    assert items == kind_items(docs, 40, seed=1, chars=20) and items != kind_items(docs, 40, seed=2, chars=20)
    assert sum(item["answer"] == "code" for item in items) == 20
    for item in items:
        text = item["prompt"].removeprefix("Text: ").removesuffix("\nKind:")
        assert 0 < len(text) <= 20 and text in " ".join(docs[item["answer"]][0].split())
        assert item["choices"][item["gold"]] == item["answer"] and item["choices"] == ["prose", "code"]


def test_a_bad_task_share_is_refused(tmp_path):
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(KeepmixError, match="task_share"):
            check_scale(AnnealScale(tiny=TINY, anneal_steps=2, task_share=share))
    assert main(["experiment", "anneal", "--task-share", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_three_anneals_from_one_checkpoint_trade_the_task_against_retention(tmp_path):
    out = tmp_path / "anneal"
    summary = run_anneal(out, SCALE, progress="quiet")
    prefix = out / "anneal" / "prefix"
    assert [r["step"] for r in train_records(prefix, "eval")] == [0, 20]
    assert train_records(prefix)[-1]["realized_cum"]["kind"] == 0.0  # the stable phase never sees the task
    for arm in ARMS:
        run_dir = out / "anneal" / arm
        start = train_records(run_dir, "start")[0]
        assert start["init_from"] == {**start["init_from"], "step": 20, "optimizer": True, "run": str(prefix)}
        rows = train_records(run_dir)
        assert len(rows) == 30 and rows[-1]["lr"] < rows[0]["lr"]  # the LR anneals
        assert train_records(run_dir, "eval")[-1]["metrics"]["task/kind_choice/n"] == 16
    shares = {arm: train_records(out / "anneal" / arm)[-1]["realized_cum"]["kind"] for arm in ARMS}
    assert shares["general"] == 0.0 and shares["task"] == 1.0 and 0.1 < shares["mix"] < 0.5
    rows = summary["rows"]
    assert set(rows) == set(ARMS) and all(0 <= rows[a][METRIC] <= 1 for a in ARMS)
    # the task rows teach the task, and the control keeps general data best
    assert rows["task"]["valid/kind/loss"] < rows["mix"]["valid/kind/loss"] < rows["general"]["valid/kind/loss"]
    assert rows["general"]["valid/prose/loss"] < rows["task"]["valid/prose/loss"]
    assert rows["general"]["valid/prose/loss/vs_control"] == 0.0
    assert rows["task"]["valid/prose/loss/vs_checkpoint"] == pytest.approx(
        rows["task"]["valid/prose/loss"] - summary["checkpoint"]["valid/prose/loss"])
    for name in ("anneal.md", "anneal.json", "anneal.png", "anneal.yaml"):
        assert (out / name).stat().st_size > 0
    text = (out / "anneal.md").read_text()
    assert "| checkpoint (before) |" in text and all(f"| {arm} |" in text for arm in ARMS)
    assert summary["reading"][0] in text
    assert json.loads((out / "anneal.json").read_text())["rows"] == json.loads(json.dumps(rows))
