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
- `diagnose(run_dir)` computes all of it, writes `<run>/diagnostics.json` and returns the same dict;
  values that cannot be computed are null. `format_diagnostics` renders it for a terminal.

Rows whose loss is NaN or whose token count is 0 carry no loss and are ignored throughout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from keepmix.diagnostics.exposures import read_exposures

_COLUMNS = ("step", "source", "doc_id", "view", "lr", "loss", "tokens")
_ORDINALS = {2: "a second time", 3: "a third time", 4: "a fourth time", 5: "a fifth time", 6: "a sixth time"}


# ---- small statistics (no scipy: regularized incomplete beta by Lentz's continued fraction) ----------

def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_beta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_beta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


@lru_cache(maxsize=None)
def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t (half-width factor of a 95% interval), by bisection."""
    lo, hi = 0.0, 1000.0
    for _ in range(80):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _t_two_sided_p(mid, df) > 0.05 else (lo, mid)
    return (lo + hi) / 2.0


def _mean_ci(values: np.ndarray, weights: np.ndarray) -> tuple[float, float, float, float]:
    """Weighted mean over documents, its 95% t-interval and standard error (ratio-estimator linearization)."""
    n, total = len(values), float(weights.sum())
    mean = float((weights * values).sum() / total)
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    se = math.sqrt(n / (n - 1) * float(((weights * (values - mean)) ** 2).sum())) / total
    half = _t975(n - 1) * se
    return mean, mean - half, mean + half, se


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, len(x)])
    ranks = np.empty(len(x))
    ranks[order] = (starts + (counts + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value (t approximation); NaN when a variable is constant."""
    n = len(x)
    if n < 3:
        return math.nan, math.nan
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan, math.nan
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if abs(rho) >= 1.0:
        return rho, 0.0
    return rho, _t_two_sided_p(rho * math.sqrt((n - 2) / (1.0 - rho * rho)), n - 2)


def _num(x) -> float | None:
    """JSON-safe number: None for NaN/inf."""
    return float(x) if x is not None and math.isfinite(x) else None


# ---- the log as numpy columns -------------------------------------------------------------------------

@dataclass
class _Log:
    names: list[str]
    source: np.ndarray
    step: np.ndarray
    doc_id: np.ndarray
    view: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    tokens: np.ndarray

    def of(self, source: str) -> np.ndarray:
        return self.source == self.names.index(source)


def _log(table: pa.Table) -> _Log:
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"The exposure table lacks column(s) {missing}; expected {list(_COLUMNS)}.")
    src = table.column("source")
    if pa.types.is_dictionary(src.type):
        src = src.cast(pa.string())
    enc = src.combine_chunks().dictionary_encode()
    cols = {c: table.column(c).to_numpy() for c in _COLUMNS if c != "source"}
    keep = np.isfinite(cols["loss"]) & (cols["tokens"] > 0)
    return _Log(names=enc.dictionary.to_pylist(), source=enc.indices.to_numpy()[keep],
                step=cols["step"][keep].astype(np.int64), doc_id=cols["doc_id"][keep].astype(np.int64),
                view=cols["view"][keep].astype(np.int64), lr=cols["lr"][keep].astype(np.float64),
                loss=cols["loss"][keep].astype(np.float64), tokens=cols["tokens"][keep].astype(np.float64))


def _present(log: _Log) -> list[str]:
    return [log.names[c] for c in np.unique(log.source)]


