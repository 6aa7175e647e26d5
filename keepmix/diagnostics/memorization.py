"""Is the model memorizing? Numbers from the exposure log and the metrics of a run.

Reads the exposure log (`read_exposures`: one row per document segment seen by a step, with its view,
LR, loss and loss-bearing tokens) and the `epoch` / `eval` records of metrics.jsonl, and answers:

- `loss_by_view`: the token-weighted training loss of each source at each view (1 = first time a
  document is seen), with a 95% t-interval over documents (ratio-estimator standard error).
- `view_drops`: the same documents' loss at view k+1 minus view k (paired by document, negative = fell).
- `boundary_tests` / `detect_clunks`: at each epoch boundary of a source, the step in its per-step loss,
  fitted jointly with a local linear trend (so a steady decline is not a clunk) over 2W source-steps on
  each side, and its z-score against the within-epoch noise. The noise scale is the larger of two
  estimates: the spread of the same statistic at every position inside an epoch, and the per-step noise
  (from step-to-step differences) carried through the fit. A clunk is a fall with z <= -z_threshold.
  Positions count the steps that hold the source, so sparse sources and different epoch lengths work.
- `lr_vs_second_view_drop`: Spearman correlation between a document's LR at its first view and how much
  its loss fell at its second view, each loss taken relative to the documents trained on around the same
  step (raw losses would credit the LR schedule with the ordinary fall of the loss curve).
- `validation_gap`: held-out loss vs the training loss of first-view (and repeated) documents over the
  same steps, and whether validation loss rises while token accuracy holds (over-confidence).
- `guard`: with a retention guard (mixture.guard), one sentence per intervention it made.
- `diagnose(run_dir)` computes all of it, writes `<run>/diagnostics.json` and returns the same dict;
  values that cannot be computed are null. `format_diagnostics` renders it for a terminal.

Rows whose loss is NaN or whose token count is 0 carry no loss and are ignored throughout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from keepmix.data.guard import guard_summary
from keepmix.diagnostics.exposures import read_exposures
from keepmix.diagnostics.clunks import Clunk, boundary_tests, detect_clunks
from keepmix.diagnostics.log import (LogColumns, columns_of, doc_views, json_number, paired_views, relative_losses,
                                     sources_present)
from keepmix.diagnostics.stats import mean_ci, spearman, t_two_sided_p






# ---- loss by view, paired drops, LR relation ---------------------------------------------------------

__all__ = ["loss_by_view", "view_drops", "lr_vs_second_view_drop", "boundary_tests", "detect_clunks",
           "validation_gap", "diagnose", "format_diagnostics"]


def loss_by_view(table: pa.Table) -> dict[str, list[dict]]:
    """{source: [{view, mean_loss, ci_low, ci_high, n}]}: token-weighted loss per view, n = documents."""
    log = columns_of(table)
    out = {}
    for source in sources_present(log):
        dv = doc_views(log, source)
        rows = []
        for v in np.unique(dv["view"]):
            at = dv["view"] == v
            mean, lo, hi, _ = mean_ci(dv["loss"][at], dv["tokens"][at])
            rows.append({"view": int(v), "mean_loss": json_number(mean), "ci_low": json_number(lo), "ci_high": json_number(hi),
                         "n": int(at.sum())})
        out[source] = rows
    return out


def view_drops(table: pa.Table) -> dict[str, list[dict]]:
    """{source: [{from_view, to_view, delta, ci_low, ci_high, p_value, n}]}, paired by document.

    delta = loss at view k+1 minus loss at view k of the same documents (negative: the loss fell),
    weighted by the documents' tokens; p_value is the two-sided t-test of delta = 0.
    """
    log = columns_of(table)
    out = {}
    for source in sources_present(log):
        dv = doc_views(log, source)
        views = np.unique(dv["view"])
        rows = []
        for a, b in zip(views[:-1], views[1:]):
            if b != a + 1:
                continue
            ia, ib = paired_views(dv, a, b)
            if len(ia) == 0:
                continue
            diff = dv["loss"][ib] - dv["loss"][ia]
            delta, lo, hi, se = mean_ci(diff, (dv["tokens"][ia] + dv["tokens"][ib]) / 2.0)
            p = math.nan if not math.isfinite(se) else (
                t_two_sided_p(delta / se, len(ia) - 1) if se > 0 else float(delta == 0.0))
            rows.append({"from_view": int(a), "to_view": int(b), "delta": json_number(delta), "ci_low": json_number(lo),
                         "ci_high": json_number(hi), "p_value": json_number(p), "n": int(len(ia))})
        out[source] = rows
    return out


def lr_vs_second_view_drop(table: pa.Table) -> dict[str, dict]:
    """{source: {spearman_rho, p_value, n}}: LR at a document's first view vs its loss fall at view 2.

    The fall is measured against the documents trained on at the same time: each loss is taken relative
    to the local mean loss of the same source and view around its step, and the fall is that relative
    loss at view 1 minus at view 2. Raw losses would confound the LR with the schedule: under a decaying
    LR the documents seen early also sit where the loss curve falls fastest, so they "fall more" with no
    memorization at all. The relative fall keeps the LR effect because documents met at one step of
    pass 2 were first seen at different steps (and LRs) of pass 1; a sampler that repeats pass 1's order
    leaves nothing to measure, and rho comes out near 0. rho > 0: documents first seen at a higher LR
    fell more at their second view. rho is null when fewer than 3 documents were seen twice or when the
    LR (or the fall) is the same for all of them.
    """
    log = columns_of(table)
    out = {}
    for source in sources_present(log):
        dv = doc_views(log, source, relative_losses(log, source))
        i1, i2 = paired_views(dv, 1, 2)
        rho, p = spearman(dv["lr"][i1], dv["loss"][i1] - dv["loss"][i2])
        out[source] = {"spearman_rho": json_number(rho), "p_value": json_number(p), "n": int(len(i1))}
    return out


# ---- validation loss vs training loss of unseen and repeated documents --------------------------------

def _train_loss(log: LogColumns, source: str, lo: int, hi: int, repeated: bool) -> float | None:
    """Token-weighted training loss of the source's first-view (or repeated) segments in steps (lo, hi]."""
    m = log.of(source) & (log.step > lo) & (log.step <= hi)
    m &= (log.view >= 2) if repeated else (log.view == 1)
    tok = log.tokens[m].sum()
    return json_number(float((log.loss[m] * log.tokens[m]).sum() / tok)) if tok > 0 else None


