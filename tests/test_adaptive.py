"""Load-adaptive plan choice: the controller with simulated latencies and an injected clock (no
sleeps), the store.json settings it reads, and the per-worker shifter around it."""

from __future__ import annotations

import math

import pytest

from service.adaptive import (
    MAX_COOLDOWN_BACKOFF, SPARSE_MIN_SAMPLES, AdaptiveConfigError, AdaptiveSettings, LoadController, LoadShifter, Shift,
    parse_adaptive_config,
)

LADDER = ["adapters", "skip2", "skip4"]  # the active plan first, then cheaper ones


def controller(**settings) -> LoadController:
    defaults = dict(slo_p95_ms=100, window_s=10, min_samples=5, recover_ratio=0.5, cooldown_s=5)
    return LoadController("vqa", AdaptiveSettings(**{**defaults, **settings}))


def feed(ctl: LoadController, seconds: float, count: int, now: float, chosen_at: float | None = None) -> None:
    for _ in range(count):
        ctl.observe(seconds, now - seconds if chosen_at is None else chosen_at, now)


# -- the rules, one at a time ------------------------------------------------------------------------
def test_steps_down_one_rung_when_p95_is_over_the_slo():
    ctl = controller()
    feed(ctl, 0.05, 5, now=1.0)
    assert ctl.choose(LADDER, 1.0) == ("adapters", None)  # under the SLO: stays
    feed(ctl, 0.3, 5, now=2.0)
    assert ctl.choose(LADDER, 2.0) == ("skip2", Shift("vqa", "down", "adapters", "skip2"))
    assert ctl.choose(LADDER, 2.0) == ("skip2", None)  # the window was cleared: no second step at once


def test_p95_ignores_the_slowest_five_percent():
    ctl = controller(min_samples=20)
    feed(ctl, 0.05, 19, now=1.0)
    feed(ctl, 5.0, 1, now=1.0)  # 1 of 20 = 5%: p95 is the 19th value
    assert ctl.p95_ms(1.0) == pytest.approx(50)
    assert ctl.choose(LADDER, 1.0) == ("adapters", None)
    feed(ctl, 5.0, 1, now=1.0)  # 2 of 21: now over
    assert ctl.choose(LADDER, 1.0)[0] == "skip2"


def test_few_samples_step_down_only_when_every_one_is_slow():
    ctl = controller(min_samples=20)
    feed(ctl, 10.0, SPARSE_MIN_SAMPLES - 1, now=1.0)
    assert ctl.p95_ms(1.0) is None
    assert ctl.choose(LADDER, 1.0) == ("adapters", None)  # too few to judge
    feed(ctl, 0.05, 1, now=1.0)
    assert ctl.choose(LADDER, 1.0) == ("adapters", None)  # one was fast
    feed(ctl, 10.0, SPARSE_MIN_SAMPLES, now=20.0)  # the window now holds only slow ones: so slow few finish
    assert ctl.choose(LADDER, 20.0) == ("skip2", Shift("vqa", "down", "adapters", "skip2"))


def test_only_requests_whose_plan_was_chosen_after_a_step_are_judged():
    ctl = controller()
    feed(ctl, 0.3, 5, now=1.0)
    assert ctl.choose(LADDER, 1.0)[0] == "skip2"
    feed(ctl, 0.3, 10, now=1.5, chosen_at=0.9)  # queued before the step: says nothing about skip2
    assert ctl.choose(LADDER, 1.5) == ("skip2", None)
    feed(ctl, 0.3, 5, now=2.0, chosen_at=1.0)  # chosen at the step (skip2) and still slow
    assert ctl.choose(LADDER, 2.0) == ("skip4", Shift("vqa", "down", "skip2", "skip4"))
    feed(ctl, 0.3, 10, now=3.0)
    assert ctl.choose(LADDER, 3.0) == ("skip4", None)  # the cheapest rung: nowhere further down


