"""Plots of a run (or several runs overlaid) from its metrics records, as PNG files.

Contract: `build_figures(runs)` returns matplotlib `Figure`s keyed by plot name (see `CAPTIONS`); a plot
whose data the runs do not have (no eval yet, no task metrics, no diagnostics.json) is left out rather
than drawn empty. With one run each source has its own colour; with several, each run has its own colour
and the same panels show one line per run. Every drawn series carries a gid "<what>:<run>[:<key>]"
(e.g. "train:replay:sql", "valid:replay:sql", "planned:replay:sql") so tests and tools can find the data
behind a line. `make_plots(run_dir)` writes them to `<run>/plots/<name>.png`. `live_loss_figure` is the
small loss plot the notebook progress display redraws while training.
Figures are built with `matplotlib.figure.Figure` and rendered by Agg: no pyplot state, no display needed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from keepmix.eval.retention import is_score
from keepmix.report import metrics as m

CAPTIONS = {
    "loss": "Loss per source: training (faint: per step, solid: smoothed) and validation (markers at each "
    "eval); dotted verticals mark where a source's next epoch begins.",
    "token_acc": "Token accuracy per source, training and validation.",
    "mixture": "Data mixture: realized share of each source (stacked area, moving average over steps) "
    "against the planned schedule (dashed: the planned edge of each band) and, with a retention guard, "
    "the guarded plan it drew from (dotted).",
    "lr": "Learning rate.",
    "retention": "Retention at the last eval: how much better each metric is than at the baseline, in "
    "its tolerance's unit (points for scores, % of the baseline for losses); red = worse by more than "
    "the tolerance (forgotten).",
    "tasks": "Task metrics at each eval.",
    "kl_to_base": "Drift from the base model: KL(p_base ‖ p_model) per held-out token of each source, at each "
    "eval (0 at the baseline); it moves before accuracy does.",
    "loss_by_view": "Memorization: mean training loss on a document by how many times it had been seen "
    "(view 1 = first time), with its confidence interval.",
}

SOURCE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
# No red among run colours: red means "forgotten" in the retention plot.
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]
RUN_STYLES = ["-", "--", "-.", ":"]
BAD, GOOD, NEUTRAL = "#d62728", "#2ca02c", "#9e9e9e"
# Text labels on epoch lines only while they stay readable.
MAX_EPOCH_LABELS = 12


@dataclass
class PlotRun:
    """One run to draw: its label, its records (a timeline is taken) and its diagnostics.json, if any."""

    label: str
    records: list[dict]
    diagnostics: dict | None = None


def make_plots(run_dir: Path, records: list[dict] | None = None) -> dict[str, Path]:
    """Write the run's plots to `<run_dir>/plots/<name>.png`; returns name -> file for those drawn."""
    run_dir = Path(run_dir)
    if records is None:
        records = m.read_metrics(run_dir / "metrics.jsonl")
    run = PlotRun(run_dir.name, records, m.read_diagnostics(run_dir))
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in build_figures([run]).items():
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(figure_png(fig))
    return paths


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def build_figures(runs: list[PlotRun]) -> dict[str, Figure]:
    """Every plot the runs have data for, one line per run where there are several."""
    runs = [PlotRun(r.label, m.timeline(r.records), r.diagnostics) for r in runs]
    sources = []
    for r in runs:
        sources += [s for s in m.sources_of(r.records) if s not in sources]
    builders = {
        "loss": lambda: _per_source(runs, sources, "loss", "loss"),
        "token_acc": lambda: _per_source(runs, sources, "token_acc", "token accuracy"),
        "mixture": lambda: _mixture(runs, sources),
        "lr": lambda: _lr(runs),
        "retention": lambda: _retention(runs),
        "tasks": lambda: _tasks(runs),
        "kl_to_base": lambda: _kl_to_base(runs, sources),
        "loss_by_view": lambda: _loss_by_view(runs, sources),
    }
    figures = {}
    for name, build in builders.items():
        fig = build()
        if fig is not None:
            figures[name] = fig
    return figures


