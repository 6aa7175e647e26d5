"""Sweeps end to end on a tiny Llama: shared baseline, resume, branches, collect, the answer."""

import json

import pytest
import torch
import yaml

from keepmix.errors import KeepmixError
from keepmix.sweep.run import run_sweep
from keepmix.training import checkpoint as ckpt
from keepmix.training.session import Session
from tests.conftest import train_records

MIXES = {"mixture.weights": [{"general": 0.8, "qa": 0.2}, {"general": 0.5, "qa": 0.5}, {"general": 0.2, "qa": 0.8}]}


def _losses(run_dir):
    return [r["loss"] for r in train_records(run_dir)]


def _final(run_dir):
    return train_records(run_dir, "eval")[-1]["metrics"]


def test_a_sweep_shares_one_baseline_and_writes_the_answer(make_sweep, monkeypatch):
    path = make_sweep(grid=MIXES)
    evaluated = []
    import keepmix.training.loop as loop

    real = loop.validation_metrics
    monkeypatch.setattr(loop, "validation_metrics", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    answer = run_sweep(path, progress="quiet")
    out = path.parent / "sweep_out"
    step0 = [train_records(out / r["name"], "eval")[0] for r in answer["rows"]]
    # the base model is evaluated once (first arm); the others reuse that record; every arm evaluates its end
    assert len(evaluated) == 1 + 3
    assert [("baseline_from" in r) for r in step0] == [False, True, True]
    assert all(r["metrics"] == step0[0]["metrics"] for r in step0)
    for name in ("sweep.md", "sweep.json", "sweep.html", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert all((out / r["name"] / "report.html").exists() for r in answer["rows"])  # ordinary runs
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in answer["rows"]] and saved["front"]
    assert saved["task"] == ["valid/qa/token_acc"] and saved["keep"] == ["valid/general/token_acc"]
    rec = saved["recommendation"]
    assert abs(sum(rec["weights"].values()) - 1) < 1e-6 and "schedule" in yaml.safe_load(rec["snippet"])["mixture"]
    # a rerun trains nothing: every completed arm is reused
    evaluated.clear()
    run_sweep(path, progress="quiet")
    assert evaluated == []


def test_a_sweep_killed_mid_arm_and_restarted_equals_an_uninterrupted_one(make_sweep, monkeypatch):
    path = make_sweep(grid=MIXES)
    clean = run_sweep(path, progress="quiet", output=path.parent / "clean")
    real = Session.save_checkpoint

    def killed(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.run_dir.name == clean["rows"][1]["name"] and self.state.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Session, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, progress="quiet")
    monkeypatch.setattr(Session, "save_checkpoint", real)
    out = path.parent / "sweep_out"
    assert not (out / clean["rows"][2]["name"]).exists()  # the sweep stopped at the killed arm
    again = run_sweep(path, progress="quiet")
    for row in clean["rows"]:
        a, b = path.parent / "clean" / row["name"], out / row["name"]
        assert _losses(a) == _losses(b) and _final(a) == _final(b)
    assert [r["gain"] for r in again["rows"]] == [r["gain"] for r in clean["rows"]]
    starts = train_records(out / clean["rows"][1]["name"], "start")
    assert [s["resumed_from"] for s in starts] == [None, 3]


def test_branched_arms_start_from_the_prefix_checkpoint(make_sweep):
    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:2]}, branch={"at": 3, "optimizer": True})
    answer = run_sweep(path, progress="quiet")
    out = path.parent / "sweep_out"
    prefix_ckpt = ckpt.read_checkpoint(ckpt.step_dir(out / "prefix" / "checkpoints", 3))
    for row in answer["rows"]:
        run_dir = out / row["name"]
        start = train_records(run_dir, "start")[0]
        assert start["init_from"]["step"] == 3 and start["init_from"]["optimizer"] is True
        assert start["init_from"]["data"] == "continued" and start["total_steps"] == 3
        assert train_records(run_dir, "eval")[0]["baseline_from"] == str(out / "prefix")
        first = ckpt.read_checkpoint(ckpt.step_dir(run_dir / "checkpoints", 3))
        assert first["state"]["step"] == 3  # 3 own steps after the prefix's 3
    # the arm's step-0 weights are the prefix's: a warm-started run with lr ~ 0 ends where the prefix ended
    run = yaml.safe_load((out / answer["rows"][0]["name"] / "config.yaml").read_text())
    run["train"].update(lr=1e-12, steps=1, warmup=0)
    run["output"] = str(path.parent / "still")
    from keepmix.config import parse_config
    from keepmix.training.loop import train

    train(parse_config(run, base_dir=path.parent), progress="quiet")
    still = ckpt.read_checkpoint(ckpt.latest_checkpoint(path.parent / "still" / "checkpoints"))
    for name, tensor in prefix_ckpt["weights"].items():
        assert torch.allclose(still["weights"][name], tensor, atol=1e-9), name
    assert answer["savings"]["prefix_saved_s"] is not None
    # a rerun reuses the prefix and every arm (their warm-start links compare equal)
    before = {r["name"]: (out / r["name"] / "metrics.jsonl").read_text() for r in answer["rows"]}
    run_sweep(path, progress="quiet")
    assert before == {name: (out / name / "metrics.jsonl").read_text() for name in before}


