"""The run report: one self-contained HTML file per run, or one comparing several runs.

Contract: `render_report([run])` writes `<run>/report.html` (and the run's plots to `<run>/plots/`);
`render_report([a, b, ...], out)` overlays the runs in the same plots and puts their tables side by side,
writing `out` (default `<a>/compare.html`). The file makes no external request: images are base64 data
URIs, the CSS is inline, there is no script. It shows the config summary (from `<run>/config.yaml`), the
verdict (retention table at the last eval, flagged rows highlighted, a learned-vs-forgot line), what the
retention guard did (one sentence per intervention, when the run has a guard), the plots, the memorization summary when `<run>/diagnostics.json` exists, and the timing; a run without an `end`
record is reported as such. Every run directory needs a metrics.jsonl; the rest is optional.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from keepmix.errors import KeepmixError
from keepmix.report import metrics as m
from keepmix.report.plots import CAPTIONS, PlotRun, build_figures, figure_png, make_plots

TRAIN_KEYS = ["steps", "batch_size", "micro_batch_size", "seq_len", "lr", "lr_schedule", "warmup", "min_lr_ratio",
              "weight_decay", "grad_clip", "precision", "seed", "checkpoint_every"]
SOURCE_KEYS = ["name", "path", "format", "loss_on", "valid_docs", "floor", "max_docs", "quality_field"]
VERDICT_WORDS = {"learned": "learned", "kept": "kept", "forgot": "FORGOT"}


@dataclass
class RunData:
    """What the report needs from one run directory."""

    run_dir: Path
    label: str
    records: m.Records
    config: dict | None
    diagnostics: dict | None

    @property
    def timeline(self) -> list[dict]:
        return m.timeline(self.records)


def render_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of one run (`<run>/report.html`) or the comparison of several; returns its path."""
    if not run_dirs:
        raise KeepmixError("report: no run directory given; expected one or more folders holding metrics.jsonl.")
    runs = [load_run(Path(d)) for d in run_dirs]
    _unique_labels(runs)
    if len(runs) == 1:
        paths = make_plots(runs[0].run_dir, runs[0].records)
        images = {name: path.read_bytes() for name, path in paths.items()}
        out = Path(out) if out else runs[0].run_dir / "report.html"
    else:
        figures = build_figures([PlotRun(r.label, r.records, r.diagnostics) for r in runs])
        images = {name: figure_png(fig) for name, fig in figures.items()}
        out = Path(out) if out else runs[0].run_dir / "compare.html"
    page = _page(runs, images)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Replace the old report only once the new one is complete.
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(out)
    return out


def load_run(run_dir: Path) -> RunData:
    records = m.read_run(run_dir)
    config = None
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise KeepmixError(f"{config_path}: not valid YAML ({err}); expected the run's resolved config.") from None
        if not isinstance(config, dict):
            raise KeepmixError(f"{config_path}: expected a mapping of config sections (model, sources, ...).")
    return RunData(run_dir, run_dir.name, records, config, m.read_diagnostics(run_dir))


def _unique_labels(runs: list[RunData]) -> None:
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.run_dir.parent.name}/{run.run_dir.name}"


