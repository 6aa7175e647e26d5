"""Plots drawn from recorded runs hold the recorded series; PNG files are real images."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keepmix.report import metrics as m
from keepmix.report.plots import BAD, PlotRun, build_figures, live_loss_figure, make_plots, moving_average, smooth

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> PlotRun:
    return PlotRun(name, m.read_metrics(FIXTURES / name / "metrics.jsonl"), m.read_diagnostics(FIXTURES / name))


def artists(fig, gid: str) -> list:
    found = [a for a in fig.findobj() if a.get_gid() == gid]
    assert found, f"nothing drawn with gid {gid!r}"
    return found


def line_xy(fig, gid: str) -> tuple[list, list]:
    (line,) = artists(fig, gid)
    return list(line.get_xdata()), list(line.get_ydata())


@pytest.fixture(scope="module")
def replay():
    run = load("replay")
    return run, m.timeline(run.records), build_figures([run])


def test_every_plot_is_drawn_for_a_complete_run(replay):
    _, _, figs = replay
    assert list(figs) == ["loss", "token_acc", "mixture", "lr", "retention", "tasks", "loss_by_view"]


def test_loss_plot_holds_train_and_valid_series_and_epoch_lines(replay):
    _, run, figs = replay
    for source in ("general", "code", "sql"):
        train = m.source_series(run, source, "loss")
        assert line_xy(figs["loss"], f"train_raw:replay:{source}") == (train.steps, train.values)
        steps, smoothed = line_xy(figs["loss"], f"train:replay:{source}")
        assert steps == train.steps and smoothed == pytest.approx(smooth(train.values, len(steps) // 25))
        valid = m.eval_series(run, f"valid/{source}/loss")
        assert line_xy(figs["loss"], f"valid:replay:{source}") == (valid.steps, valid.values)
    # Only the resumed attempt's eval at step 120 is drawn.
    assert line_xy(figs["loss"], "valid:replay:sql")[0] == [0, 40, 80, 120, 160]
    epoch_x = [line.get_xdata()[0] for line in artists(figs["loss"], "epoch:replay:sql")]
    assert epoch_x == [67, 111, 147]
    assert [line.get_xdata()[0] for line in artists(figs["loss"], "epoch:replay:code")] == [46, 91, 135]
    acc = m.eval_series(run, "valid/sql/token_acc")
    assert line_xy(figs["token_acc"], "valid:replay:sql") == (acc.steps, acc.values)


def test_mixture_plot_stacks_realized_shares_under_planned_edges(replay):
    _, run, figs = replay
    fig = figs["mixture"]
    steps, planned = m.share_series(run, "planned", ["general", "code", "sql"])
    x, edge = line_xy(fig, "planned:replay:general")
    assert x == steps and edge == pytest.approx(planned["general"])
    _, edge = line_xy(fig, "planned:replay:code")
    assert edge == pytest.approx(np.add(planned["general"], planned["code"]))
    # The realized bands: general's polygon tops out at its moving-average realized share.
    _, realized = m.share_series(run, "realized", ["general", "code", "sql"])
    (band,) = artists(fig, "realized:replay:general")
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(max(moving_average(realized["general"], len(steps) // 40)))


def test_lr_tasks_retention_and_view_plots_hold_the_data(replay):
    run_records, run, figs = replay
    lr = m.train_series(run, "lr")
    assert line_xy(figs["lr"], "lr:replay") == (lr.steps, lr.values)
    task = m.eval_series(run, "task/sql_exec/exec_acc")
    assert line_xy(figs["tasks"], "task:replay:task/sql_exec/exec_acc") == (task.steps, task.values)
    _, table = m.last_retention(run)
    (bar,) = artists(figs["retention"], "retention:replay:valid/sql/loss")
    assert bar.get_width() == pytest.approx(-table["valid/sql/loss"]["delta"] / table["valid/sql/loss"]["baseline"])
    assert not [a for a in figs["retention"].findobj() if str(a.get_gid()).endswith("/ppl")]
    (tolerance,) = artists(figs["retention"], "tolerance")
    assert tolerance.get_xdata()[0] == pytest.approx(-0.02)
    views = run_records.diagnostics["loss_by_view"]["sql"]
    assert line_xy(figs["loss_by_view"], "view:replay:sql") == (
        [v["view"] for v in views], [v["mean_loss"] for v in views])


def test_forgotten_metrics_are_red():
    figs = build_figures([load("no_replay")])
    (bar,) = artists(figs["retention"], "retention:no_replay:valid/general/loss")
    (kept,) = artists(figs["retention"], "retention:no_replay:valid/sql/loss")
    assert bar.get_width() < -0.02
    assert np.allclose(bar.get_facecolor()[:3], _rgb(BAD))
    assert not np.allclose(kept.get_facecolor()[:3], _rgb(BAD))


def _rgb(hex_color: str) -> tuple:
    return tuple(int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5))


def test_overlay_draws_one_line_per_run():
    figs = build_figures([load("replay"), load("no_replay")])
    for label in ("replay", "no_replay"):
        run = m.timeline(load(label).records)
        valid = m.eval_series(run, "valid/general/loss")
        assert line_xy(figs["loss"], f"valid:{label}:general") == (valid.steps, valid.values)
        artists(figs["mixture"], f"planned:{label}:general")
        artists(figs["retention"], f"retention:{label}:valid/general/loss")
    assert len(figs["mixture"].axes) == 2


def test_a_run_cut_before_its_first_eval_still_plots_what_it_has():
    records = m.read_metrics(FIXTURES / "crashed" / "metrics.jsonl")
    early = [r for r in records if r.get("step", 0) <= 30 and not (r["kind"] == "eval" and r["step"] > 0)]
    early = [r for r in early if r["kind"] != "eval"]
    figs = build_figures([PlotRun("early", early)])
    assert list(figs) == ["loss", "token_acc", "mixture", "lr"]
    assert line_xy(figs["lr"], "lr:early")[0] == list(range(1, 31))


def test_make_plots_writes_valid_pngs_for_a_crashed_run(tmp_path):
    run_dir = tmp_path / "crashed"
    shutil.copytree(FIXTURES / "crashed", run_dir)
    paths = make_plots(run_dir)
    # No diagnostics.json in this run; the evals up to step 120 give retention and tasks.
    assert sorted(paths) == sorted(["loss", "token_acc", "mixture", "lr", "retention", "tasks"])
    for name, path in paths.items():
        assert path == run_dir / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width >= 500 and image.height >= 250
            # Not a blank canvas: the figure has many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50


def test_smoothing_is_debiased_and_skips_nan():
    assert smooth([2.0, 2.0, 2.0], 5) == [2.0, 2.0, 2.0]
    out = smooth([1.0, float("nan"), 3.0], 1)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 3.0
    assert moving_average([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]


def test_live_loss_figure_draws_smoothed_train_and_valid_points():
    fig = live_loss_figure({"sql": ([1, 2, 3], [3.0, 2.0, 1.0])}, {"sql": ([0, 3], [3.5, 1.5])}, ["general", "sql"])
    assert line_xy(fig, "train:live:sql") == ([1, 2, 3], [3.0, 2.0, 1.0])  # span 1: no smoothing yet
    assert line_xy(fig, "valid:live:sql") == ([0, 3], [3.5, 1.5])


def test_kl_to_base_is_drawn_per_source_when_evals_hold_it():
    run = load("replay")
    records = [dict(r) for r in run.records]
    for r in records:
        if r.get("kind") == "eval":
            r["metrics"] = {**r["metrics"], "valid/code/kl_to_base": 0.01 * r["step"]}
    figs = build_figures([PlotRun("replay", records, run.diagnostics)])
    want = m.eval_series(m.timeline(records), "valid/code/kl_to_base")
    assert want.steps and line_xy(figs["kl_to_base"], "kl:replay:code") == (want.steps, want.values)
    assert "kl_to_base" not in build_figures([run])  # a run without the metric has no such plot