def test_old_samples_leave_the_window():
    ctl = controller(window_s=10)
    feed(ctl, 0.3, 5, now=1.0)
    assert ctl.p95_ms(1.0) == pytest.approx(300)
    assert ctl.p95_ms(11.5) is None  # all older than window_s
    assert ctl.choose(LADDER, 11.5) == ("adapters", None)


def test_steps_back_up_only_after_a_calm_cooldown():
    ctl = controller(cooldown_s=5)
    feed(ctl, 0.3, 5, now=0.0)
    assert ctl.choose(LADDER, 0.0)[0] == "skip2"
    t = 0.0
    while t < 4.9:  # calm (20 ms < 0.5 * 100 ms) but for less than the cool-down
        t += 0.1
        feed(ctl, 0.02, 1, now=t)
        assert ctl.choose(LADDER, t) == ("skip2", None)
    t += 0.2
    feed(ctl, 0.02, 1, now=t)
    assert ctl.choose(LADDER, t) == ("adapters", Shift("vqa", "up", "skip2", "adapters"))


def test_latency_between_the_thresholds_holds_the_rung():
    """Hysteresis: under the SLO but over recover_ratio * SLO neither steps down nor up."""
    ctl = controller()
    feed(ctl, 0.3, 5, now=0.0)
    ctl.choose(LADDER, 0.0)
    for step in range(1, 200):
        t = step * 0.1
        feed(ctl, 0.07, 1, now=t)  # 70 ms: between 50 and 100
        assert ctl.choose(LADDER, t) == ("skip2", None)


def test_a_slow_request_restarts_the_cooldown():
    ctl = controller(cooldown_s=5, min_samples=3, window_s=0.4)  # each judgement sees only the last feed
    feed(ctl, 0.3, 3, now=0.0)
    ctl.choose(LADDER, 0.0)
    for t in (1, 2, 3, 4):
        feed(ctl, 0.02, 3, now=t)
        assert ctl.choose(LADDER, t)[0] == "skip2"
    feed(ctl, 0.06, 3, now=4.5)  # over recover_ratio * SLO: not calm
    assert ctl.choose(LADDER, 4.5)[0] == "skip2"
    for t in (5, 6, 7, 8, 9):  # calm again from t=5, so not before t=10
        feed(ctl, 0.02, 3, now=t)
        assert ctl.choose(LADDER, t)[0] == "skip2"
    feed(ctl, 0.02, 3, now=10)
    assert ctl.choose(LADDER, 10)[0] == "adapters"


def test_an_empty_window_changes_nothing():
    ctl = controller(cooldown_s=5)
    feed(ctl, 0.3, 5, now=0.0)
    ctl.choose(LADDER, 0.0)
    assert ctl.choose(LADDER, 100.0) == ("skip2", None)  # no request finished since: no evidence of calm
    feed(ctl, 0.01, 1, now=101)  # light traffic: every sample calm, fewer than min_samples
    ctl.choose(LADDER, 101)
    feed(ctl, 0.01, 1, now=106)
    assert ctl.choose(LADDER, 106)[0] == "adapters"


def test_a_step_up_that_fails_fast_backs_off():
    ctl = controller(cooldown_s=5)
    feed(ctl, 0.3, 5, now=0.0)
    ctl.choose(LADDER, 0.0)  # down to skip2
    feed(ctl, 0.01, 1, now=1)
    ctl.choose(LADDER, 1)
    feed(ctl, 0.01, 1, now=6)
    assert ctl.choose(LADDER, 6)[0] == "adapters"  # up after 5 s calm
    feed(ctl, 0.3, 5, now=7)
    assert ctl.choose(LADDER, 7)[0] == "skip2"  # down again within cooldown_s: the probe failed
    assert ctl.backoff == 2
    feed(ctl, 0.01, 1, now=8)
    ctl.choose(LADDER, 8)
    feed(ctl, 0.01, 1, now=15)
    assert ctl.choose(LADDER, 15)[0] == "skip2"  # 7 s calm < 2 * 5 s
    feed(ctl, 0.01, 1, now=18)
    assert ctl.choose(LADDER, 18)[0] == "adapters"  # 10 s
    feed(ctl, 0.01, 1, now=23.5)
    ctl.choose(LADDER, 23.5)  # held for cooldown_s: forgiven
    assert ctl.backoff == 1
    for _ in range(10):
        ctl._last_up = 0.0
        ctl._step(LADDER, +1 if ctl.level == 0 else -1, 0.0)
    assert ctl.backoff == MAX_COOLDOWN_BACKOFF  # bounded


