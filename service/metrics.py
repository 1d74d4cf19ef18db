"""Prometheus metrics of the service.

prometheus_client is imported when a worker builds its metrics (not at module import): BentoML sets
PROMETHEUS_MULTIPROC_DIR in each worker before that, so every worker writes to the shared
multiprocess files and BentoML's /metrics serves all workers merged.
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STORE_ERROR_KINDS = ("read", "write", "sync")  # das_store_errors' "kind" label: a fixed set (service.registry's and service.store's)


class ServiceMetrics:
    def __init__(self, registry=None) -> None:
        import prometheus_client as prom

        kwargs = {"registry": registry} if registry is not None else {}
        self.requests = prom.Counter(
            "das_requests", "Inference requests by task, plan and outcome (ok, client_error, overloaded, error, cancelled: "
            "the client went away during a streamed answer).",
            ["task", "plan", "status"], **kwargs)
        self.latency = prom.Histogram(
            "das_request_latency_seconds", "Time from request arrival to response, per task and plan.",
            ["task", "plan"], buckets=LATENCY_BUCKETS, **kwargs)
        self.flops_full = prom.Counter(
            "das_flops_full", "FLOPs the full backbone would have spent on the served requests (1 multiply-add = 2 FLOPs).",
            ["task", "plan"], **kwargs)
        self.flops_executed = prom.Counter(
            "das_flops_executed", "FLOPs actually executed on the served requests under their plan (1 multiply-add = 2 FLOPs).",
            ["task", "plan"], **kwargs)
        self.batch_size = prom.Histogram(
            "das_batch_size", "Requests per executed model batch.", ["task"], buckets=BATCH_BUCKETS, **kwargs)
        self.active_plan = prom.Gauge(
            "das_active_plan", "1 for the active plan of each task, 0 for other loaded plans.",
            ["task", "plan", "version"], multiprocess_mode="livemax", **kwargs)
        self._active_labels: set[tuple[str, str, str]] = set()
        self.plan_swaps = prom.Counter(
            "das_plan_swaps", "Plan administration operations by task and outcome.", ["task", "outcome"], **kwargs)
        # load-adaptive mode (plan names are loaded plans: a bounded set, like das_active_plan's)
        self.plan_shifts = prom.Counter(
            "das_plan_shifts", "Load-adaptive steps of a task's default plan: down (cheaper) or up (toward the active plan).",
            ["task", "direction", "from_plan", "to_plan"], **kwargs)
        self.served_plan = prom.Gauge(
            "das_served_plan", "Workers whose load-adaptive default for the task is this plan (adaptive tasks only).",
            ["task", "plan"], multiprocess_mode="livesum", **kwargs)
        # generative backbones: tokens written and how long the first one took, per plan
        self.generated_tokens = prom.Counter(
            "das_generated_tokens", "Tokens generated (end-of-sequence tokens included), per task and plan.",
            ["task", "plan"], **kwargs)
        self.time_to_first_token = prom.Histogram(
            "das_time_to_first_token_seconds", "Time from a generative request's arrival to its first generated token.",
            ["task", "plan"], buckets=FIRST_TOKEN_BUCKETS, **kwargs)
        # plan store problems (read: store.json unreadable or invalid, the last good state serves; write: an
        # admin change could not or must not be written; sync: the sync loop failed)
        self.store_errors = prom.Counter(
            "das_store_errors", "Plan store problems by kind: read (store.json unreadable or invalid; the last good "
            "state keeps serving), write (an admin change not written), sync (a failed store sync).", ["kind"], **kwargs)
        for kind in STORE_ERROR_KINDS:  # exported at 0 from the start, so that rate() and alerts see the first one
            self.store_errors.labels(kind)

    def observe_request(self, task: str, plan: str, status: str, seconds: float | None = None,
                        flops_full: int = 0, flops_executed: int = 0) -> None:
        self.requests.labels(task, plan, status).inc()
        if seconds is not None:
            self.latency.labels(task, plan).observe(seconds)
        if flops_full:
            self.flops_full.labels(task, plan).inc(flops_full)
            self.flops_executed.labels(task, plan).inc(flops_executed)

    def observe_generation(self, task: str, plan: str, tokens: int, first_token_s: float | None) -> None:
        """A generative request produced ``tokens`` tokens, the first ``first_token_s`` after it arrived."""
        if tokens:
            self.generated_tokens.labels(task, plan).inc(tokens)
        if first_token_s is not None:
            self.time_to_first_token.labels(task, plan).observe(max(0.0, first_token_s))

    def observe_shift(self, shift) -> None:
        """shift: service.adaptive.Shift."""
        self.plan_shifts.labels(shift.task, shift.direction, shift.from_plan, shift.to_plan).inc()

    def set_served_plan(self, task: str, previous: str | None, current: str | None) -> None:
        """This worker's load-adaptive default for ``task`` moved from ``previous`` to ``current``."""
        if previous is not None:
            self.served_plan.labels(task, previous).set(0)
        if current is not None:
            self.served_plan.labels(task, current).set(1)

    def set_active_plans(self, snapshot: dict) -> None:
        """snapshot: PlanRegistry.snapshot(). Label sets that disappeared are set to 0 (multiprocess
        mode cannot remove a label set)."""
        current = {}
        for task, entry in snapshot.items():
            for name, plan in entry["plans"].items():
                current[(task, name, str(plan.version))] = 1 if name == entry["active"] else 0
        for labels in self._active_labels - set(current):
            self.active_plan.labels(*labels).set(0)
        for labels, value in current.items():
            self.active_plan.labels(*labels).set(value)
        self._active_labels = set(current)
