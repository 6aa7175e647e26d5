"""The regression on the mixture weights, the recommendation, the Pareto front."""

import numpy as np

from keepmix.sweep.fit import fit_metric, pareto_front, recommend


def test_the_fit_recovers_a_planted_linear_relation_and_reports_held_out_error():
    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(3), size=12)
    coef = np.array([0.2, -0.1, 0.6])
    fit = fit_metric(X, X @ coef, "linear")
    assert np.allclose(fit.coef, coef, atol=1e-9) and fit.heldout_rmse < 1e-9
    noisy = fit_metric(X, X @ coef + rng.normal(0, 0.01, 12), "linear")
    assert np.allclose(noisy.coef, coef, atol=0.05) and 0 < noisy.train_rmse < noisy.heldout_rmse


def test_auto_keeps_the_log_linear_form_when_it_predicts_held_out_arms_better():
    X = np.random.default_rng(1).dirichlet(np.ones(3), size=10)
    y = np.exp(X @ np.array([-1.0, 0.5, 1.5]))
    fit = fit_metric(X, y, "auto")
    assert fit.kind == "loglinear" and np.allclose(fit.coef, [-1.0, 0.5, 1.5])
    assert fit_metric(X, y - 5, "auto").kind == "linear"  # not positive: no log


def test_too_few_arms_have_no_held_out_error():
    X = np.eye(3)
    assert fit_metric(X, [1, 2, 3], "linear").heldout_rmse is None


def test_recommend_takes_the_largest_gain_within_tolerance_inside_the_measured_range():
    X = np.random.default_rng(2).dirichlet(np.ones(2), size=8)
    gain = fit_metric(X, X @ np.array([0.0, 1.0]), "linear")  # gain grows with the task share
    keep = fit_metric(X, X @ np.array([0.5, 0.3]), "linear")  # the kept metric falls with it
    rec = recommend(X, gain, {"keep": (keep, 0.5, 1.0)}, tolerance=0.1)
    # 0.5 - (0.5 (1-t) + 0.3 t) <= 0.1  <=>  t <= 0.5
    assert rec["feasible"] and abs(rec["weights"][1] - 0.5) < 0.01 and rec["predicted_worst_loss"] <= 0.1
    strict = recommend(X, gain, {"keep": (keep, 0.6, 1.0)}, tolerance=0.0)
    assert not strict["feasible"]


def test_pareto_front_keeps_the_points_no_other_beats():
    points = [(0.0, 0.1), (0.1, 0.3), (0.05, 0.05), (0.2, 0.3), (0.3, 0.5)]
    assert pareto_front(points) == [0, 1, 4]

