"""Load-adaptive plan choice: when queueing pushes a task's p95 latency over its SLO, new requests that
name no plan (and no FLOPs budget) step down to the next cheaper loaded plan; when load falls they
step back up toward the active plan.

Opt-in per task in the plan store's store.json (see the README)::

    "adaptive": {"vqa": {"slo_p95_ms": 200,          # required: the latency objective, > 0
                         "window_s": 10,             # p95 over requests finished in the last window_s
                         "min_samples": 20,          # fewer in the window: step down only if all (>= 3) are slow
                         "recover_ratio": 0.5,       # step up once p95 < recover_ratio * SLO ...
                         "cooldown_s": 10,           # ... for cooldown_s without a break, and the
                         "max_utilization": 0.8,     # dearer plan would keep the model busy at most 80%
                         "fallbacks": ["skip2"]}}    # optional: the only plans it may step down to

The decision logic is :class:`LoadController`: pure, clock injected, no I/O, so its behaviour is
tested with simulated latencies. :class:`LoadShifter` holds one controller per configured task for
one worker. Each BentoML worker is a separate process with its own queue, so each runs its own
controllers from its own latencies; workers may serve different plans at the same moment.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from models.das.plan import NAME_PATTERN
from models.tasks import TASKS

SPARSE_MIN_SAMPLES = 3  # with fewer than min_samples in the window, this many all over the SLO still step down
MAX_COOLDOWN_BACKOFF = 8  # a step up that fails fast doubles the next cool-down, up to this factor
MAX_WINDOW_SAMPLES = 2048  # memory and sort-time bound per task; at high rates the window is the most recent ones


class AdaptiveConfigError(ValueError):
    """store.json's "adaptive" section is malformed; the message says where and why."""


