"""The answer of a sweep: the table of arms, the Pareto front, the fitted mixture model, the recommendation.

Contract of `write_answer(sweep)`: reads every arm's run directory (metrics.jsonl: the last eval's
retention against the shared baseline, the realized mixture, tokens, wall time) and writes
<output>/sweep.json, sweep.md, sweep.html and pareto.png; returns the sweep.json data. Definitions:
  task gain    the mean change vs the baseline of the `answer.task` metrics (default: every task metric;
               without tasks, the token accuracy of the source the base schedule ends heaviest on);
  worst loss   the largest worsening (retention.worsening: points for accuracies, a fraction for losses)
               over the `answer.keep` metrics (default: every other valid/<source>/token_acc);
  within       worst loss <= tolerance (answer.tolerance, default the run's eval.retention_tolerance).
The fit (keepmix.sweep.fit) regresses the gain and each kept metric on the arms' realized mixture shares;
the recommendation is printed as a config snippet. Merge points (an arm's merge.json, `keepmix merge`)
and the verify arm are drawn on the same front. An arm that has not completed is listed as missing.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import yaml

from keepmix.errors import KeepmixError
from keepmix.eval.retention import worsening
from keepmix.report.metrics import evals, of_kind, read_metrics, run_status
from keepmix.sweep.fit import fit_metric, pareto_front, recommend
from keepmix.sweep.keys import get_key
from keepmix.sweep.render import markdown, page, pareto_plot

MIXTURE_KEYS = ("mixture.", "sources[")


def _source_names(sweep) -> list[str]:
    return [s["name"] for s in sweep.base.get("sources", [])]


def metric_choice(sweep, retention: dict) -> tuple[list[str], list[str]]:
    """(task metrics, kept metrics) of this sweep, from answer: or the defaults (module doc)."""
    task = list(sweep.answer.task) or [k for k in retention if k.startswith("task/")]
    if not task:
        schedule = get_key(sweep.base, "mixture.schedule") or []
        final = schedule[-1]["weights"] if schedule else {}
        heaviest = max(final, key=final.get) if final else _source_names(sweep)[-1]
        task = [f"valid/{heaviest}/token_acc"]
    keep = list(sweep.answer.keep) or [k for k in retention
                                       if k.startswith("valid/") and k.endswith("/token_acc") and k not in task]
    return task, keep


def score(retention: dict, task: list[str], keep: list[str]) -> dict:
    """gain, worst loss and flagged count of one eval's retention table."""
    missing = [k for k in task + keep if k not in retention]
    if missing:
        raise KeepmixError(f"metrics {', '.join(missing)} are not in the run's retention table "
                           f"(it has {', '.join(sorted(retention))}); fix answer.task / answer.keep")
    gain = float(np.mean([retention[k]["delta"] for k in task]))
    worst = max((worsening(retention[k]) for k in keep), default=0.0)
    return {"gain": gain, "worst_loss": float(worst),
            "flagged": sum(bool(e.get("flagged")) for e in retention.values()),
            "task": {k: retention[k]["now"] for k in task}, "keep": {k: retention[k]["now"] for k in keep}}