def validation_gap(table: pa.Table, eval_records: list[dict], *, loss_tol: float = 0.01,
                   acc_tol: float = 0.005) -> dict[str, dict]:
    """{source: {points, best_step, last_step, valid_loss_rise, token_acc_change, overconfident, reading}}.

    points: per eval, the validation loss and token accuracy, the training loss of first-view documents
    and of repeated documents in the steps since the previous eval, gap = valid - first-view loss and
    memorization_gap = valid - repeated loss. The rise is the last validation loss minus the best one;
    overconfident = it rose by more than loss_tol while token accuracy fell by less than acc_tol.
    """
    log = columns_of(table)
    evals = sorted({int(r["step"]): r for r in eval_records if r.get("kind", "eval") == "eval"}.items())
    sources = sorted({k.split("/")[1] for _, r in evals for k in r.get("metrics", {})
                      if k.startswith("valid/") and k.endswith("/loss") and k.count("/") == 2})
    out = {}
    for source in sources:
        points, prev = [], -1
        for step, record in evals:
            metrics = record.get("metrics", {})
            loss, acc = metrics.get(f"valid/{source}/loss"), metrics.get(f"valid/{source}/token_acc")
            if loss is not None and source in log.names:
                first = _train_loss(log, source, prev, step, repeated=False)
                again = _train_loss(log, source, prev, step, repeated=True)
            else:
                first = again = None
            if loss is not None:
                points.append({"step": step, "valid_loss": json_number(loss), "valid_token_acc": json_number(acc),
                               "train_first_view_loss": first, "train_repeat_loss": again,
                               "gap": json_number(loss - first) if first is not None else None,
                               "memorization_gap": json_number(loss - again) if again is not None else None})
            prev = step
        out[source] = _overconfidence(source, points, loss_tol, acc_tol)
    return out