def test_the_ladder_may_shrink_under_it():
    ctl = controller()
    for t in (1, 2):
        feed(ctl, 0.3, 5, now=t, chosen_at=t)
        ctl.choose(LADDER, t)
    assert ctl.level == 2
    assert ctl.choose(["adapters", "skip2"], 3) == ("skip2", None)  # skip4 unloaded: the cheapest left
    with pytest.raises(ValueError):
        ctl.choose([], 3)


# -- a whole episode: a single-server FIFO queue driven at a varying arrival rate -------------------
def simulate(rate_at, service_s: dict[str, float], duration: float, ctl: LoadController | None):
    """Arrivals evenly spaced at rate_at(t); each request runs on the plan chosen at its arrival;
    the controller sees each latency when the request finishes. Returns (arrived, plan, latency)."""
    from collections import deque

    t, free_at, running, served, shifts = 0.0, 0.0, deque(), [], []
    while t < duration:
        while running and running[0][0] <= t:
            finished, latency, arrived = running.popleft()
            if ctl is not None:
                ctl.observe(latency, arrived, finished)  # chosen on arrival
        plan = "adapters"
        if ctl is not None:
            plan, shift = ctl.choose(LADDER, t)
            shifts += [shift] if shift else []
        free_at = max(free_at, t) + service_s[plan]
        running.append((free_at, free_at - t, t))
        served.append((t, plan, free_at - t))
        t += 1.0 / rate_at(t)
    return served, shifts


def p95(values) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def test_episode_overload_is_absorbed_and_load_falling_returns_to_the_active_plan():
    service_s = {"adapters": 0.010, "skip2": 0.0075, "skip4": 0.0055}  # capacities 100, 133, 182 req/s
    rate = lambda t: 150.0 if 20 <= t < 60 else 50.0  # noqa: E731 - 1.5x the active plan's capacity
    settings = dict(slo_p95_ms=100, window_s=5, min_samples=20, recover_ratio=0.5, cooldown_s=5)
    served, shifts = simulate(rate, service_s, 100, controller(**settings))
    fixed, _ = simulate(rate, service_s, 100, None)

    overload = lambda rows: [lat for t, _, lat in rows if 30 <= t < 60]  # noqa: E731 - after settling
    assert p95(overload(fixed)) > 1.0  # the fixed plan's queue grows without bound
    assert p95(overload(served)) < 0.1  # adaptive holds the SLO
    during = [plan for t, plan, _ in served if 30 <= t < 60]
    assert during.count("skip4") / len(during) > 0.9  # only skip4 keeps up with 150/s
    assert {plan for t, plan, _ in served if t < 20} == {"adapters"}
    assert {plan for t, plan, _ in served if t >= 90} == {"adapters"}  # back once load fell
    downs = [s for s in shifts if s.direction == "down"]
    ups = [s for s in shifts if s.direction == "up"]
    assert downs[:2] == [Shift("vqa", "down", "adapters", "skip2"), Shift("vqa", "down", "skip2", "skip4")]
    # calm on skip4 makes it probe skip2, which cannot keep up at 150/s: the back-off keeps that rare
    assert len(shifts) <= 10, shifts
    assert ups[-2:] == [Shift("vqa", "up", "skip4", "skip2"), Shift("vqa", "up", "skip2", "adapters")]