def test_init_from_is_checked_before_anything_is_written(make_run):
    from keepmix.training.loop import train

    first = make_run("first", train={"steps": 2, "checkpoint_every": 2})
    train(first, progress="quiet")
    bad = make_run("bad", train={"init_from": {"run": str(first.parent / "out"), "step": 5}})
    with pytest.raises(KeepmixError, match=r"train\.init_from\.step: .* no complete checkpoint at step 5 "
                                           r"\(complete checkpoints: 2\)"):
        train(bad, progress="quiet")
    missing = make_run("missing", train={"init_from": {"run": "nowhere", "step": 1}})
    with pytest.raises(KeepmixError, match=r"train\.init_from\.run: no run at .*nowhere"):
        train(missing, progress="quiet")
    assert not (bad.parent / "out").exists() and not (missing.parent / "out").exists()


def test_collect_reads_arms_run_as_separate_jobs_and_refuses_foreign_folders(make_sweep):
    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:2]})
    for i in range(2):  # two cluster jobs: --arm 0, then --arm 1
        assert run_sweep(path, arm=str(i), progress="quiet") is None
    answer = run_sweep(path, collect=True, progress="quiet")
    assert len(answer["rows"]) == 2 and not answer["missing"]
    # another sweep's folder at this output: one clear error, nothing changed
    other = path.parent / "other.yaml"
    other.write_text(yaml.safe_dump({"run": "run.yaml", "output": "sweep_out",
                                     "arms": {answer["rows"][0]["name"]: {"train.lr": 1e-3}}}))
    before = (path.parent / "sweep_out" / "sweep.json").read_text()
    with pytest.raises(KeepmixError, match=r"holds a run of another config \(mixture\.schedule, train\.lr differ\)"):
        run_sweep(other, collect=True, progress="quiet")
    assert (path.parent / "sweep_out" / "sweep.json").read_text() == before
    empty = path.parent / "empty.yaml"
    empty.write_text(yaml.safe_dump({"run": "run.yaml", "output": "nothing_here", "grid": {"train.lr": [1e-3]}}))
    with pytest.raises(KeepmixError, match=r"no completed arm of .* nothing to collect"):
        run_sweep(empty, collect=True, progress="quiet")


def test_an_arm_whose_baseline_has_not_run_is_refused(make_sweep):
    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:2]})
    with pytest.raises(KeepmixError, match=r"--arm .* has no step-0 eval yet; run that arm first"):
        run_sweep(path, arm="1", progress="quiet")
    assert not (path.parent / "sweep_out" / "w=general50-qa50").exists()