# --- formatting -------------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    mins, s = divmod(rest, 60)
    return f"{h}h {mins:02d}m {s:02d}s" if h else f"{mins}m {s:02d}s" if mins else f"{s}s"


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None, cls: str = "") -> str:
    """A table from already-escaped cell HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        klass = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{klass}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _side_by_side(runs: list[RunData], blocks: list[str]) -> str:
    if len(runs) == 1:
        return blocks[0]
    cells = "".join(f'<div class="col"><h3>{esc(r.label)}</h3>{b}</div>' for r, b in zip(runs, blocks))
    return f'<div class="cols">{cells}</div>'


# --- sections ---------------------------------------------------------------------------------------

def tolerance_text(row: dict) -> str:
    """The tolerance in its unit: points for scores, a share of the baseline for loss and perplexity."""
    tol = row.get("tolerance")
    if tol is None:
        return "–"
    return f"{tol:g}" if row.get("higher_is_better", True) else f"{tol:.0%} of baseline"


def verdict_line(table: dict[str, dict]) -> str:
    """One line: what the run learned, what it forgot (past tolerance), how many metrics held."""
    if not table:
        return "No eval after the baseline yet: nothing to compare with it."
    groups = m.retention_verdict(table)

    def listed(keys: list[str]) -> str:
        return ", ".join(f"{k} {table[k]['delta']:+.3g}" for k in keys) or "nothing"

    forgot = listed(groups["forgot"])
    if groups["forgot"]:
        forgot += " (past tolerance)"
    return f"Learned: {listed(groups['learned'])}. Forgot: {forgot}. Kept {len(groups['kept'])} within tolerance."


def _verdict_block(runs: list[RunData]) -> str:
    tables = [m.last_retention(r.timeline) for r in runs]
    lines = [f'<p class="verdict">{esc(verdict_line(table))}</p>' for _, table in tables]
    head = _side_by_side(runs, lines)
    if not any(table for _, table in tables):
        return head
    steps = ", ".join(f"{r.label}: step {step}" if len(runs) > 1 else f"step {step}"
                      for r, (step, table) in zip(runs, tables) if table)
    caption = f'<p class="note">Retention at the last eval ({esc(steps)}) against the baseline (step 0).</p>'
    return head + caption + _retention_table(runs, [table for _, table in tables])


def _retention_table(runs: list[RunData], tables: list[dict[str, dict]]) -> str:
    """One row per metric; per run: now, delta, verdict. The baseline gets one column when all runs share it."""
    keys: list[str] = []
    for table in tables:
        keys += [k for k in table if k not in keys]
    shared = all(len({t[k].get("baseline") for t in tables if k in t}) == 1 for k in keys)
    first = [next(t[k] for t in tables if k in t) for k in keys]
    header = ["metric", "better", "tolerance"] + (["baseline"] if shared else [])
    for run in runs:
        who = f"{esc(run.label)}<br>" if len(runs) > 1 else ""
        header += ([] if shared else [f"{who}baseline"]) + [f"{who}now", f"{who}delta", f"{who}verdict"]
    rows, classes = [], []
    for key, row0 in zip(keys, first):
        row = [esc(key), esc("higher" if row0.get("higher_is_better", True) else "lower"), esc(tolerance_text(row0))]
        row += [esc(fmt(row0.get("baseline")))] if shared else []
        verdicts = []
        for table in tables:
            r = table.get(key)
            if r is None:
                row += ([] if shared else ["–"]) + ["–", "–", "–"]
                continue
            verdict = m.row_verdict(r)
            verdicts.append(verdict)
            row += ([] if shared else [esc(fmt(r.get("baseline")))]) + [esc(fmt(r.get("now"))), esc(f"{r['delta']:+.4g}")]
            row.append(f'<span class="v-{verdict}">{esc(VERDICT_WORDS[verdict])}</span>')
        rows.append(row)
        classes.append("flagged" if "forgot" in verdicts else "")
    return _table(header, rows, classes, cls="retention")


def _timing_block(runs: list[RunData]) -> str:
    statuses = [m.run_status(r.records) for r in runs]
    rows = {
        "status": [_status_badge(s) for s in statuses],
        "steps": [esc(f"{fmt(s.step)} / {fmt(s.total_steps)}") for s in statuses],
        "tokens seen": [esc(fmt(s.tokens_seen)) for s in statuses],
        "tokens / s": [esc(fmt(s.tokens_per_s)) for s in statuses],
        "wall time": [esc(fmt_duration(s.wall_s)) for s in statuses],
        "training clock": [esc(fmt_duration(s.time_s)) for s in statuses],
        "resumes": [esc(s.resumes) for s in statuses],
        "model": [esc(s.model or "–") for s in statuses],
        "final model": [esc(s.final_dir or "–") for s in statuses],
    }
    header = [""] + [esc(r.label) for r in runs] if len(runs) > 1 else ["", "value"]
    table = _table(header, [[esc(k)] + v for k, v in rows.items()], cls="timing")
    notes = []
    for run, status in zip(runs, statuses):
        who = f"{run.label}: " if len(runs) > 1 else ""
        if not status.ended:
            notes.append(f"{who}no end record: the run crashed, was killed, or is still running; the last "
                         f"recorded step is {status.step} of {fmt(status.total_steps)}.")
        if run.records.skipped:
            lines = ", ".join(str(n) for n in run.records.skipped)
            notes.append(f"{who}{len(run.records.skipped)} unreadable line(s) of metrics.jsonl skipped (line "
                         f"{lines}), as a crash mid-write leaves.")
    return table + "".join(f'<p class="warn">{esc(n)}</p>' for n in notes)


def _status_badge(status: m.RunStatus) -> str:
    kind = "ok" if status.status == "completed" else "bad" if not status.ended else "warn"
    return f'<span class="badge {kind}">{esc(status.status)}</span>'


def _plots_block(images: dict[str, bytes]) -> str:
    figures = []
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        caption = CAPTIONS.get(name, name)
        figures.append(f'<figure id="plot-{esc(name)}"><img alt="{esc(name)} plot" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    return "".join(figures) or '<p class="note">No training or eval records yet: nothing to plot.</p>'


def _guard_block(runs: list[RunData]) -> str:
    """One sentence per intervention of the retention guard; nothing when no run has a guard."""
    from keepmix.data.guard import guard_summary

    lines = [guard_summary(r.records) for r in runs]
    if not any(lines):
        return ""
    blocks = ["<ul>" + "".join(f"<li>{esc(line)}</li>" for line in found) + "</ul>" if found
              else '<p class="note">No retention guard in this run.</p>' for found in lines]
    return "<section><h2>Retention guard</h2>" + _side_by_side(runs, blocks) + "</section>"


def _diagnostics_block(runs: list[RunData]) -> str:
    blocks = []
    for run in runs:
        summary = (run.diagnostics or {}).get("summary") or []
        items = "".join(f"<li>{esc(line)}</li>" for line in summary)
        blocks.append(f"<ul>{items}</ul>" if items else '<p class="note">No diagnostics.json in this run.</p>')
    if not any(r.diagnostics for r in runs):
        return ""
    return "<section><h2>Memorization</h2>" + _side_by_side(runs, blocks) + "</section>"


def _merge_block(runs: list[RunData]) -> str:
    """The run's `keepmix merge` points (merge.json): each α's task and token-accuracy changes vs base."""
    blocks, any_merge = [], False
    for run in runs:
        path = run.run_dir / "merge.json"
        if not path.exists():
            blocks.append('<p class="note">No merge.json (keepmix merge) in this run.</p>')
            continue
        any_merge = True
        points = json.loads(path.read_text())["points"]
        keys = [k for k in points[0]["retention"] if k.startswith("task/") or k.endswith("/token_acc")]
        rows = [[fmt(p["alpha"]) + (" (base)" if p["reused"] else "")]
                + [f"{fmt(p['retention'][k]['now'])} ({100 * p['retention'][k]['delta']:+.1f})" for k in keys]
                for p in points]
        blocks.append(_table([esc(h) for h in ("α", *keys)], [[esc(c) for c in r] for r in rows]))
    if not any_merge:
        return ""
    return ("<section><h2>Merge toward the base (θ0 + α(θ − θ0))</h2>" + _side_by_side(runs, blocks)
            + "</section>")


def _config_block(run: RunData) -> str:
    cfg = run.config
    if cfg is None:
        return f'<p class="note">No config.yaml in {esc(run.run_dir)}.</p>'
    parts = []
    model = cfg.get("model") or {}
    lora = model.get("lora")
    model_rows = [["name", esc(model.get("name") or "–")], ["init", esc(model.get("init", "pretrained"))],
                  ["dtype", esc(model.get("dtype", "auto"))],
                  ["LoRA", esc(", ".join(f"{k}={v}" for k, v in lora.items()) if lora else "off (all weights)")]]
    if model.get("gguf_file"):
        model_rows.append(["gguf_file", esc(model["gguf_file"])])
    parts.append("<h4>Model</h4>" + _table(["", ""], model_rows, cls="kv"))
    sources = cfg.get("sources") or []
    if sources:
        keys = [k for k in SOURCE_KEYS if any(s.get(k) is not None for s in sources)]
        rows = [[_cell(k, s.get(k)) for k in keys] for s in sources]
        parts.append("<h4>Sources</h4>" + _table([esc(k) for k in keys], rows))
    parts.append("<h4>Mixture</h4>" + _mixture_table(cfg.get("mixture") or {}, [s.get("name") for s in sources]))
    train = cfg.get("train") or {}
    rows = [[esc(k), esc(fmt(train[k]))] for k in TRAIN_KEYS if train.get(k) is not None]
    parts.append("<h4>Training</h4>" + _table(["", ""], rows, cls="kv"))
    ev = cfg.get("eval") or {}
    if ev:
        tasks = ", ".join(f"{t.get('name')} ({t.get('kind')})" for t in ev.get("tasks") or []) or "none"
        rows = [["every", esc(fmt(ev.get("every")))], ["retention tolerance", esc(fmt(ev.get("retention_tolerance")))],
                ["tasks", esc(tasks)]]
        parts.append("<h4>Eval</h4>" + _table(["", ""], rows, cls="kv"))
    return "".join(parts)


def _cell(key: str, value) -> str:
    # Long absolute paths crowd the table; the file name is shown and the full path is the tooltip.
    if key == "path" and isinstance(value, str) and "/" in value:
        return f'<span title="{esc(value)}">{esc(Path(value).name)}</span>'
    return esc(fmt(value))


def _mixture_table(mixture: dict, names: list[str]) -> str:
    schedule = mixture.get("schedule")
    notes = [f"interpolation: {mixture.get('interpolation', 'linear')}", f"floor: {fmt(mixture.get('floor', 0.0))}"]
    for point in mixture.get("quality") or []:
        notes.append(f"quality ≥ {fmt(point.get('min'))} at t={fmt(point.get('at'))}")
    guard = mixture.get("guard")
    if guard:
        notes.append("guard: " + ", ".join(f"{k}={fmt(v) if not isinstance(v, list) else '/'.join(v)}"
                                           for k, v in guard.items() if v is not None))
    note = f'<p class="note">{esc("; ".join(notes))}</p>'
    if not schedule:
        return '<p class="note">No schedule: each source in proportion to its tokens.</p>' + note
    names = names or sorted({k for p in schedule for k in p.get("weights", {})})
    rows = [[esc(fmt(p.get("at")))] + [esc(fmt(p.get("weights", {}).get(n, 0.0))) for n in names] for p in schedule]
    return _table(["t"] + [esc(n) for n in names], rows) + note


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1280px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:1.05em;margin:6px 0}h4{margin:14px 0 6px;font-size:.95em;color:#4a5263}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:4px 20px 16px;margin:16px 0}
.sub{color:#5b6475;margin:0}.note{color:#5b6475;font-size:.9em}
.verdict{font-size:1.05em;font-weight:600}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px}
table{border-collapse:collapse;font-size:.88em;margin:4px 0}
th,td{border:1px solid #e1e4ea;padding:4px 8px;text-align:left;white-space:nowrap}
thead th{background:#f0f2f5}
table.kv thead{display:none}
tr.flagged td{background:#fde2e1}
.v-forgot{color:#9b1c1c;font-weight:700}.v-learned{color:#1e7b34;font-weight:600}.v-kept{color:#5b6475}
.badge{padding:2px 8px;border-radius:10px;font-weight:600;font-size:.9em}
.badge.ok{background:#dff3e4;color:#1e7b34}.badge.warn{background:#fff4e5;color:#8a5a00}
.badge.bad{background:#fde2e1;color:#9b1c1c}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:16px}
.col{min-width:0;overflow-x:auto}section{overflow-x:auto}
figure{margin:16px 0}figure img{max-width:100%;height:auto;border:1px solid #eef0f3}
figcaption{color:#5b6475;font-size:.88em;margin-top:4px}
"""


def _page(runs: list[RunData], images: dict[str, bytes]) -> str:
    labels = " vs ".join(r.label for r in runs)
    title = f"keepmix report: {labels}" if len(runs) == 1 else f"keepmix comparison: {labels}"
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    dirs = ", ".join(str(r.run_dir) for r in runs)
    body = [
        f"<header><h1>{esc(title)}</h1><p class=\"sub\">{esc(dirs)} · rendered {esc(generated)}</p></header>",
        "<section><h2>Verdict</h2>" + _verdict_block(runs) + "</section>",
        _guard_block(runs),
        "<section><h2>Timing</h2>" + _timing_block(runs) + "</section>",
        "<section><h2>Plots</h2>" + _plots_block(images) + "</section>",
        _diagnostics_block(runs),
        _merge_block(runs),
        "<section><h2>Config</h2>" + _side_by_side(runs, [_config_block(r) for r in runs]) + "</section>",
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
