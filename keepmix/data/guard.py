"""The retention guard: a closed loop on top of the schedule that raises a protected source's share when
its retention signal slips, and decays the extra back once it has recovered.

Contract:
- The schedule stays the user's plan; the guard is a bounded correction to it. `shares(planned)` turns
  the planned shares of a step (floors applied) into the guarded ones the sampler draws from.
- `observe(step, signal)` takes each protected source's metric on a fixed probe (the first `probe_docs`
  held-out documents), every `every` steps; the first call (step 0) is the baseline. How far behind a
  source is comes in the eval's own units (`keepmix.eval.retention.worsening`): points of token
  accuracy, or a fraction of the baseline loss. At each check, per protected source:
    behind by more than `tolerance`     boost += gain x min(behind / tolerance, 4)   (raise)
    within half its tolerance           boost *= decay                              (recovered: decay)
    in between                          boost unchanged                             (hold)
  and the boost never exceeds `max_share` (no wind-up).
- Bounds, at every step: a protected source gets max(planned, min(planned + boost, max_share)), so the
  guard never lowers it and never raises it past `max_share`; the share it adds is taken from the
  unprotected (task) sources in proportion to what each can give, and each keeps at least
  max(its floor, task_keep x its planned share) — the guard cannot starve the task. When the boosts ask
  for more than the task can give, they are scaled down together. Protected sources that are not
  boosted keep their planned share. So floors always hold, and with no boost the plan is unchanged.
- Decisions use only the signal values, which every process gets from the same reduction: every
  process takes the same decision. `state_dict()` is JSON (floats round-trip exactly): resume is exact.
"""

from __future__ import annotations

import numpy as np

from keepmix.eval.retention import worsening

MAX_STEP_FACTOR = 4.0  # one check raises a source by at most 4 x gain, however far behind it is
RECOVERED = 0.5  # behind by at most this fraction of the tolerance = recovered: the boost decays
_TINY = 1e-6  # a boost smaller than this share is dropped


class RetentionGuard:
    """Guarded shares from planned ones; see the module doc for the rules."""

    def __init__(self, names: list[str], protected: list[str], floors, *, metric: str = "token_acc",
                 tolerance: float = 0.02, every: int = 10, max_share: float = 0.5, gain: float = 0.05,
                 decay: float = 0.5, task_keep: float = 0.5):
        self.names = list(names)
        self.protected = [self.names.index(p) for p in protected]
        self.floors = np.asarray(floors, dtype=np.float64)
        self.metric, self.tolerance, self.every = metric, tolerance, every
        self.max_share, self.gain, self.decay, self.task_keep = max_share, gain, decay, task_keep
        n = len(self.names)
        self.donors = np.array([i not in self.protected for i in range(n)])
        self.boost = np.zeros(n, dtype=np.float64)
        self.baseline: dict[str, float] = {}
        self.signal: dict[str, dict] = {}  # the last check: {source: {step, baseline, now, behind}}
        self.last_planned: np.ndarray | None = None  # the planned shares of the last `shares` call

    @property
    def protected_names(self) -> list[str]:
        return [self.names[i] for i in self.protected]

    def due(self, step: int) -> bool:
        """A check after the update of `step` (the baseline, before step 1, is the loop's own call)."""
        return step > 0 and step % self.every == 0

    def behind(self, name: str, now: float) -> float:
        """How much worse than its baseline, in the tolerance's unit (points, or a fraction of the loss)."""
        return worsening({"baseline": self.baseline[name], "now": now, "higher_is_better": self.metric != "loss"})

    def observe(self, step: int, signal: dict[str, float]) -> None:
        """One check: `signal` holds each protected source's probe metric. The first check is the baseline."""
        if not self.baseline:
            self.baseline = {name: float(signal[name]) for name in self.protected_names}
        for i, name in zip(self.protected, self.protected_names):
            now = float(signal[name])
            behind = self.behind(name, now)
            if behind > self.tolerance:
                ratio = behind / self.tolerance if self.tolerance > 0 else MAX_STEP_FACTOR
                self.boost[i] += self.gain * min(ratio, MAX_STEP_FACTOR)
            elif behind <= RECOVERED * self.tolerance:
                self.boost[i] *= self.decay
                if self.boost[i] < _TINY:
                    self.boost[i] = 0.0
            self.boost[i] = min(self.boost[i], self.max_share)
            self.signal[name] = {"step": step, "baseline": self.baseline[name], "now": now, "behind": behind}

    def shares(self, planned: np.ndarray) -> np.ndarray:
        """The guarded shares of a step whose planned shares (floors applied) are `planned`."""
        planned = np.asarray(planned, dtype=np.float64)
        out = planned
        if self.boost.any():
            target = planned.copy()
            for i in self.protected:
                if self.boost[i] > 0:
                    target[i] = max(planned[i], min(planned[i] + self.boost[i], self.max_share))
            raise_ = target - planned
            keep = np.maximum(self.floors, self.task_keep * planned)
            room = np.where(self.donors, np.maximum(planned - keep, 0.0), 0.0)
            asked, can = raise_.sum(), room.sum()
            if asked > 0 and can > 0:
                raise_ = raise_ * min(1.0, can / asked)
                out = planned + raise_ - room * (raise_.sum() / can)
                out = out / out.sum()
        self.last_planned = planned
        return out

    def record(self) -> dict:
        """What a `train` record carries: the last check's signal per source and the current boosts."""
        return {"metric": self.metric, "tolerance": self.tolerance,
                "signal": {name: dict(entry) for name, entry in self.signal.items()},
                "boost": {self.names[i]: float(self.boost[i]) for i in self.protected}}

    def state_dict(self) -> dict:
        return {"boost": self.boost.tolist(), "baseline": self.baseline, "signal": self.signal}

    def load_state_dict(self, state: dict) -> None:
        self.boost = np.asarray(state["boost"], dtype=np.float64)
        self.baseline = {k: float(v) for k, v in state["baseline"].items()}
        self.signal = {k: dict(v) for k, v in state["signal"].items()}


