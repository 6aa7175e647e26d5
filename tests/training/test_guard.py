"""The retention guard in real (tiny) runs: it keeps a starved source, resumes exactly, and is invisible
when off."""

from __future__ import annotations

import json

import pytest

import keepmix
from keepmix.data.guard import guard_summary
from keepmix.report.metrics import read_metrics
from tests.conftest import forgetting_run, train_records
from tests.training.test_resume import assert_same_weights, final_weights, losses

GUARD = {"sources": ["general"], "every": 2, "probe_docs": 10, "max_share": 0.5, "gain": 0.25}


def final_retention(run_dir, key: str) -> dict:
    return train_records(run_dir, "eval")[-1]["retention"][key]


def test_the_guard_keeps_a_starved_source_within_tolerance(make_run, general_model):
    static = make_run("static", **forgetting_run(general_model))
    guarded = make_run("guarded", **forgetting_run(general_model, GUARD))
    keepmix.train(static, progress="quiet")
    keepmix.train(guarded, progress="quiet")
    lost = final_retention(static.parent / "out", "valid/general/token_acc")
    kept = final_retention(guarded.parent / "out", "valid/general/token_acc")
    # Without the guard the model forgets general (tens of points); with it, general ends within 2 points.
    assert lost["flagged"] and lost["delta"] < -0.2, lost
    assert not kept["flagged"] and kept["delta"] >= -0.02, kept
    # The task still learned: the guard took at most half of its share.
    for run in (static, guarded):
        assert final_retention(run.parent / "out", "valid/qa/token_acc")["delta"] > 0.3
    records = train_records(guarded.parent / "out")
    assert max(r["guarded"]["general"] for r in records) == pytest.approx(0.5)  # max_share
    assert all(r["guarded"]["qa"] >= 0.5 - 1e-12 for r in records)  # task_keep
    assert all(r["planned"]["general"] == 0.0 for r in records)  # the plan stays the user's
    assert all("guarded" not in r for r in train_records(static.parent / "out"))
    summary = guard_summary(read_metrics(guarded.parent / "out" / "metrics.jsonl"))
    assert summary and summary[0].startswith("Retention guard: general token accuracy fell")
    assert "the guard raised general from 0 % to 50 %" in summary[0]
    # ... and the same sentences in diagnostics.json (keepmix diagnose), the report, and the mixture plot
    run_dir = guarded.parent / "out"
    assert json.loads((run_dir / "diagnostics.json").read_text())["guard"] == summary
    from keepmix.report.html import render_report
    from keepmix.report.plots import PlotRun, build_figures

    page = render_report([run_dir]).read_text()
    assert "<h2>Retention guard</h2>" in page and summary[0].split(":", 1)[1].strip()[:40] in page
    mixture = build_figures([PlotRun("g", read_metrics(run_dir / "metrics.jsonl"))])["mixture"]
    gids = {line.get_gid() for ax in mixture.axes for line in ax.lines}
    assert "guarded:g:general" in gids and "planned:g:general" in gids


def test_a_stopped_and_resumed_guarded_run_is_bit_identical(make_run, general_model):
    cfg = forgetting_run(general_model, GUARD, checkpoint_every=5)
    whole, parts = make_run("whole", **cfg), make_run("parts", **cfg)
    keepmix.train(whole, progress="quiet")
    # stopped right after the check that first raises general (its extra share not yet at max_share)
    assert keepmix.train(parts, progress="quiet", stop_at=6).status == "stopped"
    keepmix.train(parts, progress="quiet", resume=True)
    ref, got = train_records(whole.parent / "out"), train_records(parts.parent / "out")
    assert [r["guarded"] for r in got] == [r["guarded"] for r in ref]
    assert [r["guard"]["signal"] for r in got] == [r["guard"]["signal"] for r in ref]
    assert len({r["guarded"]["general"] for r in ref[6:]}) > 1  # the guard acted after the resume too
    assert losses(parts.parent / "out") == losses(whole.parent / "out")
    assert_same_weights(final_weights(whole.parent / "out"), final_weights(parts.parent / "out"))


def test_a_guard_that_never_acts_changes_nothing(make_run, general_model):
    # The probe only reads the model: a guard whose tolerance is never crossed trains bit-identically.
    plain = make_run("plain", **forgetting_run(general_model, steps=12))
    idle = make_run("idle", **forgetting_run(general_model, {**GUARD, "tolerance": 10.0}, steps=12))
    keepmix.train(plain, progress="quiet")
    keepmix.train(idle, progress="quiet")
    assert losses(idle.parent / "out") == losses(plain.parent / "out")
    assert_same_weights(final_weights(plain.parent / "out"), final_weights(idle.parent / "out"))
    records = train_records(idle.parent / "out")
    assert all(r["guarded"] == r["planned"] for r in records)
    assert [r["step"] for r in records if r["guard"]["probe_s"] is not None] == list(range(2, 13, 2))


def test_guard_off_leaves_the_sampler_state_and_records_as_before(make_run):
    config = make_run(train={"steps": 6, "checkpoint_every": 6})
    keepmix.train(config, progress="quiet")
    run_dir = config.parent / "out"
    state = json.loads(next((run_dir / "checkpoints").glob("step-*/state.json")).read_text())
    assert set(state["sampler"]) == {"step", "assigned", "planned", "streams"}
    assert all({"guarded", "guard"}.isdisjoint(r) for r in train_records(run_dir))


def test_a_probe_larger_than_a_fractional_held_out_set_is_refused(make_run, general_model):
    from keepmix.errors import ConfigError, KeepmixError

    cfg = forgetting_run(general_model, {**GUARD, "probe_docs": 50}, steps=2)
    cfg["sources"] = [{"name": "general", "path": "general.jsonl", "valid_docs": 0.1, "on_bad_row": "skip"},
                      {"name": "qa", "path": "qa.jsonl", "format": "prompt_completion", "loss_on": "completion"}]
    config = make_run(**cfg)
    with pytest.raises(ConfigError, match=r"mixture.guard.probe_docs: 50 is larger than the held-out set of "
                                          r"general \(at most 12 documents, sources\[0\].valid_docs of 120 records\)"):
        keepmix.train(config, progress="quiet")
    assert not (config.parent / "out").exists()  # refused before anything was written
    # 80 malformed lines (skipped) make the line count an overestimate: the exact count, once read, refuses
    cfg["mixture"]["guard"]["probe_docs"] = 15
    config = make_run(**cfg)
    with (config.parent / "general.jsonl").open("a") as f:
        f.write("not json\n" * 80)
    with pytest.raises(KeepmixError, match=r"mixture.guard.probe_docs: 15 is larger than the held-out set of "
                                           r"general \(12 documents\)"):
        keepmix.train(config, progress="quiet")
