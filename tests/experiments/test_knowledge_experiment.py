"""`keepmix experiment knowledge`: made-up facts, three training arms, closed- vs open-book."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from keepmix.cli import main
from keepmix.experiments.knowledge import (ARMS, PARAPHRASES, QUESTION, QUICK, TINY_QUICK, made_up_facts,
                                           questions_for, run_experiment)
from tests.conftest import train_records

pytest.importorskip("bm25s")


def test_facts_are_made_up_reproducibly_and_questions_are_worded_apart():
    facts = made_up_facts(30, seed=0)
    assert facts == made_up_facts(30, seed=0) and facts != made_up_facts(30, seed=1)
    names = [f["subject"] for f in facts] + [f["capital"] for f in facts]
    assert len(set(names)) == len(names)
    questions = questions_for(facts, 4, seed=0)
    for fact, q in zip(facts, questions):
        assert q["choices"][q["gold"]] == fact["capital"] and len(set(q["choices"])) == 4
        assert q["gold_doc"] == fact["id"]
    stem = QUESTION.split("{")[0]
    assert all(stem.strip() not in t for t in PARAPHRASES)  # no document is worded like the question


def test_micro_run_end_to_end_and_reused(tmp_path):
    """The whole path at a few steps (the --quick settings, shrunk): data, pretraining, arms, table."""
    s = replace(QUICK, facts=12, practice=12, steps=4, tiny=replace(TINY_QUICK, steps=4))
    summary = run_experiment(tmp_path, s, None, progress="quiet")
    assert list(summary["rows"]) == ["base", *ARMS]
    assert summary["rows"]["base"]["recall"] == 1.0  # made-up names make BM25 exact on this corpus
    for arm in ARMS:
        assert 0 <= summary["rows"][arm]["closed"] <= 1 and "prose_delta" in summary["rows"][arm]
    trained = {arm: {src for r in train_records(tmp_path / arm) for src in r["sources"]} for arm in ARMS}
    assert trained == {"cpt_x1": {"prose", "facts"}, "cpt_xk": {"prose", "facts_k"},
                       "raft": {"prose", "facts_k", "raft"}}
    text = (tmp_path / "knowledge.md").read_text()
    assert "| CPT on the facts x5 wordings |" in text and "Ovadia" in text
    assert (tmp_path / "knowledge.png").stat().st_size > 0
    assert json.loads((tmp_path / "knowledge.json").read_text())["rows"] == summary["rows"]
    again = run_experiment(tmp_path, s, None, progress="quiet")
    assert again["rows"] == summary["rows"]  # completed arms are reused


@pytest.mark.slow
def test_quick_command(tmp_path):
    assert main(["experiment", "knowledge", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "knowledge.json").read_text())
    assert summary["total_s"] < 180 * 2  # the budget is 3 minutes on an idle 2-core CPU
    assert summary["rows"]["base"]["recall"] >= 0.9
