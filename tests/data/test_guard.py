"""The retention guard without a model: a synthetic signal where one source degrades and recovers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from keepmix.data.guard import RetentionGuard, guard_summary, interventions
from keepmix.data.mixture import MixtureSampler, Schedule
from keepmix.data.packing import DocStream

NAMES = ["prose", "code", "sql"]
FLOORS = [0.125, 0.125, 0.0]
PLAN = np.array([0.125, 0.125, 0.75])


def guard(**kw) -> RetentionGuard:
    args = dict(metric="token_acc", tolerance=0.02, every=4, max_share=0.3, gain=0.05, decay=0.5, task_keep=0.5)
    return RetentionGuard(NAMES, ["prose", "code"], FLOORS, **{**args, **kw})


def check_bounds(g: RetentionGuard, shares: np.ndarray, planned: np.ndarray) -> None:
    assert shares.sum() == pytest.approx(1.0)
    assert (shares >= np.asarray(FLOORS) - 1e-12).all()  # floors hold
    for i in g.protected:
        assert shares[i] >= planned[i] - 1e-12  # the guard never lowers a protected source
        assert shares[i] <= max(planned[i], g.max_share) + 1e-12
    sql = NAMES.index("sql")
    assert shares[sql] >= g.task_keep * planned[sql] - 1e-12  # the task is never starved


def test_a_degrading_source_is_raised_held_within_bounds_and_decays_back():
    g = guard()
    g.observe(0, {"prose": 0.40, "code": 0.58})  # the baseline
    assert g.baseline == {"prose": 0.40, "code": 0.58}
    assert np.array_equal(g.shares(PLAN), PLAN)  # nothing behind: the plan, untouched
    # code slips 1, 3, 6, 9 points, then recovers; prose holds
    code = [0.57, 0.55, 0.52, 0.49, 0.52, 0.565, 0.575, 0.58, 0.58, 0.58]
    history = []
    for k, value in enumerate(code, start=1):
        g.observe(4 * k, {"prose": 0.40, "code": value})
        shares = g.shares(PLAN)
        check_bounds(g, shares, PLAN)
        history.append(shares.copy())
    code_share = [h[1] for h in history]
    assert code_share[0] == pytest.approx(0.125)  # 1 point behind: within tolerance, no change
    assert code_share[1] == pytest.approx(0.125 + 0.05 * 1.5)  # 3 points = 1.5 tolerances: + 1.5 gain
    assert code_share[2] > code_share[1] and code_share[3] == pytest.approx(0.3)  # capped at max_share
    assert code_share[4] == pytest.approx(0.3)  # 6 points: still behind, still raised
    assert code_share[5] == pytest.approx(code_share[4])  # 1.5 points: within tolerance but not recovered: hold
    assert 0.125 < code_share[6] < code_share[5]  # 0.5 points: recovered, the extra decays
    assert code_share[-1] < code_share[6] and code_share[-1] - 0.125 < 0.02  # and keeps decaying back
    assert all(h[0] == pytest.approx(0.125) for h in history)  # prose never moved
    assert g.signal["code"]["behind"] == pytest.approx(0.0)


def test_boosts_beyond_what_the_task_can_give_are_scaled_down_together():
    g = guard(max_share=1.0, gain=0.5)
    g.observe(0, {"prose": 0.5, "code": 0.5})
    g.observe(4, {"prose": 0.3, "code": 0.3})  # both far behind: each asks for 4 x 0.5 of share
    shares = g.shares(PLAN)
    check_bounds(g, shares, PLAN)
    assert shares[2] == pytest.approx(0.375)  # sql keeps task_keep x 0.75
    assert shares[0] == pytest.approx(shares[1])  # the two raised in proportion to what they asked


def test_loss_metric_uses_a_fraction_of_the_baseline():
    g = guard(metric="loss", tolerance=0.05)
    g.observe(0, {"prose": 2.0, "code": 1.0})
    g.observe(4, {"prose": 2.08, "code": 1.2})  # prose 4 % worse (within), code 20 % worse
    shares = g.shares(PLAN)
    assert shares[0] == pytest.approx(0.125) and shares[1] > 0.125
    assert g.signal["code"]["behind"] == pytest.approx(0.2)


def test_state_round_trips_through_json():
    g, h = guard(), guard()
    g.observe(0, {"prose": 0.4, "code": 0.6})
    g.observe(4, {"prose": 0.33, "code": 0.6})
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    for k, value in enumerate([0.34, 0.36, 0.39, 0.40], start=2):
        for x in (g, h):
            x.observe(4 * k, {"prose": value, "code": 0.6})
        assert np.array_equal(g.shares(PLAN), h.shares(PLAN))


def test_sampler_draws_from_the_guarded_shares_and_resumes_them():
    def sampler(with_guard: bool):
        schedule = Schedule(NAMES, [(0.0, {"prose": 0.1, "code": 0.1, "sql": 0.8})], FLOORS)
        streams = [DocStream(np.full(50, 100), seed=0, source_index=i) for i in range(3)]
        return MixtureSampler(schedule, streams, batch_rows=8, total_steps=40, seq_len=128,
                              guard=guard() if with_guard else None)

    plain, guarded = sampler(False), sampler(True)
    guarded.guard.observe(0, {"prose": 0.4, "code": 0.6})
    guarded.guard.observe(4, {"prose": 0.4, "code": 0.5})  # code 10 points behind
    counts = {"plain": np.zeros(3), "guarded": np.zeros(3)}
    for _ in range(20):
        for key, s in (("plain", plain), ("guarded", guarded)):
            plans, w, _ = s.plan()
            for p in plans:
                counts[key][p.source] += 1
    assert counts["plain"][1] == pytest.approx(20 * 8 * 0.125, abs=1)
    assert counts["guarded"][1] == pytest.approx(20 * 8 * 0.3, abs=1)  # code at max_share
    state = json.loads(json.dumps(guarded.state_dict()))
    again = sampler(True)
    again.load_state_dict(state)
    assert again.guard.boost.tolist() == guarded.guard.boost.tolist()
    for _ in range(5):
        a, b = guarded.plan(), again.plan()
        assert a[0] == b[0] and np.array_equal(a[1], b[1])


def _records(spans):
    """Synthetic train records: planned 12.5 % code; `spans` maps steps to the guarded share."""
    out = []
    for step in range(1, 11):
        share = spans.get(step, 0.125)
        out.append({"kind": "train", "step": step, "planned": {"code": 0.125, "sql": 0.875},
                    "guarded": {"code": share, "sql": 1 - share},
                    "guard": {"metric": "token_acc", "boost": {"code": share - 0.125},
                              "signal": {"code": {"step": 4, "baseline": 0.58, "now": 0.556, "behind": 0.024}}}})
    return out


def test_each_intervention_is_one_sentence():
    spans = interventions(_records({5: 0.2, 6: 0.21, 7: 0.15}))
    assert [s["text"] for s in spans] == [
        "code token accuracy fell 2.4 points below its baseline at step 4: the guard raised code from "
        "12.5 % to 21 % until step 8."]
    assert guard_summary(_records({9: 0.2, 10: 0.2}))[0].endswith("to the end of the run (step 10).")
    assert "never changed the plan" in guard_summary(_records({}))[0]
    assert guard_summary([{"kind": "train", "step": 1, "planned": {"code": 1.0}}]) == []


def test_the_probe_spreads_its_tokens_over_its_documents():
    from keepmix.data.tokenize import TokenDocs

    docs = TokenDocs(np.arange(10, dtype=np.int32), np.array([0, 3, 4, 10]), np.ones(10, dtype=bool))
    probe = docs.head(3, max_tokens=6)  # 2 tokens of each of the 3 documents (the second has only 1)
    assert probe.tokens.tolist() == [0, 1, 3, 4, 5] and probe.offsets.tolist() == [0, 2, 3, 5]
    whole = docs.head(2)
    assert whole.tokens.tolist() == [0, 1, 2, 3] and len(whole) == 2