def _overconfidence(source: str, points: list[dict], loss_tol: float, acc_tol: float) -> dict:
    scored = [p for p in points if p["valid_loss"] is not None]
    result = {"points": points, "best_step": None, "last_step": None, "valid_loss_rise": None,
              "token_acc_change": None, "overconfident": None,
              "reading": f"{source}: no validation loss was recorded."}
    if not scored:
        return result
    best, last = min(scored, key=lambda p: p["valid_loss"]), scored[-1]
    rise = last["valid_loss"] - best["valid_loss"]
    acc_change = (last["valid_token_acc"] - best["valid_token_acc"]
                  if last["valid_token_acc"] is not None and best["valid_token_acc"] is not None else None)
    result.update(best_step=best["step"], last_step=last["step"], valid_loss_rise=rise,
                  token_acc_change=acc_change)
    if rise <= loss_tol:
        result["overconfident"] = False
        reading = (f"{source}: validation loss {last['valid_loss']:.3f} at step {last['step']} is within "
                   f"{loss_tol} nats of its best ({best['valid_loss']:.3f} at step {best['step']}).")
    elif acc_change is None:
        reading = (f"{source}: validation loss rose {rise:.3f} nats since step {best['step']}; no token "
                   "accuracy was recorded to tell over-confidence from forgetting.")
    else:
        result["overconfident"] = acc_change > -acc_tol
        accs = f"token accuracy {best['valid_token_acc']:.3f} -> {last['valid_token_acc']:.3f}"
        reading = (f"{source}: validation loss rose {rise:.3f} nats since step {best['step']} "
                   f"({best['valid_loss']:.3f} -> {last['valid_loss']:.3f}) while " + (
                       f"{accs} held: the model grew over-confident on unseen text, not forgetful."
                       if result["overconfident"] else
                       f"{accs} fell: it is getting worse on unseen text (overfitting or forgetting)."))
    if (gap := last["memorization_gap"]) is not None:
        reading += (f" Near step {last['step']} validation loss is {abs(gap):.3f} nats "
                    f"{'above' if gap >= 0 else 'below'} the loss of repeated training documents.")
    result["reading"] = reading
    return result


# ---- the run-level report -----------------------------------------------------------------------------

def _read_records(path: Path) -> list[dict]:
    """metrics.jsonl records; a line that does not parse (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _clunk_lines(clunks: list[Clunk], tested: list[Clunk]) -> list[str]:
    """One line per source: its clunk's own reading, or the range over several."""
    lines = []
    for source in dict.fromkeys(c.source for c in clunks):
        mine = [c for c in clunks if c.source == source]
        if len(mine) == 1:
            lines.append(mine[0].reading)
            continue
        falls, zs = sorted(-c.delta for c in mine), sorted(c.z for c in mine)
        of = sum(t.source == source for t in tested)
        lines.append(f"{source}: loss fell {falls[0]:.2f}-{falls[-1]:.2f} nats at {len(mine)} of its {of} "
                     f"tested epoch boundaries (first at step {mine[0].step}, z {zs[0]:.1f} to {zs[-1]:.1f}):"
                     " the model memorized documents after a single view.")
    return lines