def _doc_views(log: _Log, source: str, loss: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One entry per (document, view) of a source: token-weighted loss and LR, and tokens, sorted by doc.

    loss: per-row values to average instead of the logged loss (one per row of the source).
    """
    m = log.of(source)
    doc, view, tok = log.doc_id[m], log.view[m], log.tokens[m]
    loss = log.loss[m] if loss is None else loss
    span = int(view.max()) + 1
    keys, inv = np.unique(doc * span + view, return_inverse=True)
    total = np.bincount(inv, weights=tok)
    return {"doc": keys // span, "view": keys % span, "tokens": total,
            "loss": np.bincount(inv, weights=loss * tok) / total,
            "lr": np.bincount(inv, weights=log.lr[m] * tok) / total}


def _relative_losses(log: _Log, source: str, rows_wanted: int = 32) -> np.ndarray:
    """Each row's loss minus the local mean loss of the same source and view around its step.

    The local mean spans enough neighbouring steps (of that view) to hold about rows_wanted rows, so it
    follows the training trend but not the individual document. Returns one value per row of the source.
    """
    m = log.of(source)
    step, view, loss, tok = log.step[m], log.view[m], log.loss[m], log.tokens[m]
    out = np.empty(len(step))
    for v in np.unique(view):
        at = np.flatnonzero(view == v)
        steps, pos = np.unique(step[at], return_inverse=True)
        half = int(math.ceil(rows_wanted / 2 / (len(at) / len(steps))))
        sums = np.r_[0.0, np.cumsum(np.bincount(pos, weights=loss[at] * tok[at]))]
        toks = np.r_[0.0, np.cumsum(np.bincount(pos, weights=tok[at]))]
        here = np.arange(len(steps))
        lo, hi = np.clip(here - half, 0, None), np.clip(here + half + 1, None, len(steps))
        local = (sums[hi] - sums[lo]) / (toks[hi] - toks[lo])
        out[at] = loss[at] - local[pos]
    return out


def _pair(dv: dict[str, np.ndarray], a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into dv of the documents seen at both view a and view b (same order)."""
    ia, ib = np.flatnonzero(dv["view"] == a), np.flatnonzero(dv["view"] == b)
    _, ja, jb = np.intersect1d(dv["doc"][ia], dv["doc"][ib], assume_unique=True, return_indices=True)
    return ia[ja], ib[jb]


# ---- loss by view, paired drops, LR relation ---------------------------------------------------------

def loss_by_view(table: pa.Table) -> dict[str, list[dict]]:
    """{source: [{view, mean_loss, ci_low, ci_high, n}]}: token-weighted loss per view, n = documents."""
    log = _log(table)
    out = {}
    for source in _present(log):
        dv = _doc_views(log, source)
        rows = []
        for v in np.unique(dv["view"]):
            at = dv["view"] == v
            mean, lo, hi, _ = _mean_ci(dv["loss"][at], dv["tokens"][at])
            rows.append({"view": int(v), "mean_loss": _num(mean), "ci_low": _num(lo), "ci_high": _num(hi),
                         "n": int(at.sum())})
        out[source] = rows
    return out


def view_drops(table: pa.Table) -> dict[str, list[dict]]:
    """{source: [{from_view, to_view, delta, ci_low, ci_high, p_value, n}]}, paired by document.

    delta = loss at view k+1 minus loss at view k of the same documents (negative: the loss fell),
    weighted by the documents' tokens; p_value is the two-sided t-test of delta = 0.
    """
    log = _log(table)
    out = {}
    for source in _present(log):
        dv = _doc_views(log, source)
        views = np.unique(dv["view"])
        rows = []
        for a, b in zip(views[:-1], views[1:]):
            if b != a + 1:
                continue
            ia, ib = _pair(dv, a, b)
            if len(ia) == 0:
                continue
            diff = dv["loss"][ib] - dv["loss"][ia]
            delta, lo, hi, se = _mean_ci(diff, (dv["tokens"][ia] + dv["tokens"][ib]) / 2.0)
            p = math.nan if not math.isfinite(se) else (
                _t_two_sided_p(delta / se, len(ia) - 1) if se > 0 else float(delta == 0.0))
            rows.append({"from_view": int(a), "to_view": int(b), "delta": _num(delta), "ci_low": _num(lo),
                         "ci_high": _num(hi), "p_value": _num(p), "n": int(len(ia))})
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
    log = _log(table)
    out = {}
    for source in _present(log):
        dv = _doc_views(log, source, _relative_losses(log, source))
        i1, i2 = _pair(dv, 1, 2)
        rho, p = _spearman(dv["lr"][i1], dv["loss"][i1] - dv["loss"][i2])
        out[source] = {"spearman_rho": _num(rho), "p_value": _num(p), "n": int(len(i1))}
    return out


# ---- clunks: a step in the loss at an epoch boundary -------------------------------------------------

@dataclass
class Clunk:
    """One tested epoch boundary of a source; `detected` says whether the loss fell there (a clunk)."""

    source: str
    epoch: int                  # the pass that begins (2 = documents seen a second time)
    step: int                   # the first step holding documents of that pass
    delta: float | None         # trend-adjusted loss change at the boundary, nats (negative = fell)
    before_mean: float | None   # mean per-step loss over the W source-steps before the boundary
    after_mean: float | None    # ... and over the W source-steps from the boundary on
    z: float | None             # delta in units of the within-epoch noise of that statistic
    p_value: float | None       # one-sided normal tail P(Z <= z)
    window: int                 # W
    n_null: int                 # within-epoch positions that informed the noise scale
    detected: bool
    reading: str


def _step_series(log: _Log, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps that hold the source, and the token-weighted mean loss of its segments at each."""
    m = log.of(source)
    steps, inv = np.unique(log.step[m], return_inverse=True)
    tok = np.bincount(inv, weights=log.tokens[m])
    return steps, np.bincount(inv, weights=log.loss[m] * log.tokens[m]) / tok


def _boundaries(log: _Log, epoch_events: list[dict] | None) -> dict[str, list[tuple[int, int]]]:
    """{source: [(epoch, step)]} from the epoch events, or from the first step of each view >= 2."""
    found: dict[str, dict[int, int]] = {}
    if epoch_events is None:
        for source in _present(log):
            m = log.of(source)
            for v in np.unique(log.view[m]):
                if v >= 2:
                    found.setdefault(source, {})[int(v)] = int(log.step[m][log.view[m] == v].min())
    else:
        for event in epoch_events:
            if event.get("kind", "epoch") == "epoch":
                found.setdefault(str(event["source"]), {})[int(event["epoch"])] = int(event["step"])
    return {s: sorted(e.items()) for s, e in found.items()}


def _crossings(positions: np.ndarray, bounds: np.ndarray, w: int) -> np.ndarray:
    """How many boundaries fall inside each window [p-2w, p+2w) (a boundary at its first position is not
    inside: the whole window then belongs to one pass)."""
    b = np.sort(bounds)
    return np.searchsorted(b, positions + 2 * w - 1, "right") - np.searchsorted(b, positions - 2 * w, "right")


def boundary_tests(table: pa.Table, epoch_events: list[dict] | None = None, *, max_window: int = 16,
                   z_threshold: float = 4.0, min_null: int = 20) -> list[Clunk]:
    """Test every epoch boundary of every source for a step down in the training loss.

    epoch_events: metrics.jsonl `epoch` records ({source, epoch, step}); None derives them from the views.
    The window W is an eighth of the source's shortest complete epoch (in steps holding the source),
    between 2 and max_window.
    """
    log = _log(table)
    out = []
    for source, events in _boundaries(log, epoch_events).items():
        if source not in log.names or not log.of(source).any():
            continue
        steps, y = _step_series(log, source)
        bounds = np.searchsorted(steps, [s for _, s in events])
        epoch_lengths = np.diff(np.r_[0, np.unique(bounds)])
        w = int(max(2, min(max_window, epoch_lengths[epoch_lengths > 0].min(initial=len(y)) // 8)))
        x = np.arange(-2 * w, 2 * w)
        # delta-hat at every position is one linear filter: the step coefficient of y ~ 1 + x + [x >= 0].
        h = np.linalg.pinv(np.c_[np.ones(4 * w), x, x >= 0])[2]
        fits = np.correlate(y, h, mode="valid") if len(y) >= 4 * w else np.empty(0)
        positions = np.arange(2 * w, 2 * w + len(fits))
        null = fits[_crossings(positions, bounds, w) == 0]
        diffs = np.diff(y)
        noise = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2) if len(diffs) > 1 else 0.0
        scale, centre = noise * float(np.linalg.norm(h)), 0.0
        if len(null) >= min_null:
            centre = float(np.median(null))
            scale = max(scale, 1.4826 * float(np.median(np.abs(null - centre))))
        for (epoch, step), p in zip(events, bounds):
            out.append(_judge_boundary(source, epoch, step, int(p), y, fits, bounds, w, scale, centre,
                                       len(null), z_threshold))
    return out


def _judge_boundary(source, epoch, step, p, y, fits, bounds, w, scale, centre, n_null, z_threshold) -> Clunk:
    def untestable(why: str) -> Clunk:
        return Clunk(source, epoch, step, None, None, None, None, None, w, n_null, False,
                     f"{source}: the boundary at step {step} (pass {epoch}) was not tested: {why}.")

    if p - 2 * w < 0 or p + 2 * w > len(y):
        have = min(p, len(y) - p)
        return untestable(f"only {have} steps of {source} on one side of it; the test needs {2 * w}")
    if _crossings(np.array([p]), bounds, w)[0] > 1:
        return untestable(f"another boundary lies within {2 * w} steps of {source}")
    if scale <= 0:
        return untestable(f"the per-step loss of {source} does not vary")
    delta = float(fits[p - 2 * w])
    z = float((delta - centre) / scale)
    detected = bool(delta < 0 and z <= -z_threshold)
    seen = _ORDINALS.get(epoch, f"for the {epoch}th time")
    if detected:
        reading = (f"{source}: loss fell {-delta:.2f} nats at step {step} when documents were seen {seen} "
                   f"(z = {z:.1f}): the model memorized them after {epoch - 1} view"
                   f"{'s' if epoch > 2 else ''}.")
    else:
        reading = (f"{source}: no clunk at step {step} (pass {epoch}): the loss changed {delta:+.3f} nats, "
                   f"z = {z:.1f}, within the variation inside an epoch.")
    return Clunk(source, epoch, step, delta, float(y[p - w:p].mean()), float(y[p:p + w].mean()), z,
                 0.5 * math.erfc(-z / math.sqrt(2)), w, n_null, detected, reading)


def detect_clunks(table: pa.Table, epoch_events: list[dict] | None = None, **options) -> list[Clunk]:
    """The epoch boundaries where the loss fell by more than within-epoch variation explains."""
    return [c for c in boundary_tests(table, epoch_events, **options) if c.detected]


# ---- validation loss vs training loss of unseen and repeated documents --------------------------------

def _train_loss(log: _Log, source: str, lo: int, hi: int, repeated: bool) -> float | None:
    """Token-weighted training loss of the source's first-view (or repeated) segments in steps (lo, hi]."""
    m = log.of(source) & (log.step > lo) & (log.step <= hi)
    m &= (log.view >= 2) if repeated else (log.view == 1)
    tok = log.tokens[m].sum()
    return _num(float((log.loss[m] * log.tokens[m]).sum() / tok)) if tok > 0 else None


def validation_gap(table: pa.Table, eval_records: list[dict], *, loss_tol: float = 0.01,
                   acc_tol: float = 0.005) -> dict[str, dict]:
    """{source: {points, best_step, last_step, valid_loss_rise, token_acc_change, overconfident, reading}}.

    points: per eval, the validation loss and token accuracy, the training loss of first-view documents
    and of repeated documents in the steps since the previous eval, gap = valid - first-view loss and
    memorization_gap = valid - repeated loss. The rise is the last validation loss minus the best one;
    overconfident = it rose by more than loss_tol while token accuracy fell by less than acc_tol.
    """
    log = _log(table)
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
                points.append({"step": step, "valid_loss": _num(loss), "valid_token_acc": _num(acc),
                               "train_first_view_loss": first, "train_repeat_loss": again,
                               "gap": _num(loss - first) if first is not None else None,
                               "memorization_gap": _num(loss - again) if again is not None else None})
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
              "summary": _summary(lbv, drops, tests, lr, gaps)}
    path = run_dir / "diagnostics.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)
    return result


def format_diagnostics(d: dict) -> str:
    """The diagnostics as plain text for a terminal: the summary, loss by view, and the boundary tests."""
    lines = ["Memorization diagnostics"] + [f"  - {s}" for s in d["summary"]]
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