def read_arm(run_dir: Path) -> dict | None:
    """What the answer needs of one arm's run, or None when it has not completed."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = read_metrics(path)
    status = run_status(records)
    ev = evals(records)
    if status.status != "completed" or not ev:
        return None
    train = of_kind(records, "train")
    step0 = next((r for r in ev if r["step"] == 0), None)
    start = next((r for r in of_kind(records, "start")), {})
    return {"retention": ev[-1]["retention"], "metrics": ev[-1]["metrics"], "step": status.step,
            "tokens": train[-1]["tokens_seen"] if train else 0, "wall_s": status.wall_s,
            "mixture": train[-1].get("realized_cum", {}) if train else {},
            "step0_s": step0.get("time") if step0 else None, "baseline_reused": bool(step0 and step0.get("baseline_from")),
            "init_from": start.get("init_from")}


def _mixture_varies(rows: list[dict]) -> bool:
    return any(k.startswith(MIXTURE_KEYS) for r in rows for k in r["settings"])


def gather(sweep, collect_only: bool = False) -> dict:
    rows, missing = [], []
    for arm in sweep.arms:
        got = read_arm(arm.run_dir)
        if got is None:
            missing.append(arm.name)
            continue
        rows.append({"name": arm.name, "settings": arm.settings, "run_dir": str(arm.run_dir), **got})
    if not rows:
        where = f"in {sweep.output}" + (" (run the arms first, or point --output at where they ran)"
                                        if collect_only else "")
        raise KeepmixError(f"no completed arm of {sweep.path} {where}; nothing to collect")
    task, keep = metric_choice(sweep, rows[0]["retention"])
    tol = sweep.answer.tolerance
    if tol is None:
        tol = float(get_key(sweep.base, "eval.retention_tolerance", 0.02))
    for r in rows:
        r.update(score(r["retention"], task, keep))
        r["within"] = r["worst_loss"] <= tol + 1e-12
    return {"rows": rows, "missing": missing, "task": task, "keep": keep, "tolerance": tol}


def merge_points(rows: list[dict], task: list[str], keep: list[str]) -> list[dict]:
    points = []
    for r in rows:
        path = Path(r["run_dir"]) / "merge.json"
        if path.exists():
            for p in json.loads(path.read_text())["points"]:
                points.append({"arm": r["name"], "alpha": p["alpha"], **score(p["retention"], task, keep)})
    return points


def fit_and_recommend(data: dict, sources: list[str], kind: str) -> dict:
    rows = data["rows"]
    X = np.array([[r["mixture"].get(s, 0.0) for s in sources] for r in rows])
    if len(rows) < 2 or np.linalg.matrix_rank(X - X.mean(axis=0)) < 1:
        return {"note": "the arms do not vary the mixture, so there is nothing to regress on the weights"}
    out = {"sources": sources, "n_arms": len(rows), "metrics": {}}
    others = sorted({k for r in rows for k in r["settings"] if not k.startswith(MIXTURE_KEYS)})
    if others:
        out["note"] = (f"the arms also differ in {', '.join(others)}; the fit sees only the mixture weights, "
                       f"so those differences count as noise")
    gain_fit = fit_metric(X, [r["gain"] for r in rows], "linear")
    out["metrics"]["gain"] = vars(gain_fit)
    keep_fits = {}
    for key in data["keep"]:
        fit = fit_metric(X, [r["keep"][key] for r in rows], kind)
        entry = rows[0]["retention"][key]
        keep_fits[key] = (fit, entry["baseline"], 1.0 if entry["higher_is_better"] else -1.0)
        out["metrics"][key] = vars(fit)
    for key in data["task"]:
        out["metrics"][key] = vars(fit_metric(X, [r["task"][key] for r in rows], kind))
    rec = recommend(X, gain_fit, keep_fits, data["tolerance"])
    weights = _rounded(dict(zip(sources, rec["weights"])))
    rec["weights"] = weights
    x = np.array([[weights[s] for s in sources]])
    rec["predicted"] = {"gain": float(gain_fit.predict(x)[0]),
                        **{k: float(f.predict(x)[0]) for k, (f, _, _) in keep_fits.items()},
                        **{k: float(_fit_of(out, k).predict(x)[0]) for k in data["task"]}}
    rec["settings"] = {"mixture.weights": weights, "mixture.floor": 0.0,
                       **{f"sources[{s}].floor": None for s in sources}}
    rec["snippet"] = yaml.safe_dump({"mixture": {"schedule": [{"at": 0.0, "weights": weights}], "floor": 0.0}},
                                    sort_keys=False, default_flow_style=None)
    out["recommendation"] = rec
    return out


def _fit_of(fits: dict, key: str):
    from keepmix.sweep.fit import Fit

    return Fit(**fits["metrics"][key])


def _rounded(weights: dict[str, float]) -> dict[str, float]:
    w = {k: max(0.0, round(v, 3)) for k, v in weights.items()}
    total = sum(w.values()) or 1.0
    return {k: round(v / total, 3) for k, v in w.items()}


def savings(sweep, rows: list[dict]) -> dict:
    """What sharing saved, measured: the baseline eval (step-0 time of the arm that evaluated it minus that of
    the arms that reused it) and the prefix (its training time, once instead of once per arm)."""
    out = {}
    evaluated = [r["step0_s"] for r in rows if not r["baseline_reused"] and r["step0_s"] is not None]
    reused = [r["step0_s"] for r in rows if r["baseline_reused"] and r["step0_s"] is not None]
    if sweep.branch is not None:
        records = read_metrics(sweep.output / "prefix" / "metrics.jsonl")
        ev0 = next((r for r in evals(records) if r["step"] == 0), None)
        prefix_s = run_status(records).wall_s
        out["prefix_s"] = prefix_s
        out["prefix_saved_s"] = prefix_s * (len(rows) - 1) if prefix_s else None
        if ev0 is not None:
            evaluated.append(ev0["time"])
    if evaluated and reused:
        cost = statistics.median(evaluated) - statistics.median(reused)
        out["baseline_eval_s"] = round(cost, 1)
        out["baseline_saved_s"] = round(cost * len(reused), 1)
    timing = sweep.output / "timing.json"
    if timing.exists():
        out.update(json.loads(timing.read_text()))
    out["arms_wall_s"] = round(sum(r["wall_s"] or 0 for r in rows), 1)
    return out


def write_answer(sweep, *, collect: bool = False, say=print) -> dict:
    data = gather(sweep, collect_only=collect)
    sources = _source_names(sweep)
    answer = {"sweep": str(sweep.path), "output": str(sweep.output), **data,
              "front": [data["rows"][i]["name"] for i in pareto_front([(r["worst_loss"], r["gain"])
                                                                       for r in data["rows"]])],
              "merge": merge_points(data["rows"], data["task"], data["keep"]),
              "fit": fit_and_recommend(data, sources, sweep.answer.fit), "savings": savings(sweep, data["rows"])}
    answer["recommendation"] = answer["fit"].pop("recommendation", {})
    previous = sweep.output / "sweep.json"
    if previous.exists():  # a verify result stays with the recommendation it measured
        old = json.loads(previous.read_text())
        if old.get("verify") and old["verify"].get("weights") == answer["recommendation"].get("weights"):
            answer["verify"] = old["verify"]
    return _write(sweep, answer, say)


def _write(sweep, answer: dict, say) -> dict:
    out = sweep.output
    out.mkdir(parents=True, exist_ok=True)
    for row in answer["rows"]:  # the big tables stay in the runs' folders
        row.pop("retention", None)
        row.pop("metrics", None)
    plot = pareto_plot(answer, out / "pareto.png")
    (out / "sweep.json").write_text(json.dumps(answer, indent=1, default=str) + "\n")
    text = markdown(answer)
    (out / "sweep.md").write_text(text)
    (out / "sweep.html").write_text(page(answer, text, plot))
    say(f"answer written: {out / 'sweep.md'}, sweep.json, sweep.html")
    print("\n" + text, flush=True)
    return answer


def verify_recommendation(sweep, answer: dict, *, progress: str = "auto", say=print) -> dict:
    """Train the recommended mixture as <output>/verify (same baseline) and compare with the prediction."""
    from keepmix.sweep.arms import run_arm, share_baseline

    rec = answer["recommendation"]
    arm = sweep.arm("verify", rec["settings"])
    share_baseline([arm], first=sweep.prefix() or next(
        (a for a in sweep.arms if not (a.config.get("eval") or {}).get("baseline_from")), None))
    say(f"--verify: training the recommended mixture {rec['weights']} in {arm.run_dir}")
    run_arm(arm, progress=progress, say=say)
    got = read_arm(arm.run_dir)
    measured = score(got["retention"], answer["task"], answer["keep"])
    answer["verify"] = {
        "weights": rec["weights"], "run_dir": str(arm.run_dir), "mixture": got["mixture"],
        "predicted": {"gain": rec["predicted_gain"], "worst_loss": rec["predicted_worst_loss"]},
        "measured": {"gain": measured["gain"], "worst_loss": measured["worst_loss"]},
        "predicted_metrics": {k: v for k, v in rec["predicted"].items() if k != "gain"},
        "measured_metrics": {**measured["task"], **measured["keep"]},
    }
    return _write(sweep, answer, say)