# -- settings from store.json -------------------------------------------------------------------------
def test_parse_adaptive_config():
    assert parse_adaptive_config(None) == {}
    parsed = parse_adaptive_config({"vqa": {"slo_p95_ms": 200, "cooldown_s": 0, "fallbacks": ["skip2"]},
                                    "retrieval": {"slo_p95_ms": 50.5}})
    assert parsed["vqa"] == AdaptiveSettings(slo_p95_ms=200, cooldown_s=0, fallbacks=("skip2",))
    assert parsed["retrieval"].slo_p95_ms == 50.5 and parsed["retrieval"].window_s == 10.0


@pytest.mark.parametrize("raw, fragment", [
    ([], "must be an object"),
    ({"vqa": 200}, "adaptive.vqa' must be an object"),
    ({"captioning": {"slo_p95_ms": 1}}, "unknown task"),
    ({"vqa": {}}, "slo_p95_ms is required"),
    ({"vqa": {"slo_p95_ms": 0}}, "slo_p95_ms must be > 0"),
    ({"vqa": {"slo_p95_ms": "200"}}, "finite number"),
    ({"vqa": {"slo_p95_ms": True}}, "finite number"),
    ({"vqa": {"slo_p95_ms": float("nan")}}, "finite number"),
    ({"vqa": {"slo_p95_ms": 200, "slo_p99_ms": 300}}, "unknown setting(s) slo_p99_ms"),
    ({"vqa": {"slo_p95_ms": 200, "window_s": -1}}, "window_s must be > 0"),
    ({"vqa": {"slo_p95_ms": 200, "min_samples": 0}}, "min_samples"),
    ({"vqa": {"slo_p95_ms": 200, "min_samples": 2.5}}, "min_samples"),
    ({"vqa": {"slo_p95_ms": 200, "recover_ratio": 1}}, "recover_ratio"),
    ({"vqa": {"slo_p95_ms": 200, "cooldown_s": -1}}, "cooldown_s"),
    ({"vqa": {"slo_p95_ms": 200, "fallbacks": "skip2"}}, "fallbacks must be a list"),
    ({"vqa": {"slo_p95_ms": 200, "fallbacks": []}}, "non-empty list"),
    ({"vqa": {"slo_p95_ms": 200, "fallbacks": ["../x"]}}, "plan names"),
])
def test_bad_adaptive_config_names_the_problem(raw, fragment):
    with pytest.raises(AdaptiveConfigError) as error:
        parse_adaptive_config(raw)
    assert fragment in str(error.value)


# -- one worker's shifter ---------------------------------------------------------------------------------
def test_shifter_reports_shifts_and_keeps_state_across_unchanged_settings():
    shifts, serving = [], []
    shifter = LoadShifter(on_shift=shifts.append, on_serving=lambda *change: serving.append(change))
    settings = AdaptiveSettings(slo_p95_ms=100, min_samples=2)
    shifter.configure({"vqa": settings})
    assert shifter.choose("nlvr2", ["x"], 0.0) is None  # not adaptive
    assert shifter.choose("vqa", LADDER, 0.0) == "adapters"
    for _ in range(2):
        shifter.observe("vqa", 0.5, 0.0, 0.5)
    assert shifter.choose("vqa", LADDER, 0.5) == "skip2"
    assert shifts == [Shift("vqa", "down", "adapters", "skip2")]
    assert serving == [("vqa", None, "adapters"), ("vqa", "adapters", "skip2")]
    shifter.configure({"vqa": AdaptiveSettings(slo_p95_ms=100, min_samples=2)})  # equal settings: same state
    assert shifter.status(0.5)["vqa"]["serving"] == "skip2" and shifter.status(0.5)["vqa"]["steps_down"] == 1
    shifter.configure({"vqa": AdaptiveSettings(slo_p95_ms=300)})  # changed: starts over at the active plan
    assert serving[-1] == ("vqa", "skip2", None)
    assert shifter.choose("vqa", LADDER, 1.0) == "adapters"
    shifter.configure({})
    assert serving[-1] == ("vqa", "adapters", None)
    assert shifter.choose("vqa", LADDER, 1.0) is None and shifter.status(1.0) == {}