def _pct(share: float) -> str:
    return f"{100 * share:.3g} %"


def _fell_text(source: str, metric: str, signal: dict) -> str:
    if metric == "loss":
        return f"{source} held-out loss rose {100 * signal['behind']:.1f} % above its baseline"
    return f"{source} token accuracy fell {100 * signal['behind']:.1f} points below its baseline"


def interventions(records: list[dict]) -> list[dict]:
    """The guard's interventions in a run's `train` records: for each source and each span of steps where
    the guarded share exceeded the planned one, {source, check_step, start, end (None: until the end),
    planned, peak, signal, metric, text}."""
    train = [r for r in records if r.get("kind") == "train" and "guarded" in r]
    out: list[dict] = []
    open_: dict[str, dict] = {}
    for before, r in zip([None] + train, train):
        for source, share in r["guarded"].items():
            planned = r["planned"].get(source, 0.0)
            raised = share > planned + 1e-9 and source in (r.get("guard") or {}).get("boost", {})
            span = open_.get(source)
            if raised and span is None:
                # the check that raised it is the one before this step: the previous record's signal
                signal = dict(((before or r).get("guard") or {}).get("signal", {}).get(source) or {})
                span = open_[source] = {"source": source, "check_step": signal.get("step", r["step"] - 1),
                                        "start": r["step"], "end": None, "planned": planned, "peak": share,
                                        "signal": signal, "metric": r["guard"].get("metric", "token_acc")}
                out.append(span)
            elif raised:
                span["peak"] = max(span["peak"], share)
            elif span is not None:
                span["end"] = r["step"]
                del open_[source]
    last = train[-1]["step"] if train else None
    for span in out:
        until = f"until step {span['end']}" if span["end"] is not None else f"to the end of the run (step {last})"
        fell = _fell_text(span["source"], span["metric"], span["signal"]) if "behind" in span["signal"] else \
            f"{span['source']} fell behind its baseline"
        span["text"] = (f"{fell} at step {span['check_step']}: the guard raised {span['source']} from "
                        f"{_pct(span['planned'])} to {_pct(span['peak'])} {until}.")
    return out


def guard_summary(records: list[dict]) -> list[str]:
    """Sentences on what the guard did (empty when the run had no guard)."""
    train = [r for r in records if r.get("kind") == "train" and "guarded" in r]
    if not train:
        return []
    spans = interventions(records)
    if not spans:
        checked = sorted({v.get("step") for r in train for v in (r.get("guard") or {}).get("signal", {}).values()})
        sources = ", ".join((train[-1].get("guard") or {}).get("boost", {}))
        return [f"Retention guard: {sources} stayed within tolerance of the baseline at every check "
                f"({len(checked)} checks); the guard never changed the plan."]
    return [f"Retention guard: {span['text']}" for span in spans]