@dataclass(frozen=True)
class AdaptiveSettings:
    slo_p95_ms: float
    window_s: float = 10.0
    min_samples: int = 20
    recover_ratio: float = 0.5
    cooldown_s: float = 10.0
    max_utilization: float = 0.8  # step up only if the dearer plan is projected to keep the model at most this busy
    fallbacks: tuple[str, ...] | None = None  # None: every cheaper loaded plan

    def __post_init__(self) -> None:
        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdaptiveConfigError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if number("slo_p95_ms", self.slo_p95_ms) <= 0:
            raise AdaptiveConfigError(f"slo_p95_ms must be > 0, got {self.slo_p95_ms!r}")
        if number("window_s", self.window_s) <= 0:
            raise AdaptiveConfigError(f"window_s must be > 0, got {self.window_s!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise AdaptiveConfigError(f"min_samples must be an integer >= 1, got {self.min_samples!r}")
        if not 0 < number("recover_ratio", self.recover_ratio) < 1:
            raise AdaptiveConfigError(f"recover_ratio must be between 0 and 1 (exclusive), got {self.recover_ratio!r}")
        if not 0 < number("max_utilization", self.max_utilization) <= 1:
            raise AdaptiveConfigError(f"max_utilization must be in (0, 1], got {self.max_utilization!r}")
        if number("cooldown_s", self.cooldown_s) < 0:
            raise AdaptiveConfigError(f"cooldown_s must be >= 0, got {self.cooldown_s!r}")
        if self.fallbacks is not None:
            bad = [n for n in self.fallbacks if not isinstance(n, str) or not NAME_PATTERN.match(n)]
            if bad or not self.fallbacks:
                raise AdaptiveConfigError(f"fallbacks must be a non-empty list of plan names, got {list(self.fallbacks)!r}")


def parse_adaptive_config(raw: Any) -> dict[str, AdaptiveSettings]:
    """store.json's "adaptive" value -> settings per task. Raises AdaptiveConfigError naming the problem."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise AdaptiveConfigError(f"store.json 'adaptive' must be an object of task -> settings, got {type(raw).__name__}")
    known = {f.name for f in AdaptiveSettings.__dataclass_fields__.values()}
    parsed = {}
    for task, entry in raw.items():
        where = f"store.json 'adaptive.{task}'"
        if task not in TASKS:
            raise AdaptiveConfigError(f"{where}: unknown task (known: {', '.join(TASKS)})")
        if not isinstance(entry, Mapping):
            raise AdaptiveConfigError(f"{where} must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise AdaptiveConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "slo_p95_ms" not in entry:
            raise AdaptiveConfigError(f"{where}: slo_p95_ms is required")
        fields = dict(entry)
        if "fallbacks" in fields:
            if not isinstance(fields["fallbacks"], list):
                raise AdaptiveConfigError(f"{where}: fallbacks must be a list of plan names")
            fields["fallbacks"] = tuple(fields["fallbacks"])
        try:
            parsed[task] = AdaptiveSettings(**fields)
        except AdaptiveConfigError as exc:
            raise AdaptiveConfigError(f"{where}: {exc}") from None
    return parsed


@dataclass(frozen=True)
class Shift:
    """One step of the controller: ``direction`` is "down" (cheaper) or "up" (toward the active plan)."""

    task: str
    direction: str
    from_plan: str
    to_plan: str


class LoadController:
    """Which rung of a task's plan ladder new default requests get, from recent latencies.

    The ladder is the active plan followed by the cheaper loaded plans, most expensive first
    (``PlanRegistry.ladder``). Rules:

    * step down one rung at once when the worker's backlog (how long a request arriving now would
      wait for the model, ``backlog_s``) is over the SLO: with a long queue, finished requests tell
      of overload only after they waited through it, seconds late for a large model. At most one
      such step per SLO period, so each step's effect can show before the next;
    * step down one rung when at least ``min_samples`` requests finished within ``window_s`` and
      their p95 is over the SLO, or when fewer did (a service so slow that few requests finish) but
      at least ``SPARSE_MIN_SAMPLES`` did and every one of them was over the SLO;
    * step up one rung when the p95 (or, with fewer than ``min_samples``, every sample) stays
      under ``recover_ratio * SLO`` for ``cooldown_s`` without a break — the gap between the two
      thresholds and the cool-down keep it from flapping; an empty window changes nothing;
    * and, when the caller knows how busy the model is and what the rungs cost, only if the dearer
      rung would leave headroom: utilization over the window x (its FLOPs / the current rung's) at
      most ``max_utilization``. Low latency on a cheap plan says nothing about whether the dearer
      one can keep up: without this check a sustained overload steps up, queues, and steps down
      again every cool-down. FLOPs overstate a plan's time when fixed per-request costs matter, so
      the projection errs on the side of staying down;
    * after a step only requests whose plan was chosen at or after it are judged, so the queue
      built up under the previous plan does not push it down a second time by itself;
    * a step up followed by a step down within ``cooldown_s`` (the dearer plan could not keep up:
      load had not fallen, only latency on the cheap plan was low) doubles the next cool-down, up
      to ``MAX_COOLDOWN_BACKOFF`` times; a step up that holds for ``cooldown_s`` resets it. So a
      sustained overload probes upward ever more rarely instead of flapping every cool-down.

    Pure: the caller passes the clock (seconds, any monotonic origin). Not thread-safe by itself.
    """

    def __init__(self, task: str, settings: AdaptiveSettings) -> None:
        self.task = task
        self.settings = settings
        self.level = 0  # rungs below the active plan
        self.serving: str | None = None  # the plan the last decision gave
        self._samples: deque[tuple[float, float]] = deque(maxlen=MAX_WINDOW_SAMPLES)  # (finished_at, seconds)
        self._judged_since = -math.inf  # requests whose plan was chosen before this are ignored
        self._calm_since: float | None = None
        self._last_up: float | None = None  # when the last step up happened, while it is on probation
        self.backoff = 1  # multiplies cooldown_s
        self._last_backlog_step = -math.inf
        self.projected_utilization: float | None = None  # the dearer rung's, when a step up was last weighed

    def observe(self, seconds: float, chosen_at: float, now: float) -> None:
        """A request of the task whose plan was chosen at ``chosen_at`` finished at ``now``, ``seconds``
        after it arrived."""
        if chosen_at >= self._judged_since:
            self._samples.append((now, seconds))

    def p95_ms(self, now: float) -> float | None:
        """p95 latency of the requests in the window, or None when it holds fewer than min_samples."""
        latencies = self._window(now)
        if len(latencies) < self.settings.min_samples:
            return None
        return _p95(latencies) * 1000

    def _window(self, now: float) -> list[float]:
        start = now - self.settings.window_s
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()
        return [seconds for _, seconds in self._samples]

    def choose(self, ladder: Sequence[str], now: float, backlog_s: float = 0.0,
               utilization: Callable[[float], float] | None = None,
               costs: Sequence[float] | None = None) -> tuple[str, Shift | None]:
        """The plan for a new default request, and the shift this decision made (if any). ``backlog_s``:
        how long a request arriving now would wait for the model; ``utilization(window_s)``: the share
        of the last window_s seconds the model was busy; ``costs``: each rung's FLOPs ratio, in ladder
        order. Without the last two, steps up are judged by latency alone."""
        if not ladder:
            raise ValueError("the plan ladder is empty")
        self.level = min(self.level, len(ladder) - 1)  # plans may have been unloaded since
        if self._last_up is not None and now - self._last_up >= self.settings.cooldown_s:
            self._last_up, self.backoff = None, 1  # the last step up held
        slo = self.settings.slo_p95_ms / 1000
        if backlog_s > slo and self.level < len(ladder) - 1 and now - self._last_backlog_step >= slo:
            self._last_backlog_step = now
            return self._step(ladder, +1, now)
        latencies = self._window(now)
        if latencies:  # no finished request in the window says nothing either way: keep the state
            enough = len(latencies) >= self.settings.min_samples
            p95 = _p95(latencies)
            slow = p95 > slo if enough else len(latencies) >= SPARSE_MIN_SAMPLES and min(latencies) > slo
            if slow and self.level < len(ladder) - 1:
                return self._step(ladder, +1, now)
            calm = (p95 if enough else max(latencies)) < self.settings.recover_ratio * slo
            calm = calm and backlog_s < self.settings.recover_ratio * slo  # no step up onto a long queue
            calm = calm and self._dearer_fits(ladder, utilization, costs)
            if not calm or self.level == 0:
                self._calm_since = None
            elif self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.settings.cooldown_s * self.backoff:
                return self._step(ladder, -1, now)
        self.serving = ladder[self.level]
        return self.serving, None

    def _dearer_fits(self, ladder: Sequence[str], utilization: Callable[[float], float] | None,
                     costs: Sequence[float] | None) -> bool:
        """Would the next dearer rung keep the model at most max_utilization busy at today's load?"""
        if self.level == 0 or utilization is None or costs is None or len(costs) != len(ladder):
            return True
        current, dearer = costs[self.level], costs[self.level - 1]
        if not current > 0:
            return True
        self.projected_utilization = utilization(self.settings.window_s) * dearer / current
        return self.projected_utilization <= self.settings.max_utilization

    def _step(self, ladder: Sequence[str], delta: int, now: float) -> tuple[str, Shift]:
        before = ladder[self.level]
        if delta > 0 and self._last_up is not None:  # the last step up did not hold
            self.backoff = min(self.backoff * 2, MAX_COOLDOWN_BACKOFF)
        self._last_up = now if delta < 0 else None
        self.level += delta
        self._samples.clear()
        self._judged_since = now
        self._calm_since = None
        self.serving = ladder[self.level]
        return self.serving, Shift(self.task, "down" if delta > 0 else "up", before, self.serving)


def _p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class LoadShifter:
    """One worker's controllers, one per task with adaptive settings. Thread-safe.

    ``configure`` is called whenever the store is re-read: a task's controller is kept while its
    settings stay the same (so its state survives unrelated store changes) and replaced otherwise.
    """

    def __init__(self, on_shift: Callable[[Shift], None] | None = None,
                 on_serving: Callable[[str, str | None, str | None], None] | None = None) -> None:
        self._controllers: dict[str, LoadController] = {}
        self._lock = threading.Lock()
        self.on_shift = on_shift  # a controller stepped
        self.on_serving = on_serving  # (task, previous plan, current plan) a task's default plan changed here

    def configure(self, settings: Mapping[str, AdaptiveSettings]) -> None:
        with self._lock:
            previous = self._controllers
            self._controllers = {
                task: (current if (current := previous.get(task)) and current.settings == wanted
                       else LoadController(task, wanted))
                for task, wanted in settings.items()
            }
            dropped = [(task, c.serving) for task, c in previous.items() if self._controllers.get(task) is not c]
        for task, serving in dropped:
            self._notify_serving(task, serving, None)

    def settings(self, task: str) -> AdaptiveSettings | None:
        with self._lock:
            controller = self._controllers.get(task)
            return controller.settings if controller else None

    def observe(self, task: str, seconds: float, chosen_at: float, now: float) -> None:
        with self._lock:
            controller = self._controllers.get(task)
            if controller is not None:
                controller.observe(seconds, chosen_at, now)

    def choose(self, task: str, ladder: Sequence[str], now: float, backlog_s: float = 0.0,
               utilization: Callable[[float], float] | None = None,
               costs: Sequence[float] | None = None) -> str | None:
        """The plan for a new default request of ``task``; None if the task is not adaptive
        (arguments as :meth:`LoadController.choose`)."""
        with self._lock:
            controller = self._controllers.get(task)
            if controller is None:
                return None
            before = controller.serving
            name, shift = controller.choose(ladder, now, backlog_s, utilization, costs)
        if shift is not None and self.on_shift is not None:
            self.on_shift(shift)
        if name != before:
            self._notify_serving(task, before, name)
        return name

    def _notify_serving(self, task: str, previous: str | None, current: str | None) -> None:
        if self.on_serving is not None and previous != current:
            self.on_serving(task, previous, current)

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        """Per adaptive task: its SLO, the plan this worker last gave, rungs below the active plan, p95."""
        with self._lock:
            return {
                task: {"slo_p95_ms": c.settings.slo_p95_ms, "serving": c.serving, "steps_down": c.level,
                       "p95_ms": None if (p := c.p95_ms(now)) is None else round(p, 3),
                       "cooldown_backoff": c.backoff,
                       "projected_utilization_up": None if c.projected_utilization is None
                       else round(c.projected_utilization, 3)}
                for task, c in self._controllers.items()
            }


__all__ = ["AdaptiveConfigError", "AdaptiveSettings", "LoadController", "LoadShifter", "Shift",
           "parse_adaptive_config"]