# -- the backlog: overload seen at arrival --------------------------------------------------------------
def test_a_backlog_over_the_slo_steps_down_before_any_request_finishes():
    ctl = controller()  # SLO 100 ms
    assert ctl.choose(LADDER, 1.0, backlog_s=0.05) == ("adapters", None)
    assert ctl.choose(LADDER, 1.0, backlog_s=0.5) == ("skip2", Shift("vqa", "down", "adapters", "skip2"))
    # the queue built under the dearer plan is still there: one step per SLO period, not one per request
    assert ctl.choose(LADDER, 1.05, backlog_s=0.5) == ("skip2", None)
    assert ctl.choose(LADDER, 1.1, backlog_s=0.5) == ("skip4", Shift("vqa", "down", "skip2", "skip4"))
    assert ctl.choose(LADDER, 1.3, backlog_s=5.0) == ("skip4", None)  # the cheapest rung: nowhere lower


def test_no_step_up_onto_a_long_queue():
    ctl = controller(cooldown_s=1)
    feed(ctl, 0.3, 5, now=1.0)
    assert ctl.choose(LADDER, 1.0)[0] == "skip2"
    for now in (2.0, 3.0, 4.0):  # finished requests are fast, but requests are still piling up
        feed(ctl, 0.01, 5, now=now)
        assert ctl.choose(LADDER, now, backlog_s=0.08) == ("skip2", None)
    for now in (5.0, 6.0, 7.0):
        feed(ctl, 0.01, 5, now=now)
        name, _ = ctl.choose(LADDER, now, backlog_s=0.0)
    assert name == "adapters"


def test_steps_up_only_when_the_dearer_plan_would_leave_headroom():
    costs = [1.0, 0.5, 0.25]  # FLOPs ratios of LADDER's rungs
    ctl = controller(cooldown_s=1, max_utilization=0.8)
    for now in (1.0, 1.5):  # down to skip4
        feed(ctl, 0.3, 5, now=now)
        ctl.choose(LADDER, now)
    assert ctl.serving == "skip4"
    busy = {"share": 0.6}  # skip4 keeps the model 60% busy: skip2 would need 120%
    windows = []

    def utilization(window_s: float) -> float:
        windows.append(window_s)
        return busy["share"]

    for now in (2.0, 3.0, 4.0, 5.0):  # requests are fast, the queue is empty: latency alone would step up
        feed(ctl, 0.01, 5, now=now)
        assert ctl.choose(LADDER, now, 0.0, utilization, costs) == ("skip4", None)
    assert ctl.projected_utilization == pytest.approx(1.2) and windows[-1] == 10  # over the controller's window
    busy["share"] = 0.35  # the load fell: skip2 would run at 70%
    shifts = []
    for now in (6.0, 7.0, 8.0):
        feed(ctl, 0.01, 5, now=now)
        shifts.append(ctl.choose(LADDER, now, 0.0, utilization, costs)[1])
    assert Shift("vqa", "up", "skip4", "skip2") in shifts
    # unknown costs (or no utilization): latency decides alone, as before
    for now in (9.0, 10.0, 11.0):
        feed(ctl, 0.01, 5, now=now)
        name, _ = ctl.choose(LADDER, now, 0.0, utilization, None)
    assert name == "adapters"


def test_max_utilization_must_be_a_share():
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(AdaptiveConfigError, match="max_utilization"):
            AdaptiveSettings(slo_p95_ms=100, max_utilization=bad)
