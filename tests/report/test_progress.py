"""Live progress in every mode, fed with a recorded run's records."""

import io
from pathlib import Path

import pytest

from keepmix.report import metrics as m
from keepmix.report.notebook import NotebookProgress
from keepmix.report.progress import (
    PlainProgress,
    QuietProgress,
    RichProgress,
    duration,
    end_line,
    eval_line,
    make_progress,
    si,
    train_line,
)

FIXTURES = Path(__file__).parent / "fixtures"
SOURCES = ["general", "code", "sql"]


@pytest.fixture(scope="module")
def records():
    return m.timeline(m.read_metrics(FIXTURES / "no_replay" / "metrics.jsonl"))


def feed(progress, records, upto: int | None = None) -> None:
    """Drive a progress display the way the training loop does."""
    progress.start(160, 0, SOURCES, "no_replay")
    for record in records:
        if upto is not None and record.get("step", 0) > upto:
            break
        if record["kind"] == "train":
            progress.train(record)
        elif record["kind"] == "eval":
            progress.eval(record)
        elif record["kind"] == "epoch":
            progress.message(f"{record['source']}: epoch {record['epoch']} begins at step {record['step']}")
        elif record["kind"] == "end":
            progress.end(record)


class Clock:
    """A clock the test moves: each train record advances it by `tick` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_paced_and_carry_no_control_codes(records):
    clock, stream = Clock(), io.StringIO()
    progress = PlainProgress(stream, every_s=10.0, clock=clock)
    progress.start(160, 0, SOURCES, "no_replay")
    for record in records:
        if record["kind"] == "train":
            clock.now = record["step"] * 1.0  # one second per step: one train line per 10 steps
            progress.train(record)
        elif record["kind"] == "eval":
            progress.eval(record)
        elif record["kind"] == "end":
            progress.end(record)
    out = stream.getvalue()
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    train_steps = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("step ")]
    assert train_steps == list(range(1, 161, 10))
    assert sum(line.startswith(("eval @", "baseline:")) for line in lines) == 5
    assert lines[-1] == "end: completed at step 160 | 655k tokens | 1.89k tok/s | wall 5m48s | final model: runs/no_replay/final"


def test_quiet_prints_only_evals_and_the_end(records):
    stream = io.StringIO()
    with make_progress("quiet", stream=stream) as progress:
        assert isinstance(progress, QuietProgress)
        feed(progress, records)
    lines = stream.getvalue().splitlines()
    assert "\x1b" not in stream.getvalue()
    assert len(lines) == 6
    assert lines[0].startswith("baseline: general loss 2.900")
    assert all(line.startswith("eval @ step") for line in lines[1:5])
    assert lines[4].endswith("FORGOT: task/general_mc/accuracy -0.036, valid/general/loss +0.120")
    assert lines[5].startswith("end: completed at step 160")


def test_auto_is_plain_off_a_terminal_and_rich_on_one(records):
    assert isinstance(make_progress("auto", stream=io.StringIO()), PlainProgress)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(make_progress("auto", stream=Terminal()), RichProgress)
    with pytest.raises(ValueError, match="progress mode 'fancy' is not one of auto, rich, notebook, plain, quiet"):
        make_progress("fancy")


def test_rich_into_a_non_terminal_stream_works(records):
    stream = io.StringIO()
    with make_progress("rich", stream=stream) as progress:
        feed(progress, records)
    out = stream.getvalue()
    assert "\x1b" not in out  # rich draws no colours or cursor moves into a file
    assert out.rstrip().endswith("final model: runs/no_replay/final")
    assert "eval @ step 160" in out
    # The final live area is left on screen: one row per source with the last eval next to training.
    assert "general" in out and "3.020 (+0.120)" in out
    assert not progress.live.is_started


def test_rich_live_area_shows_the_latest_numbers(records):
    progress = RichProgress(io.StringIO())
    feed(progress, records, upto=100)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(progress.render())
    text = console.file.getvalue()
    progress.close()
    last = [r for r in records if r["kind"] == "train" and r["step"] == 100][0]
    assert "100/160" in text
    assert f"lr {last['lr']:.2e}" in text
    assert "valid loss @ 80" in text
    assert "sql_exec/exec_acc 0.448 (+0.398)" in text


def test_rich_in_a_terminal_redraws_without_raw_markup(records):
    from rich.console import Console

    progress = RichProgress(io.StringIO())
    terminal = io.StringIO()
    progress.console = Console(file=terminal, force_terminal=True, width=140)
    # Evals and messages print while the live area is up: the area is redrawn under them each time.
    feed(progress, records)
    out = terminal.getvalue()
    assert "\x1b[" in out  # a terminal gets colours and cursor moves
    assert "(-2.382)" in out and "[green]" not in out and "[/]" not in out and "[bold]" not in out


@pytest.mark.parametrize("mode", ["rich", "plain", "quiet"])
def test_the_display_is_closed_when_the_loop_is_interrupted(records, mode):
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with make_progress(mode, stream=stream, every_s=0.0) as progress:
            feed(progress, records, upto=20)
            raise KeyboardInterrupt
    assert progress._closed
    if mode == "rich":
        assert not progress.live.is_started


def test_eta_follows_the_records_clock(records):
    progress = PlainProgress(io.StringIO())
    progress.start(160, 0, SOURCES, "x")
    trains = [r for r in records if r["kind"] == "train"]
    progress.train(trains[0])
    assert progress.eta_s() is None
    progress.train(trains[49])
    per_step = (trains[49]["time"] - trains[0]["time"]) / 49
    assert progress.eta_s() == pytest.approx(110 * per_step)


def test_notebook_shows_bar_table_and_loss_plot_in_one_area(records):
    shown, clock = [], Clock()
    progress = NotebookProgress(publish=shown.append, every_s=0.5, plot_every_s=3.0, clock=clock)
    progress.start(160, 0, SOURCES, "no_replay")
    for record in records:
        if record["kind"] == "train":
            clock.now = record["step"] * 0.1
            progress.train(record)
        elif record["kind"] == "eval":
            progress.eval(record)
        if record.get("step") == 100:
            break
    # Paced: not one update per step (100 steps over 10 s at one update per 0.5 s, plus the evals).
    assert 20 <= len(shown) <= 26
    page = shown[-1]
    assert '<progress value="100" max="160"' in page
    assert "<td>sql</td>" in page and "eval @ step 80" in page
    assert page.count('<img alt="loss" src="data:image/png;base64,') == 1
    assert sorted(progress.valid_loss["sql"][0]) == [0, 40, 80]
    progress.close()
    assert "stopped at step 100 without an end record" in shown[-1]


def test_line_formats():
    record = {"step": 5, "tokens_per_s": 2100.0, "lr": 1e-4, "loss": 2.5, "token_acc": 0.4,
              "sources": {"sql": {"loss": 1.5, "token_acc": 0.5}}}
    assert train_line(record, 10, 30.0) == "step 5/10 50% | 2.1k tok/s | ETA 30s | lr 1.00e-04 | loss 2.500 acc 40.0% | sql 1.500/50.0%"
    assert eval_line({"step": 0, "metrics": {"valid/sql/loss": 3.0}, "retention": {}}) == "baseline: sql loss 3.000"
    assert end_line({"status": "stopped", "step": 7, "tokens_seen": 1000, "tokens_per_s": 10.0, "wall_s": 3725,
                     "final_dir": None}) == "end: stopped at step 7 | 1k tokens | 10 tok/s | wall 1h02m"
    assert si(1_234_567) == "1.23M" and duration(None) == "?" and duration(75) == "1m15s"


@pytest.mark.parametrize("mode", ["rich", "plain", "quiet", "notebook"])
def test_messages_before_start_are_fine(records, mode):
    # The loop reports data preparation before it knows the step count.
    stream, shown = io.StringIO(), []
    progress = NotebookProgress(publish=shown.append) if mode == "notebook" else make_progress(mode, stream=stream)
    with progress:
        progress.message("sql: 2400 documents tokenized")
        feed(progress, records, upto=3)
    if mode in ("rich", "plain"):
        assert stream.getvalue().startswith("sql: 2400 documents tokenized\n")
    if mode == "notebook":
        assert "sql: 2400 documents tokenized" in shown[0]


GUARDED = {"kind": "train", "step": 44, "time": 10.0, "tokens_per_s": 2100.0, "lr": 1e-4, "loss": 2.5, "token_acc": 0.4,
           "sources": {"code": {"loss": 1.5, "token_acc": 0.5}},
           "planned": {"general": 0.125, "code": 0.125, "sql": 0.75},
           "guarded": {"general": 0.125, "code": 0.21, "sql": 0.665},
           "guard": {"metric": "token_acc", "tolerance": 0.02, "boost": {"general": 0.0, "code": 0.085},
                     "signal": {"general": {"step": 40, "baseline": 0.4, "now": 0.401, "behind": -0.001},
                                "code": {"step": 40, "baseline": 0.58, "now": 0.556, "behind": 0.024}}}}


def test_a_guarded_run_shows_planned_vs_guarded_share():
    assert train_line(GUARDED, 100, None).endswith("| code 1.500/50.0% | guard: code 21.0% (plan 12.5%)")
    progress = RichProgress(io.StringIO())
    progress.start(100, 0, SOURCES, "guarded")
    progress.train(GUARDED)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(progress.render())
    progress.close()
    text = console.file.getvalue()
    assert "guarded" in text and "guard signal" in text
    code_row = next(line for line in text.splitlines() if line.strip().startswith("code"))
    assert "12.5%" in code_row and "21.0%" in code_row and "-2.4 pts @ 40" in code_row
