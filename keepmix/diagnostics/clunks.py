"""Clunk detection: is there a step in a source's training loss at its epoch boundaries?

At each boundary a step plus a local linear trend is fitted over 2W steps on each side (only steps that
hold the source count), and the step's size is compared with the same statistic at non-boundary
positions inside epochs (the null) and with the step-to-step noise; a drop beyond `z_threshold` of that
spread is a clunk — the model memorized documents after one view. W is 1/8 of the source's shortest
epoch, between 2 and 16; a boundary without room around it is reported as not tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from keepmix.diagnostics.log import LogColumns, columns_of, sources_present

ORDINALS = {2: "a second time", 3: "a third time", 4: "a fourth time", 5: "a fifth time", 6: "a sixth time"}

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


def _step_series(log: LogColumns, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps that hold the source, and the token-weighted mean loss of its segments at each."""
    m = log.of(source)
    steps, inv = np.unique(log.step[m], return_inverse=True)
    tok = np.bincount(inv, weights=log.tokens[m])
    return steps, np.bincount(inv, weights=log.loss[m] * log.tokens[m]) / tok


def _boundaries(log: LogColumns, epoch_events: list[dict] | None) -> dict[str, list[tuple[int, int]]]:
    """{source: [(epoch, step)]} from the epoch events, or from the first step of each view >= 2."""
    found: dict[str, dict[int, int]] = {}
    if epoch_events is None:
        for source in sources_present(log):
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
    log = columns_of(table)
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
    seen = ORDINALS.get(epoch, f"for the {epoch}th time")
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