def test_verify_trains_the_recommendation_and_reports_predicted_vs_measured(make_sweep):
    path = make_sweep(grid=MIXES)
    answer = run_sweep(path, progress="quiet", verify=True)
    v = answer["verify"]
    out = path.parent / "sweep_out"
    assert v["run_dir"] == str(out / "verify") and (out / "verify" / "final").is_dir()
    assert v["weights"] == answer["recommendation"]["weights"]
    assert set(v["predicted_metrics"]) == set(v["measured_metrics"]) == {"valid/qa/token_acc",
                                                                          "valid/general/token_acc"}
    assert train_records(out / "verify", "eval")[0]["baseline_from"] == str(out / answer["rows"][0]["name"])
    assert "--verify: the recommendation trained" in (out / "sweep.md").read_text()
    # collecting again keeps the verify result that belongs to the same recommendation
    assert run_sweep(path, collect=True, progress="quiet")["verify"] == v


def test_arms_that_score_another_model_or_data_evaluate_their_own_baseline(make_sweep):
    from keepmix.sweep.arms import share_baseline
    from keepmix.sweep.spec import load_sweep

    sweep = load_sweep(make_sweep(grid={"train.seq_len": [64, 32], "train.lr": [1e-3, 3e-3]}))
    share_baseline(sweep.arms)
    got = {a.name: a.config["eval"]["baseline_from"] for a in sweep.arms}
    out = sweep.output
    assert got == {"seq_len=64_lr=0.001": None, "seq_len=64_lr=0.003": str(out / "seq_len=64_lr=0.001"),
                   "seq_len=32_lr=0.001": None, "seq_len=32_lr=0.003": str(out / "seq_len=32_lr=0.001")}


def test_parallel_runs_arms_as_child_processes_with_logs(make_sweep):
    path = make_sweep(grid=MIXES)
    answer = run_sweep(path, parallel=2, progress="quiet")
    out = path.parent / "sweep_out"
    assert len(answer["rows"]) == 3
    assert sorted(p.name for p in (out / "logs").iterdir()) == sorted(f"{r['name']}.log" for r in answer["rows"])
    assert [("baseline_from" in train_records(out / r["name"], "eval")[0]) for r in answer["rows"]] == \
        [False, True, True]


def test_the_command_line_reports_bad_input_as_one_error(make_sweep, capsys):
    from keepmix.cli import main

    path = make_sweep(grid={})
    assert main(["sweep", str(path)]) == 2
    assert "keepmix: error:" in capsys.readouterr().err
    good = make_sweep("good", grid={"train.lr": [1e-3, 3e-3]})
    assert main(["sweep", str(good), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("1\tlr=0.003\t")
    assert main(["sweep", str(good), "--parallel", "0"]) == 2
    assert main(["merge", str(good.parent / "nothing")]) == 2


def test_an_arm_stopped_before_its_first_checkpoint_starts_over(make_sweep, monkeypatch):
    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:1]}, run={"train": {"checkpoint_every": None}})
    import keepmix.training.loop as loop

    real = loop.Session.log_train

    def stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.state.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Session, "log_train", stop)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, progress="quiet")
    monkeypatch.setattr(loop.Session, "log_train", real)
    answer = run_sweep(path, progress="quiet")
    run_dir = path.parent / "sweep_out" / answer["rows"][0]["name"]
    assert [r["step"] for r in train_records(run_dir)] == list(range(1, 7))


def test_branch_jobs_run_the_prefix_first(make_sweep):
    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:1]}, branch={"at": 3, "optimizer": False})
    with pytest.raises(KeepmixError, match=r"the branch prefix has not run yet; run it first with .*--arm prefix"):
        run_sweep(path, arm="0", progress="quiet")
    assert run_sweep(path, arm="prefix", progress="quiet") is None
    assert run_sweep(path, arm="0", progress="quiet") is None
    answer = run_sweep(path, collect=True, progress="quiet")
    assert answer["rows"][0]["init_from"]["optimizer"] is False


def test_the_python_api_is_keepmix_sweep_and_keepmix_merge(make_sweep):
    import keepmix
    import keepmix.sweep.run  # noqa: F401 - importing the submodules must not hide the function

    path = make_sweep(grid={"mixture.weights": MIXES["mixture.weights"][:2]})
    answer = keepmix.sweep(path, progress="quiet")
    assert len(answer["rows"]) == 2
    data = keepmix.merge(answer["rows"][0]["run_dir"], [0, 1])
    assert [p["alpha"] for p in data["points"]] == [0, 1]
