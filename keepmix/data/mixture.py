"""The mixture: which source fills each packed row at each step.

Contract:
- `Schedule.weights(t)` is each source's planned share of training rows (= tokens, rows are full) at
  progress t ∈ [0, 1], interpolated between schedule points (linear, cosine or step) and lifted to each
  source's floor by water-filling: a source under its floor gets exactly the floor, the others share the
  rest in their planned proportions. So no source ever falls below its floor (never drop a kind of data).
- `MixtureSampler.plan(step)` returns the global batch of `batch_rows` row plans for that step. Sources
  are allocated row by row to the one furthest behind its cumulative planned share (smooth weighted
  round robin), so the realized share tracks the planned one within one row at every step; each
  source's rows come from its `DocStream`. State: per source two numbers of the allocation plus the
  stream's three integers — resume is O(1) and exact.
- With a `RetentionGuard` (keepmix/data/guard.py) the sampler draws from the guarded shares
  (`guard.shares(planned)`) instead of the planned ones, and the guard's state is part of the sampler's;
  without one, nothing changes.
- Every process computes the same global plan and builds only its own rows (`rows_for_rank`), so the
  global data order is the same for any number of processes and no row is seen twice.
"""

from __future__ import annotations

import math

import numpy as np

from keepmix.data.packing import DocStream, RowPlan


def apply_floors(weights: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Normalise weights, then raise every share below its floor to the floor (water-filling)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    fixed = np.zeros(len(w), dtype=bool)
    while True:
        free = ~fixed
        budget = 1.0 - floors[fixed].sum()
        mass = w[free].sum()
        share = np.where(fixed, floors, (w * budget / mass) if mass > 0 else budget / max(free.sum(), 1))
        low = free & (share < floors - 1e-12)
        if not low.any():
            return share
        fixed |= low


def _interpolate(a: float, b: float, u: float, how: str) -> float:
    if how == "step":
        return a
    if how == "cosine":
        u = (1 - math.cos(math.pi * u)) / 2
    return a + (b - a) * u


class Schedule:
    """Planned source shares as a function of training progress."""

    def __init__(self, names: list[str], points: list[tuple[float, dict[str, float]]], floors: list[float],
                 interpolation: str = "linear"):
        self.names = names
        self.points = [(at, np.array([w.get(n, 0.0) for n in names], dtype=np.float64)) for at, w in points]
        self.floors = np.asarray(floors, dtype=np.float64)
        self.interpolation = interpolation

    def raw(self, t: float) -> np.ndarray:
        pts = self.points
        if t <= pts[0][0]:
            w = pts[0][1]
        elif t >= pts[-1][0]:
            w = pts[-1][1]
        else:
            i = max(j for j, (at, _) in enumerate(pts) if at <= t)
            (a_t, a_w), (b_t, b_w) = pts[i], pts[i + 1]
            u = (t - a_t) / (b_t - a_t)
            w = np.array([_interpolate(x, y, u, self.interpolation) for x, y in zip(a_w, b_w)])
        return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))

    def weights(self, t: float) -> np.ndarray:
        return apply_floors(self.raw(t), self.floors)


class QualitySchedule:
    """A piecewise-linear quality threshold over training progress."""

    def __init__(self, points: list[tuple[float, float]]):
        self.points = points

    def threshold(self, t: float) -> float:
        ats, mins = zip(*self.points)
        return float(np.interp(t, ats, mins))


class MixtureSampler:
    def __init__(self, schedule: Schedule, streams: list[DocStream], *, batch_rows: int, total_steps: int,
                 seq_len: int, split_docs: bool = True, quality: QualitySchedule | None = None,
                 guard=None):
        self.schedule, self.streams, self.quality, self.guard = schedule, streams, quality, guard
        self.batch_rows, self.total_steps, self.seq_len, self.split_docs = batch_rows, total_steps, seq_len, split_docs
        n = len(streams)
        self.assigned = np.zeros(n, dtype=np.int64)  # rows given to each source so far
        self.planned = np.zeros(n, dtype=np.float64)  # cumulative planned rows of each source
        self.step = 0  # the next step to plan (0-based)

    def progress(self, step: int) -> float:
        return step / max(self.total_steps - 1, 1)

    def plan(self) -> tuple[list[RowPlan], np.ndarray, list[tuple[int, int]]]:
        """The next global batch: row plans, the weights drawn from (planned, or guarded with a guard),
        and (source, pass) for passes begun."""
        t = self.progress(self.step)
        w = self.schedule.weights(t)
        if self.guard is not None:
            w = self.guard.shares(w)
        min_q = self.quality.threshold(t) if self.quality else None
        plans, passes = [], []
        for _ in range(self.batch_rows):
            self.planned += w
            src = int(np.argmax(self.planned - self.assigned))
            self.assigned[src] += 1
            segments, new = self.streams[src].take_row(self.seq_len, split_docs=self.split_docs, min_quality=min_q)
            plans.append(RowPlan(src, segments))
            passes += [(src, p) for p in new]
        self.step += 1
        return plans, w, passes

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "assigned": self.assigned.tolist(),
            "planned": self.planned.tolist(),  # JSON floats round-trip exactly
            "streams": [s.state_dict() for s in self.streams],
        }
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.assigned = np.asarray(state["assigned"], dtype=np.int64)
        self.planned = np.asarray(state["planned"], dtype=np.float64)
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)
        if self.guard is not None:
            self.guard.load_state_dict(state["guard"])


def rows_for_rank(plans: list, rank: int, world_size: int) -> list:
    """This process's rows of a global batch: a strided slice, disjoint across ranks."""
    return plans[rank::world_size]
