"""Rendering a sweep's answer: the Pareto plot (matplotlib, Agg, like keepmix/report/plots.py), the
Markdown text (sweep.md, also printed) and the HTML page (sweep.html, the plot inline). Contract: each
takes the sweep.json data (keepmix.sweep.answer) and nothing else."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def pareto_plot(answer: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    rows = answer["rows"]
    xs, ys = [100 * r["worst_loss"] for r in rows], [100 * r["gain"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue", label="arms", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = [next(r for r in rows if r["name"] == n) for n in answer["front"]]
    ax.plot([100 * r["worst_loss"] for r in front], [100 * r["gain"] for r in front], color="tab:blue",
            alpha=0.5, label="Pareto front")
    by_arm: dict[str, list] = {}
    for p in answer["merge"]:
        by_arm.setdefault(p["arm"], []).append(p)
    for arm, points in by_arm.items():
        points.sort(key=lambda p: p["alpha"])
        ax.plot([100 * p["worst_loss"] for p in points], [100 * p["gain"] for p in points], "s--", color="tab:green",
                markersize=4, label=f"merge of {arm} (α)")
        for p in points:
            ax.annotate(f"α={p['alpha']:g}", (100 * p["worst_loss"], 100 * p["gain"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points", color="tab:green")
    if answer.get("verify"):
        v = answer["verify"]
        ax.scatter([100 * v["measured"]["worst_loss"]], [100 * v["measured"]["gain"]], marker="*", s=160,
                   color="tab:red", label="verify (measured)", zorder=4)
        ax.scatter([100 * v["predicted"]["worst_loss"]], [100 * v["predicted"]["gain"]], marker="*", s=160,
                   facecolors="none", edgecolors="tab:red", label="recommended (predicted)", zorder=4)
    ax.axvline(100 * answer["tolerance"], color="grey", linestyle=":", label="tolerance")
    ax.set_xlabel("worst retention loss (points; % for losses; lower is better)")
    ax.set_ylabel("task gain vs base (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _pts(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "(base)"


def markdown(answer: dict) -> str:
    keep, task = answer["keep"], answer["task"]
    lines = [f"# keepmix sweep: {answer['sweep']}", "",
             f"Task gain = mean change of {', '.join(task)}; worst loss = the largest drop among "
             f"{', '.join(keep)} (points); tolerance {100 * answer['tolerance']:.1f} points.", "",
             "| arm | settings | mixture (realized) | task gain | worst loss | flagged | within | tokens | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in answer["rows"]:
        mix = " ".join(f"{k} {v:.0%}" for k, v in r["mixture"].items())
        star = " *" if r["name"] in answer["front"] else ""
        lines.append(f"| {r['name']}{star} | {_settings_text(r['settings'])} | {mix} | {_pts(r['gain'])} | "
                     f"{_pts(r['worst_loss'])} | {r['flagged']} | {'yes' if r['within'] else 'no'} | "
                     f"{r['tokens']:,} | {r['wall_s'] or 0:.0f} s |")
    lines += ["", "\\* on the Pareto front (no other arm has both a higher gain and a smaller worst loss)."]
    if answer["missing"]:
        lines += ["", f"Not completed (not in the table): {', '.join(answer['missing'])}."]
    if answer["merge"]:
        lines += ["", "## Merge points (θ0 + α(θ − θ0))", "", "| arm | α | task gain | worst loss |", "|---|---|---|---|"]
        lines += [f"| {p['arm']} | {p['alpha']:g} | {_pts(p['gain'])} | {_pts(p['worst_loss'])} |"
                  for p in answer["merge"]]
    fit = answer["fit"]
    lines += ["", "## Fitted model of each metric on the mixture weights", ""]
    if "metrics" in fit:
        lines += [f"Least squares (numpy) over {fit['n_arms']} arms, one coefficient per source "
                  f"({', '.join(fit['sources'])}); held-out error = leave-one-arm-out RMSE.", "",
                  "| metric | form | coefficients | train RMSE | held-out RMSE |", "|---|---|---|---|---|"]
        for key, f in fit["metrics"].items():
            held = "-" if f["heldout_rmse"] is None else f"{f['heldout_rmse']:.4f}"
            lines.append(f"| {key} | {f['kind']} | {', '.join(f'{c:.3f}' for c in f['coef'])} | "
                         f"{f['train_rmse']:.4f} | {held} |")
    if fit.get("note"):
        lines += ["", f"Note: {fit['note']}."]
    rec = answer.get("recommendation") or {}
    if rec:
        verdict = ("the largest predicted task gain with every kept metric predicted within tolerance"
                   if rec["feasible"] else "no mixture in the measured range is predicted within tolerance; "
                   "this is the one predicted to lose least")
        lines += ["", "## Recommended mixture", "", f"{verdict}: predicted task gain {_pts(rec['predicted_gain'])} "
                  f"points, worst loss {_pts(rec['predicted_worst_loss'])} points.", "", "```yaml",
                  rec["snippet"].rstrip(), "```"]
    v = answer.get("verify")
    if v:
        lines += ["", "## --verify: the recommendation trained", "", "| | predicted | measured |", "|---|---|---|",
                  f"| task gain | {_pts(v['predicted']['gain'])} | {_pts(v['measured']['gain'])} |",
                  f"| worst loss | {_pts(v['predicted']['worst_loss'])} | {_pts(v['measured']['worst_loss'])} |"]
        for key, value in v["predicted_metrics"].items():
            lines.append(f"| {key} | {value:.4f} | {v['measured_metrics'].get(key, float('nan')):.4f} |")
    s = answer.get("savings") or {}
    if s:
        parts = [f"arms' wall time {s['arms_wall_s']:.0f} s"]
        if "run_s" in s:
            parts.append(f"this call {s['run_s']:.0f} s")
        if s.get("baseline_saved_s") is not None:
            parts.append(f"shared baseline: the base eval took {s['baseline_eval_s']:.0f} s once, saving "
                         f"{s['baseline_saved_s']:.0f} s")
        if s.get("prefix_saved_s") is not None:
            parts.append(f"shared prefix: {s['prefix_s']:.0f} s once, saving {s['prefix_saved_s']:.0f} s")
        lines += ["", "Time: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def page(answer: dict, text: str, plot: Path) -> str:
    """sweep.html: the Markdown answer as HTML (headings, tables, code, paragraphs) with the plot inline."""
    image = base64.b64encode(plot.read_bytes()).decode()
    body, table, code = [], [], None
    for line in text.splitlines() + [""]:
        if code is not None:
            if line.startswith("```"):
                body.append(f"<pre>{html.escape(chr(10).join(code))}</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # not the separator row
                cells = [c.strip() for c in line.strip("|").split("|")]
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("```"):
            code = []
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
            body.append(f"<img alt='Pareto front: task gain vs worst retention loss' "
                        f"src='data:image/png;base64,{image}'>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#1f2430}"
             "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #dde1e7;"
             "padding:4px 8px;text-align:left}th{background:#f4f6f9}pre{background:#f4f6f9;padding:1em}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>keepmix sweep</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
