"""Reading recorded metrics (including a crashed run's truncated file), series extraction, trackers."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker

from keepmix.errors import KeepmixError
from keepmix.report import metrics as m

FIXTURES = Path(__file__).parent / "fixtures"


def raw_lines(name: str) -> list[str]:
    return (FIXTURES / name / "metrics.jsonl").read_text().splitlines()


def test_fixtures_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(tmp_path)], check=True)
    for run in ("replay", "no_replay", "crashed"):
        for path in (FIXTURES / run).iterdir():
            assert (tmp_path / run / path.name).read_bytes() == path.read_bytes(), f"{run}/{path.name} is stale"


def test_truncated_last_line_is_skipped_and_counted():
    lines = raw_lines("crashed")
    records = m.read_metrics(FIXTURES / "crashed" / "metrics.jsonl")
    assert records.skipped == [len(lines)]
    assert len(records) == len(lines) - 1
    assert records[-1] == json.loads(lines[-2])
    assert not m.of_kind(records, "end")


def test_garbage_in_the_middle_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "start", "total_steps": 2}\n{"kind": "tr\n\n42\n{"kind": "end", "step": 2}\n')
    records = m.read_metrics(path)
    assert [r["kind"] for r in records] == ["start", "end"]
    assert records.skipped == [2, 4]


def test_missing_metrics_file_is_a_sentence_naming_it(tmp_path):
    with pytest.raises(KeepmixError, match=r"nowhere/metrics.jsonl: metrics file not found"):
        m.read_metrics(tmp_path / "nowhere" / "metrics.jsonl")


def test_timeline_drops_what_the_resume_replaced():
    records = m.read_metrics(FIXTURES / "replay" / "metrics.jsonl")
    steps = [r["step"] for r in m.of_kind(records, "train")]
    assert len(steps) == 190  # 1..130, then 101..160 again after the resume
    run = m.timeline(records)
    assert [r["step"] for r in m.of_kind(run, "train")] == list(range(1, 161))
    assert [r["step"] for r in m.evals(run)] == [0, 40, 80, 120, 160]
    # The eval at step 120 is the resumed attempt's: its clock carries the restart.
    first_attempt_120 = next(r for r in records if r["kind"] == "eval" and r["step"] == 120)
    assert m.evals(run)[3]["time"] == pytest.approx(first_attempt_120["time"] + 9.0)
    epochs = [(r["source"], r["step"]) for r in m.of_kind(run, "epoch")]
    assert len(epochs) == len(set(epochs))


def test_series_match_the_records():
    run = m.timeline(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    trains = m.of_kind(run, "train")
    sql = m.source_series(run, "sql", "loss")
    expected = [(r["step"], r["sources"]["sql"]["loss"]) for r in trains if "sql" in r["sources"]]
    assert list(zip(sql.steps, sql.values)) == expected
    assert m.train_series(run, "lr").values == [r["lr"] for r in trains]
    valid = m.eval_series(run, "valid/general/loss")
    assert valid.steps == [0, 40, 80, 120, 160]
    assert valid.values[0] == 2.9 and valid.values[-1] == m.evals(run)[-1]["metrics"]["valid/general/loss"]
    assert m.sources_of(run) == ["general", "code", "sql"]
    assert m.metric_keys(run, "task/") == ["task/sql_exec/exec_acc", "task/sql_exec/exact_match",
                                            "task/general_mc/accuracy"]
    steps, realized = m.share_series(run, "realized", ["general", "code", "sql"])
    assert steps == list(range(1, 161))
    for i, r in enumerate(trains):
        assert sum(realized[s][i] for s in realized) == pytest.approx(1.0)
        assert realized["sql"][i] == r["realized"].get("sql", 0.0)
    assert m.epoch_boundaries(run)["sql"] == [(67, 2), (111, 3), (147, 4)]


def test_status_of_completed_and_crashed_runs():
    done = m.run_status(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    assert (done.status, done.ended, done.step, done.total_steps, done.resumes) == ("completed", True, 160, 160, 1)
    crashed = m.run_status(m.read_metrics(FIXTURES / "crashed" / "metrics.jsonl"))
    assert (crashed.status, crashed.ended, crashed.step, crashed.wall_s) == ("no end record", False, 130, None)


def test_retention_verdict_sorts_learned_forgot_kept():
    run = m.timeline(m.read_metrics(FIXTURES / "no_replay" / "metrics.jsonl"))
    step, table = m.last_retention(run)
    assert step == 160
    # The baseline's table compares it with itself: it is not a retention result.
    assert m.last_retention(m.evals(run)[:1]) == (None, {})
    verdict = m.retention_verdict(table)
    assert verdict["forgot"] == ["task/general_mc/accuracy", "valid/general/loss"]
    assert verdict["kept"] == ["valid/general/token_acc"]
    assert "valid/sql/loss" in verdict["learned"]
    assert not any(k.endswith("/ppl") for keys in verdict.values() for k in keys)
    # Loss tolerances are relative to the baseline (keepmix.eval.retention), score tolerances in points.
    sql_loss = table["valid/sql/loss"]
    assert m.improvement(sql_loss) == pytest.approx(-sql_loss["delta"] / sql_loss["baseline"])
    assert m.improvement(table["task/sql_exec/exec_acc"]) == pytest.approx(table["task/sql_exec/exec_acc"]["delta"])
    general = table["valid/general/loss"]
    assert general["delta"] / general["baseline"] > general["tolerance"]  # why it is flagged


def test_flatten_record_gives_named_scalars():
    run = m.timeline(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    train = m.of_kind(run, "train")[10]
    flat = m.flatten_record(train)
    assert flat["train/loss"] == train["loss"] and flat["train/lr"] == train["lr"]
    for source, entry in train["sources"].items():
        assert flat[f"train/{source}/loss"] == entry["loss"]
    assert flat["mix/planned/sql"] == train["planned"]["sql"]
    assert all(isinstance(v, float) for v in flat.values())
    ev = m.evals(run)[-1]
    flat = m.flatten_record(ev)
    assert flat["valid/sql/loss"] == ev["metrics"]["valid/sql/loss"]
    assert flat["retention/valid/sql/loss/delta"] == ev["retention"]["valid/sql/loss"]["delta"]
    assert m.flatten_record({"kind": "epoch", "source": "sql", "epoch": 2, "step": 3}) == {}


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False
    main_process_only = False

    def __init__(self):
        super().__init__()
        self.logged, self.finished = [], False

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_trackers_receive_flattened_train_and_eval_records():
    run = m.timeline(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    tracker = RecordingTracker()
    trackers = m.Trackers([tracker])
    for record in run:
        trackers.log(record)
    trackers.finish()
    assert len(tracker.logged) == 160 + 5  # train steps and evals; start/epoch/end carry no scalars
    assert tracker.logged[0] == (0, m.flatten_record(m.evals(run)[0]))
    assert tracker.finished


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "trackio"])
def test_a_tracker_that_is_not_installed_is_named(name, tmp_path):
    package = m.TRACKER_PACKAGES[name]
    installed = importlib.util.find_spec(package) is not None or (
        name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None)
    if installed:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(KeepmixError, match=rf"'{name}' was asked for but the package '{package}' is not installed"):
        m.make_trackers([name], tmp_path, {"train": {"steps": 3}})


def test_unknown_tracker_lists_the_known_ones(tmp_path):
    with pytest.raises(KeepmixError, match="unknown tracker 'mlflow'; expected one of tensorboard, wandb, trackio"):
        m.make_trackers(["mlflow"], tmp_path, {})


def test_flatten_config_keeps_scalars_only():
    flat = m.flatten_config({"model": {"name": "x", "lora": None}, "train": {"lr": 1e-4, "betas": [0.9, 0.95]}})
    assert flat == {"model.name": "x", "model.lora": "null", "train.lr": 1e-4, "train.betas": "[0.9, 0.95]"}


def test_tensorboard_tracker_writes_event_files(tmp_path):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    run = m.timeline(m.read_metrics(FIXTURES / "replay" / "metrics.jsonl"))
    trackers = m.make_trackers(["tensorboard"], tmp_path / "replay", {"train": {"steps": 160}, "model": {"lora": None}})
    for record in run:
        trackers.log(record)
    trackers.finish()
    assert list((tmp_path / "replay" / "tensorboard" / "replay").glob("events.out.tfevents.*"))
