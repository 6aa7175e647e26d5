"""The fitted model of each metric as a function of the mixture weights, and the mixture it recommends.

Contract: `fit_metric(X, y, kind)` fits y ≈ X·c (linear: a Scheffé mixture model, one coefficient per
source, no intercept because the weights sum to 1) or log y ≈ X·c (log-linear, for positive y), by least
squares with numpy (`lstsq`; no scikit-learn needed at this size), and reports the leave-one-arm-out RMSE
(None with fewer arms than sources + 1: too few to hold one out honestly). kind='auto' keeps the form with
the lower held-out error. `recommend` searches mixtures inside the convex hull of the arms'
mixtures (no extrapolation past what was measured) for the largest predicted task gain with every kept metric
predicted within tolerance; `pareto_front` gives the arms no other arm beats on both axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Fit:
    kind: str  # linear | loglinear
    coef: list[float]  # one per source
    heldout_rmse: float | None  # leave-one-arm-out
    train_rmse: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        z = np.asarray(X, dtype=float) @ np.asarray(self.coef)
        return np.exp(z) if self.kind == "loglinear" else z


def _solve(X: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    target = np.log(y) if kind == "loglinear" else y
    coef, *_ = np.linalg.lstsq(X, target, rcond=None)
    return coef


def _one(X: np.ndarray, y: np.ndarray, kind: str) -> Fit:
    coef = _solve(X, y, kind)
    fit = Fit(kind, coef.tolist(), None, 0.0)
    fit.train_rmse = float(np.sqrt(np.mean((fit.predict(X) - y) ** 2)))
    n, k = X.shape
    if n > k:
        errors = []
        for i in range(n):
            keep = np.arange(n) != i
            held = Fit(kind, _solve(X[keep], y[keep], kind).tolist(), None, 0.0)
            errors.append(float(held.predict(X[i : i + 1])[0] - y[i]))
        fit.heldout_rmse = float(np.sqrt(np.mean(np.square(errors))))
    return fit


def fit_metric(X, y, kind: str = "auto") -> Fit:
    """Fit one metric (see the module doc). X: (arms, sources) shares; y: (arms,) values."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    kinds = ["linear", "loglinear"] if kind == "auto" else [kind]
    if "loglinear" in kinds and not np.all(y > 0):
        kinds = [k for k in kinds if k != "loglinear"] or ["linear"]
    fits = [_one(X, y, k) for k in kinds]
    return min(fits, key=lambda f: (math.inf if f.heldout_rmse is None else f.heldout_rmse, f.train_rmse))


def candidates(X: np.ndarray, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Mixtures inside the convex hull of the arms' measured mixtures (random convex combinations of them,
    sparse and dense), plus the arms themselves: the fit is never asked about a mixture no arm bracketed."""
    X = np.asarray(X, dtype=float)
    rng = np.random.default_rng(seed)
    mix = np.vstack([rng.dirichlet(np.full(len(X), a), size=n // 2) for a in (0.2, 1.0)])
    return np.vstack([X, mix @ X])


def recommend(X, fits_gain: Fit, fits_keep: dict[str, tuple[Fit, float, float]], tolerance: float) -> dict:
    """The candidate mixture with the largest predicted gain whose every kept metric is predicted within
    tolerance. fits_keep: {metric: (fit of its value, baseline, sign)} — sign +1 for higher-is-better."""
    C = candidates(X)
    gain = fits_gain.predict(C)
    worst = np.full(len(C), -np.inf) if fits_keep else np.zeros(len(C))
    for fit, baseline, sign in fits_keep.values():
        worst = np.maximum(worst, sign * (baseline - fit.predict(C)))
    ok = worst <= tolerance + 1e-12
    if not ok.any():
        best = int(np.argmin(worst))
        return {"feasible": False, "weights": C[best].tolist(), "predicted_gain": float(gain[best]),
                "predicted_worst_loss": float(worst[best])}
    best = int(np.flatnonzero(ok)[np.argmax(gain[ok])])
    return {"feasible": True, "weights": C[best].tolist(), "predicted_gain": float(gain[best]),
            "predicted_worst_loss": float(worst[best]), "searched": int(len(C))}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (loss, gain) that no other point beats: lower-or-equal loss and higher-or-equal
    gain with one strictly better. Sorted by loss."""
    front = []
    for i, (loss, gain) in enumerate(points):
        beaten = any((l2 <= loss and g2 >= gain) and (l2 < loss or g2 > gain)
                     for j, (l2, g2) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])