def _summary(lbv: dict, drops: dict, tests: list[Clunk], lr: dict, gaps: dict) -> list[str]:
    if not lbv:
        return ["The exposure log holds no rows with loss-bearing tokens: nothing to diagnose."]
    repeated = [s for s, rows in lbv.items() if any(r["view"] >= 2 for r in rows)]
    tested = [t for t in tests if t.z is not None]
    clunks = [t for t in tested if t.detected]
    if not repeated:
        lines = ["Is the model memorizing? Not measurable: every document was seen once; "
                 "no memorization measurable."]
    elif clunks:
        lines = [f"Is the model memorizing? Yes: the training loss fell at {len(clunks)} of {len(tested)} "
                 "tested epoch boundaries."] + _clunk_lines(clunks, tested)
    elif tested:
        low = min(tested, key=lambda t: t.z)
        lines = [f"Is the model memorizing? No clunk: at {len(tested)} tested epoch boundaries the loss "
                 f"moved no more than the variation inside an epoch (largest change {low.delta:+.3f} nats at "
                 f"{low.source} step {low.step}, z = {low.z:.1f})."]
    else:
        lines = ["Is the model memorizing? Undecided: documents were seen again, but no epoch boundary had "
                 "enough steps around it to test for a clunk."]
    for source, rows in lbv.items():
        if source not in repeated:
            lines.append(f"{source}: every document was seen once; no memorization measurable.")
            continue
        first = next((r for r in drops.get(source, []) if r["from_view"] == 1), None)
        by_view = {r["view"]: r for r in rows}
        if first is None or first["delta"] is None or 1 not in by_view or 2 not in by_view:
            continue
        ci = (f", 95% CI {first['ci_low']:+.3f} to {first['ci_high']:+.3f}"
              if first["ci_low"] is not None else "")
        one, two = by_view[1], by_view[2]
        lines.append(f"{source}: loss {one['mean_loss']:.3f} at first view ({one['n']} documents), "
                     f"{two['mean_loss']:.3f} at second view ({two['n']}); the same "
                     f"{first['n']} documents changed {first['delta']:+.3f} nats{ci} (ordinary learning "
                     "between the views is part of this; the boundary test and validation gap separate it).")
        rel = lr.get(source, {})
        if rel.get("spearman_rho") is not None:
            lines.append(f"{source}: LR at first view vs loss fall at second view: Spearman rho = "
                         f"{rel['spearman_rho']:.2f} (p = {rel['p_value']:.2g}, {rel['n']} documents).")
    lines += [g["reading"] for g in gaps.values()]
    return lines


def diagnose(run_dir: str | Path) -> dict:
    """Compute every diagnostic of a run, write `<run>/diagnostics.json` (atomically) and return it."""
    run_dir = Path(run_dir)
    table = read_exposures(run_dir)
    records = _read_records(run_dir / "metrics.jsonl")
    # A resumed run logs the steps after its checkpoint again: the last record of each key wins.
    epochs = list({(str(r["source"]), int(r["epoch"])): r for r in records
                   if r.get("kind") == "epoch" and {"source", "epoch", "step"} <= r.keys()}.values())
    evals = [r for r in records if r.get("kind") == "eval" and "step" in r]
    lbv, drops, lr = loss_by_view(table), view_drops(table), lr_vs_second_view_drop(table)
    tests = boundary_tests(table, epochs or None)
    gaps = validation_gap(table, evals)
    result = {"loss_by_view": lbv, "view_drops": drops, "clunks": [asdict(t) for t in tests if t.detected],
              "boundaries": [asdict(t) for t in tests], "lr_vs_drop": lr, "validation_gap": gaps,
              "summary": _summary(lbv, drops, tests, lr, gaps), "guard": guard_summary(records)}
    path = run_dir / "diagnostics.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return result


def format_diagnostics(d: dict) -> str:
    """The diagnostics as plain text for a terminal: the summary, loss by view, and the boundary tests."""
    lines = ["Memorization diagnostics"] + [f"  - {s}" for s in d["summary"]]
    if d.get("guard"):
        lines += ["", "Retention guard"] + [f"  - {s.removeprefix('Retention guard: ')}" for s in d["guard"]]
    if d["loss_by_view"]:
        lines += ["", "Loss by view (token-weighted, nats; 95% CI over documents)",
                  f"  {'source':<16}{'view':>5}{'loss':>9}{'95% CI':>20}{'docs':>9}"]
        for source, rows in d["loss_by_view"].items():
            for r in rows:
                ci = (f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r["ci_low"] is not None else "-")
                lines.append(f"  {source:<16}{r['view']:>5}{r['mean_loss']:>9.3f}{ci:>20}{r['n']:>9}")
    boundaries = d.get("boundaries", d["clunks"])
    if boundaries:
        lines += ["", "Epoch boundaries (loss step adjusted for the local trend)",
                  f"  {'source':<16}{'step':>8}{'pass':>5}{'delta':>9}{'z':>7}  verdict"]
        for b in boundaries:
            delta = f"{b['delta']:+.3f}" if b["delta"] is not None else "-"
            z = f"{b['z']:.1f}" if b["z"] is not None else "-"
            verdict = "clunk" if b["detected"] else ("no clunk" if b["z"] is not None else "not tested")
            lines.append(f"  {b['source']:<16}{b['step']:>8}{b['epoch']:>5}{delta:>9}{z:>7}  {verdict}")
    return "\n".join(lines)