def smooth(values: list[float], span: int) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it); NaNs are skipped, not spread."""
    alpha = 2.0 / (span + 1)
    out, mean, weight = [], 0.0, 0.0
    for v in values:
        if not math.isnan(v):
            mean = (1 - alpha) * mean + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(mean / weight if weight else math.nan)
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], np.asarray(values, dtype=float)]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return list((sums[idx] - sums[lo]) / (idx - lo))


def _num(value) -> float:
    # diagnostics.json writes null for what it could not compute; NaN leaves a gap in the plot.
    return math.nan if value is None else float(value)


def _color(runs: list[PlotRun], run_index: int, sources: list[str], source: str) -> str:
    if len(runs) == 1:
        return SOURCE_COLORS[sources.index(source) % len(SOURCE_COLORS)]
    return RUN_COLORS[run_index % len(RUN_COLORS)]


def _grid(n: int, width: float = 4.4, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _per_source(runs: list[PlotRun], sources: list[str], key: str, label: str) -> Figure | None:
    if not sources or not any(m.of_kind(r.records, "train") or m.evals(r.records) for r in runs):
        return None
    fig, axes = _grid(len(sources))
    for ax, source in zip(axes, sources):
        for i, run in enumerate(runs):
            color = _color(runs, i, sources, source)
            prefix = f"{run.label} " if len(runs) > 1 else ""
            train = m.source_series(run.records, source, key)
            if train.steps:
                span = max(1, len(train.steps) // 25)
                ax.plot(train.steps, train.values, color=color, lw=0.7, alpha=0.25, gid=f"train_raw:{run.label}:{source}")
                ax.plot(train.steps, smooth(train.values, span), color=color, lw=1.6,
                        label=f"{prefix}train", gid=f"train:{run.label}:{source}")
            valid = m.eval_series(run.records, f"valid/{source}/{key}")
            if valid.steps:
                ax.plot(valid.steps, valid.values, color=color, ls="--", marker="o", ms=5, mec="black", mew=0.6,
                        label=f"{prefix}valid", gid=f"valid:{run.label}:{source}")
            _epoch_lines(ax, run, i, source, color, labelled=len(runs) == 1)
        ax.set_title(source)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if key == "token_acc":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    return fig


def _epoch_lines(ax, run: PlotRun, run_index: int, source: str, color: str, labelled: bool) -> None:
    boundaries = m.epoch_boundaries(run.records).get(source, [])
    for j, (step, epoch) in enumerate(boundaries):
        ax.axvline(step, color=color, ls=":", lw=1.0, alpha=0.8, gid=f"epoch:{run.label}:{source}",
                   label="epoch boundary" if j == 0 and run_index == 0 else None)
        # Overlaid runs' labels would collide; their lines carry the run's colour instead.
        if labelled and len(boundaries) <= MAX_EPOCH_LABELS:
            ax.text(step, 0.98, f" ep{epoch}", transform=ax.get_xaxis_transform(), fontsize=7, color=color,
                    va="top", ha="left")


def _mixture(runs: list[PlotRun], sources: list[str]) -> Figure | None:
    drawn = [r for r in runs if m.of_kind(r.records, "train")]
    if not drawn:
        return None
    fig = Figure(figsize=(9, 3.4 * len(drawn)), layout="constrained")
    axes = fig.subplots(len(drawn), 1, squeeze=False).ravel()
    for ax, run in zip(axes, drawn):
        steps, realized = m.share_series(run.records, "realized", sources)
        _, plan = m.share_series(run.records, "planned", sources)
        window = max(1, len(steps) // 40)
        colors = [SOURCE_COLORS[i % len(SOURCE_COLORS)] for i in range(len(sources))]
        smoothed = [moving_average(realized[s], window) for s in sources]
        areas = ax.stackplot(steps, *smoothed, labels=[f"{s} (realized)" for s in sources], colors=colors, alpha=0.55)
        for area, source in zip(areas, sources):
            area.set_gid(f"realized:{run.label}:{source}")
        # The planned top edge of each band; the last band always ends at 1.
        edge = np.zeros(len(steps))
        for source, color in zip(sources[:-1], colors):
            edge = edge + np.asarray(plan[source])
            ax.plot(steps, edge, color=color, ls="--", lw=1.8, gid=f"planned:{run.label}:{source}",
                    label=f"{source} (planned edge)")
        guard_steps, guarded = m.share_series(run.records, "guarded", sources)
        if guard_steps:
            edge = np.zeros(len(guard_steps))
            for source, color in zip(sources[:-1], colors):
                edge = edge + np.asarray(guarded[source])
                ax.plot(guard_steps, edge, color=color, ls=":", lw=2.2, gid=f"guarded:{run.label}:{source}",
                        label=f"{source} (guarded edge)")
        ax.set_ylim(0, 1)
        ax.set_xlim(steps[0], steps[-1])
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("step")
        ax.set_ylabel("share of rows")
        ax.set_title(f"mixture: {run.label}" if len(drawn) > 1 else "mixture")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _lr(runs: list[PlotRun]) -> Figure | None:
    series = [(i, r, m.train_series(r.records, "lr")) for i, r in enumerate(runs)]
    if not any(s.steps for _, _, s in series):
        return None
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.subplots()
    for i, run, s in series:
        ax.plot(s.steps, s.values, color=RUN_COLORS[i % len(RUN_COLORS)], ls=RUN_STYLES[i % len(RUN_STYLES)],
                label=run.label, gid=f"lr:{run.label}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    return fig


def _retention(runs: list[PlotRun]) -> Figure | None:
    """Bars of each metric's improvement in its tolerance's unit (see metrics.improvement), so one
    tolerance line serves scores (points) and losses (fraction of the baseline) alike."""
    tables = [(r, *m.last_retention(r.records)) for r in runs]
    # Perplexity restates the loss; its bar would only repeat the loss bar.
    keys: list[str] = []
    for _, _, table in tables:
        keys += [k for k in table if not k.endswith("/ppl") and k not in keys]
    if not keys:
        return None
    fig = Figure(figsize=(9.5, 1.2 + 0.42 * len(keys) * max(1, len(runs) * 0.7)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(runs)
    ticks = []
    for i, (run, step, table) in enumerate(tables):
        for k, key in enumerate(keys):
            if key not in table:
                continue
            row = table[key]
            value = m.improvement(row)
            y = k + (i - (len(runs) - 1) / 2) * height
            ticks.append((row.get("tolerance", 0.0), y, f"{run.label}:{key}"))
            if not math.isfinite(value):
                ax.annotate(f"{row['now']} (non-finite)", (0, y), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7, color=BAD)
                continue
            if len(runs) == 1:
                face = {"learned": GOOD, "kept": NEUTRAL, "forgot": BAD}[m.row_verdict(row)]
            else:
                face = RUN_COLORS[i % len(RUN_COLORS)]
            bar = ax.barh(y, value, height=height * 0.9, color=face, edgecolor=BAD if row.get("flagged") else "none",
                          hatch="///" if row.get("flagged") and len(runs) > 1 else None, lw=1.2)
            bar.patches[0].set_gid(f"retention:{run.label}:{key}")
            ax.annotate(f"{row['delta']:+.3g}", (value, y), xytext=(3 if value >= 0 else -3, 0),
                        textcoords="offset points", ha="left" if value >= 0 else "right", va="center", fontsize=7)
    # Legend entries for the verdict encoding used above (zero-size bars draw nothing).
    if len(runs) == 1:
        for color, label in ((GOOD, "learned"), (NEUTRAL, "kept (within tolerance)"), (BAD, "forgotten")):
            ax.barh(0, 0, height=0, color=color, label=label)
    else:
        for i, run in enumerate(runs):
            ax.barh(0, 0, height=0, color=RUN_COLORS[i % len(RUN_COLORS)], label=run.label)
        ax.barh(0, 0, height=0, color="white", edgecolor=BAD, hatch="///", label="forgotten")
    tolerances = {tol for tol, _, _ in ticks}
    if len(tolerances) == 1:
        tol = tolerances.pop()
        ax.axvline(-tol, color=BAD, ls="--", lw=1.2, label=f"tolerance (-{tol:.0%})", gid="tolerance")
    else:
        for j, (tol, y, gid) in enumerate(ticks):
            ax.vlines(-tol, y - height / 2, y + height / 2, color=BAD, lw=2, gid=f"tolerance:{gid}",
                      label="tolerance" if j == 0 else None)
    ax.axvline(0, color="black", lw=0.8)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    steps = {step for _, step, _ in tables if step is not None}
    at = f" at step {steps.pop()}" if len(steps) == 1 else ""
    ax.set_xlabel("better since baseline: points for scores, % of baseline for loss (raw delta printed)")
    ax.set_title(f"retention{at}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _tasks(runs: list[PlotRun]) -> Figure | None:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in m.metric_keys(r.records, "task/") if k not in keys and is_score(k)]
    if not keys:
        return None
    lines = [(key, key.removeprefix("task/"), lambda i, k=k: SOURCE_COLORS[k % len(SOURCE_COLORS)], f"task:{{run}}:{key}")
             for k, key in enumerate(keys)]
    return _eval_lines(runs, lines, "score")


def _eval_lines(runs: list[PlotRun], lines: list[tuple], ylabel: str) -> Figure:
    """One axes of eval series: per line (metric key, label, color of run i, gid with {run}), per run."""
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for i, run in enumerate(runs):
        for key, label, color, gid in lines:
            s = m.eval_series(run.records, key)
            if s.steps:
                ax.plot(s.steps, s.values, marker="o", ms=4, color=color(i), ls=RUN_STYLES[i % len(RUN_STYLES)],
                        label=label + (f" ({run.label})" if len(runs) > 1 else ""), gid=gid.format(run=run.label))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _kl_to_base(runs: list[PlotRun], sources: list[str]) -> Figure | None:
    if not any(m.eval_series(r.records, f"valid/{src}/kl_to_base").steps for r in runs for src in sources):
        return None
    lines = [(f"valid/{src}/kl_to_base", src, lambda i, src=src: _color(runs, i, sources, src), f"kl:{{run}}:{src}")
             for src in sources]
    return _eval_lines(runs, lines, "KL to base (nats / token)")


def _loss_by_view(runs: list[PlotRun], sources: list[str]) -> Figure | None:
    tables = [(i, r, (r.diagnostics or {}).get("loss_by_view") or {}) for i, r in enumerate(runs)]
    if not any(table for _, _, table in tables):
        return None
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    names = sources + [s for _, _, t in tables for s in t if s not in sources]
    for i, run, table in tables:
        for source, rows in table.items():
            if not rows:
                continue
            rows = sorted(rows, key=lambda row: row["view"])
            views = [row["view"] for row in rows]
            color = SOURCE_COLORS[names.index(source) % len(SOURCE_COLORS)]
            label = source + (f" ({run.label})" if len(runs) > 1 else "")
            ax.plot(views, [_num(row.get("mean_loss")) for row in rows], marker="o", color=color,
                    ls=RUN_STYLES[i % len(RUN_STYLES)], label=label, gid=f"view:{run.label}:{source}")
            ax.fill_between(views, [_num(row.get("ci_low")) for row in rows], [_num(row.get("ci_high")) for row in rows],
                            color=color, alpha=0.15, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("view of the document (1 = first time seen)")
    ax.set_ylabel("mean training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def live_loss_figure(train: dict[str, tuple[list, list]], valid: dict[str, tuple[list, list]],
                     sources: list[str]) -> Figure:
    """The small loss plot under a notebook's live progress bar: per source, smoothed training loss
    and validation points, from (steps, values) pairs."""
    fig = Figure(figsize=(7, 3), layout="constrained")
    ax = fig.subplots()
    names = sources + [n for n in {**train, **valid} if n not in sources]
    for name in names:
        color = SOURCE_COLORS[names.index(name) % len(SOURCE_COLORS)]
        if name in train:
            steps, values = train[name]
            ax.plot(steps, smooth(values, max(1, len(values) // 25)), color=color, label=f"{name} train",
                    gid=f"train:live:{name}")
        if name in valid:
            steps, values = valid[name]
            ax.plot(steps, values, color=color, ls="--", marker="o", label=f"{name} valid", gid=f"valid:live:{name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return fig
