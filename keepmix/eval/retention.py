"""Retention: every metric now against the baseline (the model before its first step), flagged past a tolerance.

Contract:
  - Direction: a metric's own declaration where there is one — `directions` maps a metric path prefix
    to {metric name: higher_is_better} (lm-evaluation-harness tasks declare theirs; the longest matching
    prefix wins and the metric name is the key's last path part) — else the metric name: a name whose
    last path part is `loss` or `ppl` is lower-is-better; every other metric is higher-is-better.
    Counts (last part `n`) and standard errors (last part ending in `_stderr`) are skipped, and so are
    metrics missing from either side, and `kl_to_base` (drift from the base: 0 at the baseline by
    definition, so no tolerance relative to it means anything; `drift_line` shows it beside the table).
  - Tolerance is absolute for higher-is-better metrics (0.02 = 2 points of accuracy) and relative for
    loss/ppl (0.02 = 2 % worse than the baseline).
  - `flagged` = the metric got worse by more than its tolerance. A metric that became non-finite
    (NaN/inf) while its baseline was finite is flagged.
  - `per_metric_tolerance` overrides the tolerance for a metric key, or for every metric under a path
    prefix ("task/sql" covers "task/sql/acc"); the longest matching key wins.
Each entry is {baseline, now, delta (now - baseline), higher_is_better, tolerance, flagged}, the
`retention` field of an eval record in metrics.jsonl.
"""

from __future__ import annotations

import math

from rich.table import Table

LOWER_IS_BETTER = {"loss", "ppl"}
SKIPPED = {"n", "kl_to_base"}
_EPS = 1e-9


def _last_part(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def is_score(key: str) -> bool:
    """Whether a metric is a score with a tolerance (not a count `n`, a standard error `..._stderr` or the
    drift `kl_to_base`)."""
    last = _last_part(key)
    return last not in SKIPPED and not last.endswith("_stderr")


def _longest_prefix(key: str, by_prefix: dict, default):
    best, best_len = default, -1
    for prefix, value in by_prefix.items():
        matches = key == prefix or key.startswith(prefix.rstrip("/") + "/")
        if matches and len(prefix) > best_len:
            best, best_len = value, len(prefix)
    return best


def higher_is_better(key: str, directions: dict[str, dict[str, bool]] | None = None) -> bool:
    """The direction `directions` declares for the metric, else False for a last path part `loss` or
    `ppl` and True otherwise."""
    declared = _longest_prefix(key, directions or {}, {}).get(_last_part(key))
    if declared is not None:
        return bool(declared)
    return _last_part(key) not in LOWER_IS_BETTER


def worsening(entry: dict) -> float:
    """How much worse the metric got, in the unit its tolerance uses (points, or a fraction of baseline)."""
    baseline, now = entry["baseline"], entry["now"]
    if not math.isfinite(now):
        return math.inf if math.isfinite(baseline) else 0.0
    if entry["higher_is_better"]:
        return baseline - now
    return (now - baseline) / abs(baseline) if baseline else (math.inf if now > baseline else 0.0)


def compute_retention(
    baseline: dict[str, float],
    now: dict[str, float],
    tolerance: float,
    per_metric_tolerance: dict[str, float] | None = None,
    directions: dict[str, dict[str, bool]] | None = None,
) -> dict[str, dict]:
    """Per-metric {baseline, now, delta, higher_is_better, tolerance, flagged}; see the module doc."""
    overrides = per_metric_tolerance or {}
    out = {}
    for key in sorted(baseline):
        if key not in now or not is_score(key):
            continue
        b, n = float(baseline[key]), float(now[key])
        entry = {
            "baseline": b,
            "now": n,
            "delta": n - b,
            "higher_is_better": higher_is_better(key, directions),
            "tolerance": _longest_prefix(key, overrides, tolerance),
        }
        # The epsilon keeps 0.50 -> 0.48 at tolerance 0.02 within it despite binary floating point.
        entry["flagged"] = bool(worsening(entry) > entry["tolerance"] + _EPS)
        out[key] = entry
    return out


def _tolerance_text(entry: dict) -> str:
    tol = entry["tolerance"]
    return f"{tol:g}" if entry["higher_is_better"] else f"{tol * 100:g} %"


def format_retention_table(retention: dict[str, dict]) -> Table:
    """A rich table: metric, baseline, now, delta, tolerance and whether it is flagged."""
    table = Table(title="Retention vs baseline")
    table.add_column("metric")
    for name in ("baseline", "now", "delta"):
        table.add_column(name, justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("status")
    for key, e in retention.items():
        better = "↑" if e["higher_is_better"] else "↓"
        status = "[bold red]FLAGGED[/]" if e["flagged"] else "[green]ok[/]"
        numbers = (f"{e['baseline']:.3f}", f"{e['now']:.3f}", f"{e['delta']:+.3f}")
        table.add_row(f"{key} {better}", *numbers, _tolerance_text(e), status)
    return table


def _gain_text(key: str, e: dict) -> str:
    return f"{key.removeprefix('task/')} {e['baseline']:.2f} → {e['now']:.2f} ({e['delta']:+.2f})"


def summary_line(retention: dict[str, dict], task_metrics: list[str]) -> str:
    """One line: the task gain(s), then the retention metric that got worst, relative to its tolerance.

    `task_metrics` are the retention keys of the metrics being trained for (e.g. ["task/sql/acc"]);
    the worst retention is taken over all other metrics.
    """
    gains = [_gain_text(k, retention[k]) for k in task_metrics if k in retention]
    parts = ["task: " + (", ".join(gains) if gains else "none")]
    others = {k: e for k, e in retention.items() if k not in task_metrics}
    if not others:
        return " · ".join(parts + ["worst retention: none"])

    def badness(item):
        _, e = item
        w = worsening(e)
        if math.isnan(w):  # a NaN baseline says nothing about forgetting; rank it last
            return -math.inf
        return w / e["tolerance"] if e["tolerance"] > 0 else w

    key, e = max(others.items(), key=badness)
    verdict = "past" if e["flagged"] else "within"
    if not math.isfinite(e["now"]):
        change = f"became {e['now']}, {verdict} {_tolerance_text(e)}"
    elif e["higher_is_better"]:
        change = f"{e['delta']:+.3f}, {verdict} {_tolerance_text(e)}"
    else:
        rel = e["delta"] / abs(e["baseline"]) * 100 if e["baseline"] else math.inf
        change = f"{e['delta']:+.3f} = {rel:+.1f} %, {verdict} {_tolerance_text(e)}"
    parts.append(f"worst retention: {key} {e['baseline']:.3f} → {e['now']:.3f} ({change})")
    return " · ".join(parts)


def drift_line(metrics: dict[str, float]) -> str | None:
    """'KL to base (nats/token): general 0.012 · code 0.034' from an eval's metrics; None without them."""
    parts = [f"{key.split('/')[1]} {value:.4f}" for key, value in sorted(metrics.items())
             if key.startswith("valid/") and key.endswith("/kl_to_base")]
    return "KL to base (nats/token): " + " · ".join(parts) if parts else None
