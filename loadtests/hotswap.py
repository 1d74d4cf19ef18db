"""`make loadtest-hotswap`: plans hot-swapped through the admin API while Locust keeps all three tasks busy.

The service runs against a copy of the plan store in a temporary folder (the repository's
plans/store.json is never written). Each swap picks the next task, uploads a new version of a plan
named ``hotswap`` (a shipped plan's weights under that name, as a .tar.gz archive), activates it,
lets traffic reach it, rolls back, and unloads it. Pass criteria:

- zero failed requests, and every endpoint was hit;
- every admin call answered 200 with the expected plan;
- every response reports a plan (name, version, skipped layers) that was its task's active plan at
  some moment between the request's start minus the convergence lag and its end (the README promises
  that a request starting more than 2 s after an activation answered runs the new plan);
- worker memory (RSS summed over the bentoml worker processes) ends within the tolerance of where it
  was after the warm-up (load until the RSS settles, then three swaps).

    python -m loadtests.hotswap --swaps 50
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import secrets
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from urllib3 import encode_multipart_formdata

from loadtests.harness import (
    DEFAULT_RESULTS, REPO, LoadTestError, LocustRun, RunningService, Summary, add_locust_checks, endpoints_in_mix,
    http_get_json, positive_float, positive_int, running_service, stop_on_sigterm, user_count,
    weights_argument, weights_text,
)
from loadtests.payloads import DEFAULT_WEIGHTS
from models.das.plan import PLAN_FILE, WEIGHTS_FILE, read_plan_spec

SHIPPED_STORE = REPO / "plans"


# -- the admin API -----------------------------------------------------------------------------------
@dataclass
class AdminCall:
    operation: str
    status: int
    body: Any
    sent: float  # wall-clock time the request was sent
    answered: float  # wall-clock time the answer arrived

    @property
    def plan(self) -> dict[str, Any]:
        return self.body.get("plan", {}) if isinstance(self.body, dict) else {}


class AdminClient:
    """POSTs to /admin/plans/* with the bearer token; every call is kept for the summary."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.calls: list[AdminCall] = []

    def _post(self, operation: str, body: bytes, content_type: str) -> AdminCall:
        request = urllib.request.Request(
            f"{self.url}/admin/plans/{operation}", data=body, method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type})
        sent = time.time()
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        call = AdminCall(operation, status, parsed, sent, time.time())
        self.calls.append(call)
        return call

    def _post_json(self, operation: str, payload: dict[str, str]) -> AdminCall:
        return self._post(operation, json.dumps(payload).encode(), "application/json")

    def load_archive(self, archive: Path) -> AdminCall:
        body, content_type = encode_multipart_formdata([("archive", (archive.name, archive.read_bytes(), "application/gzip"))])
        return self._post("load", body, content_type)

    def activate(self, task: str, name: str) -> AdminCall:
        return self._post_json("activate", {"task": task, "name": name})

    def rollback(self, task: str) -> AdminCall:
        return self._post_json("rollback", {"task": task})

    def unload(self, task: str, name: str) -> AdminCall:
        return self._post_json("unload", {"task": task, "name": name})


# -- which plan may a response report ----------------------------------------------------------------
PlanKey = tuple[str, str, int, tuple[int, ...]]  # task, name, version, skipped layers


def plan_key(plan: dict[str, Any]) -> PlanKey:
    return plan["task"], plan["name"], int(plan["version"]), tuple(plan["skipped_layers"])


@dataclass
class Window:
    """A plan version held a role (its task's active plan, or a loaded plan) from at the earliest
    ``opened`` (the admin call that gave it the role was sent) to at the latest ``closed`` (the call
    that took the role away was answered)."""

    key: PlanKey
    opened: float
    closed: float = math.inf


class PlanTimeline:
    """Which plan version each task had active, and which versions it had loaded, over time."""

    def __init__(self, lag_s: float) -> None:
        self.lag_s = lag_s
        self.windows: dict[str, list[Window]] = {"active": [], "loaded": []}
        self._open: dict[tuple[str, Any], Window] = {}

    def _begin(self, role: str, slot: Any, key: PlanKey, sent: float, answered: float) -> None:
        current = self._open.get((role, slot))
        if current is not None and current.key == key:
            return
        if current is not None:
            current.closed = answered
        self._open[(role, slot)] = window = Window(key, sent)
        self.windows[role].append(window)

    def activated(self, plan: dict[str, Any], sent: float, answered: float) -> None:
        self._begin("active", plan["task"], plan_key(plan), sent, answered)

    def loaded(self, plan: dict[str, Any], sent: float, answered: float) -> None:
        self._begin("loaded", (plan["task"], plan["name"]), plan_key(plan), sent, answered)

    def unloaded(self, plan: dict[str, Any], answered: float) -> None:
        window = self._open.pop(("loaded", (plan["task"], plan["name"])), None)
        if window is not None:
            window.closed = answered

    def allows(self, plan: dict[str, Any], started: float, finished: float, role: str = "active") -> bool:
        """May a request running from ``started`` to ``finished`` report ``plan`` in ``role``? Workers
        converge to the store within ``lag_s``, so a window counts until ``lag_s`` after it closed."""
        key = plan_key(plan)
        return any(w.key == key and w.opened <= finished and started <= w.closed + self.lag_s
                   for w in self.windows[role])


def check_responses(log_path: Path, timeline: PlanTimeline, swapped_name: str) -> dict[str, Any]:
    """Check every logged response against the timeline; count what each plan served.

    A response that ran its task's active plan (``chosen_by`` "active") must report the active plan of
    its time; one whose plan was chosen otherwise (named, FLOPs budget, load-adaptive) a loaded one."""
    checked, outside, served = 0, [], Counter()
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if not record["ok"] or not record["plan"]:
                continue  # failed requests are counted by Locust
            checked += 1
            plan = record["plan"]
            served[f"{plan['task']}/{plan['name']} v{plan['version']}"] += 1
            role = "active" if plan.get("chosen_by", "active") == "active" else "loaded"
            if not timeline.allows(plan, record["started"], record["finished"], role):
                outside.append({"endpoint": record["endpoint"], "plan": plan, "role": role,
                                "started": record["started"], "finished": record["finished"]})
    swapped = sum(n for label, n in served.items() if label.split("/")[1].startswith(f"{swapped_name} "))
    return {"checked": checked, "outside_window": outside, "served_by_plan": dict(sorted(served.items())),
            "served_by_swapped_versions": swapped}


# -- the scenario -------------------------------------------------------------------------------------
def copy_store(source: Path, target: Path) -> Path:
    """The plan store (store.json and the plan directories) without the backbone, which is served from
    its own place, without the tiny METER's store nested in plans/, and without the result plots and reports."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("backbone", "meter", "*.png", "*.md",
                                                                 "pipeline-report.json"))
    return target


def plan_archive(source: Path, name: str, version: int, out_dir: Path) -> Path:
    """A .tar.gz of the plan at ``source`` relabelled as ``name`` ``version`` (same weights): what a
    team shipping a new plan version would upload."""
    spec = dataclasses.replace(read_plan_spec(source), name=name, version=version)
    archive = out_dir / f"{spec.task}-{name}-v{version}.tar.gz"
    plan_json = (json.dumps(spec.to_json_dict(), indent=2) + "\n").encode()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(PLAN_FILE)
        info.size = len(plan_json)
        tar.addfile(info, io.BytesIO(plan_json))
        tar.add(source / WEIGHTS_FILE, arcname=WEIGHTS_FILE)
    return archive


class SwapDriver:
    """Runs swap cycles: upload version N of the swapped plan, activate, dwell, roll back, unload."""

    def __init__(self, admin: AdminClient, timeline: PlanTimeline, store: Path, work: Path,
                 plan_name: str, dwell_s: float, tasks: list[str]) -> None:
        self.admin, self.timeline, self.store, self.work = admin, timeline, store, work
        self.plan_name, self.dwell_s, self.tasks = plan_name, dwell_s, tasks
        self.sources = {task: sorted(d for d in (store / task).iterdir() if (d / PLAN_FILE).is_file() and d.name != plan_name)
                        for task in tasks}
        self.versions: Counter[str] = Counter()
        self.problems: list[str] = []
        self.swaps = 0

    def _expect(self, call: AdminCall, what: str, **plan_fields: Any) -> bool:
        wrong = {k: call.plan.get(k) for k, v in plan_fields.items() if call.plan.get(k) != v}
        if call.status != 200 or wrong:
            self.problems.append(f"{what}: HTTP {call.status}, {str(call.body)[:300]}")
            return False
        return True

    def swap(self) -> None:
        task = self.tasks[self.swaps % len(self.tasks)]
        sources = self.sources[task]
        source = sources[(self.swaps // len(self.tasks)) % len(sources)]
        self.swaps += 1
        self.versions[task] += 1
        version = self.versions[task]
        name = self.plan_name
        archive = plan_archive(source, name, version, self.work)
        try:
            loaded = self.admin.load_archive(archive)
        finally:
            archive.unlink()
        if not self._expect(loaded, f"load {task}/{name} v{version}", name=name, version=version):
            return
        self.timeline.loaded(loaded.plan, loaded.sent, loaded.answered)
        activated = self.admin.activate(task, name)
        if not self._expect(activated, f"activate {task}/{name} v{version}", name=name, version=version):
            return
        self.timeline.activated(activated.plan, activated.sent, activated.answered)
        time.sleep(self.dwell_s)  # let traffic reach the new version
        rolled_back = self.admin.rollback(task)
        if self._expect(rolled_back, f"rollback {task}"):
            self.timeline.activated(rolled_back.plan, rolled_back.sent, rolled_back.answered)
            if rolled_back.plan.get("name") == name:
                self.problems.append(f"rollback {task} left {name} active")
        unloaded = self.admin.unload(task, name)
        if self._expect(unloaded, f"unload {task}/{name} v{version}", name=name, version=version):
            self.timeline.unloaded(unloaded.plan, unloaded.answered)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.hotswap", description=__doc__,
        epilog="Writes hotswap_stats.csv etc. and hotswap.html (Locust), hotswap-summary.json/.md, "
               "hotswap-responses.jsonl (one line per response), hotswap-service.log into --out. Exit status: "
               "0 when every criterion passed, 1 when one failed, 2 when the run could not be made.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=positive_int, default=50,
                        help="swap cycles measured (each: load a new version, activate, roll back, unload; default 50)")
    parser.add_argument("--warmup-swaps", type=positive_int, default=3, help="swap cycles before the memory baseline (default 3)")
    parser.add_argument("--warmup", type=positive_float, default=15.0,
                        help="least seconds of load before the warm-up swaps (default 15); the warm-up goes on "
                             "until worker memory grew by at most 1%% in 30 s")
    parser.add_argument("--warmup-max", type=positive_float, default=300.0,
                        help="most seconds of warm-up load, settled or not (default 300)")
    parser.add_argument("--dwell", type=positive_float, default=1.0,
                        help="seconds a swapped-in version stays active before the rollback (default 1)")
    parser.add_argument("--users", type=user_count, default=4, help="simulated users (default 4)")
    parser.add_argument("--spawn-rate", type=positive_float, default=4.0, help="users started per second (default 4)")
    parser.add_argument("--weights", type=weights_argument, default=weights_argument(DEFAULT_WEIGHTS),
                        help=f"endpoint weights (default {DEFAULT_WEIGHTS}); keep all three tasks busy")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="BentoML worker processes (default 2: swaps must reach every worker)")
    parser.add_argument("--lag", type=positive_float, default=2.0,
                        help="seconds a worker may take to follow an admin call (the README's promise; default 2)")
    parser.add_argument("--rss-tolerance", type=positive_float, default=0.05,
                        help="allowed relative change of worker RSS from after warm-up to the end (default 0.05)")
    parser.add_argument("--ready-timeout", type=positive_float, default=300,
                        help="seconds the service may take to answer /readyz (default 300)")
    parser.add_argument("--plans", type=Path, default=SHIPPED_STORE,
                        help="plan store to copy and serve (default: the embedded plans/; never modified)")
    parser.add_argument("--plan-name", default="hotswap", help="name of the swapped plan (default hotswap)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="report folder (default loadtests/results)")
    parser.add_argument("--name", default="hotswap", help="file name prefix of the reports (default hotswap)")
    return parser


def _wait_while_loading(locust: LocustRun, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if locust.process.poll() is not None:
            raise LoadTestError(f"locust stopped early (status {locust.process.returncode}); see {locust.log_path}")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _wait_for_traffic(locust: LocustRun, response_log: Path, responses: int, timeout_s: float = 300) -> None:
    """Wait until Locust has its users running and responses are coming back (its start-up, drawing
    the image pool, takes a few seconds, much longer on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while not (response_log.is_file() and response_log.read_text().count("\n") >= responses):
        if time.monotonic() > deadline:
            raise LoadTestError(f"no traffic after {timeout_s:.0f} s; see {locust.log_path}")
        _wait_while_loading(locust, 0.5)


def warm_up(service: RunningService, locust: LocustRun, min_s: float, max_s: float, window_s: float = 30,
            settled: float = 0.01, interval_s: float = 5) -> dict[str, Any]:
    """Serve the load until worker memory has settled: at least ``min_s``, then until RSS grew by at
    most ``settled`` (1%) over the last ``window_s`` seconds, at most ``max_s``. Under this mix the
    workers' RSS climbs for a few minutes (allocator growth over the varied input shapes, smaller since
    the workers trim their heaps), so a baseline taken earlier would blame that on the swaps."""
    started, samples = time.monotonic(), []
    while True:
        _wait_while_loading(locust, min(interval_s, max(0.5, max_s - (time.monotonic() - started))))
        elapsed = time.monotonic() - started
        samples.append((elapsed, service.worker_rss_bytes()))
        earlier = [rss for at, rss in samples if at <= elapsed - window_s]
        if elapsed >= min_s and earlier and samples[-1][1] <= earlier[-1] * (1 + settled):
            return {"seconds": round(elapsed, 1), "settled": True}
        if elapsed >= max_s:
            return {"seconds": round(elapsed, 1), "settled": False}


def run_scenario(service: RunningService, store: Path, work: Path, token: str, args: argparse.Namespace,
                 response_log: Path, summary: Summary) -> tuple[SwapDriver, PlanTimeline]:
    timeline = PlanTimeline(args.lag)
    overview = http_get_json(f"{service.url}/plans/")["tasks"]
    for entry in overview.values():
        for plan in entry["plans"]:
            timeline.loaded(plan, -math.inf, time.time())
            if plan["active"]:
                timeline.activated(plan, -math.inf, time.time())
    tasks = [task for task in overview if (store / task).is_dir()]  # served tasks that have plans to swap
    driver = SwapDriver(AdminClient(service.url, token), timeline, store, work, args.plan_name, args.dwell, tasks)
    locust = LocustRun.start(service.url, args.users, args.spawn_rate, args.out / args.name,
                             env={"LOADTEST_WEIGHTS": weights_text(args.weights), "LOADTEST_RESPONSE_LOG": str(response_log)})
    rss: dict[str, Any] = {}
    try:
        _wait_for_traffic(locust, response_log, args.users)
        print(f"warming up: load until worker memory settles ({args.warmup:g}-{args.warmup_max:g} s)", file=sys.stderr)
        rss["warmup"] = warm_up(service, locust, args.warmup, max(args.warmup, args.warmup_max))
        for _ in tqdm(range(args.warmup_swaps), desc="warm-up swaps"):
            driver.swap()
        rss["start_bytes"] = service.median_worker_rss_bytes()
        series = []
        for _ in tqdm(range(args.swaps), desc="swaps under load"):
            driver.swap()
            series.append(service.worker_rss_bytes())
            if locust.process.poll() is not None:
                raise LoadTestError(f"locust stopped early (status {locust.process.returncode}); see {locust.log_path}")
        _wait_while_loading(locust, args.lag)  # every worker has followed the last rollback
        rss["end_bytes"] = service.median_worker_rss_bytes()
        rss["series_mb"] = [round(b / 2**20, 1) for b in series]
    finally:
        locust.stop()
    problem = locust.failed_to_start()
    if problem:
        raise LoadTestError(problem)
    summary.locust = locust.summary()
    summary.details["rss"] = rss
    return driver, timeline


def judge(summary: Summary, args: argparse.Namespace, driver: SwapDriver, timeline: PlanTimeline,
          response_log: Path) -> None:
    """Turn what was measured into the pass/fail checks."""
    add_locust_checks(summary, endpoints_in_mix(args.weights))
    calls = driver.admin.calls
    summary.check("every admin call succeeded", not driver.problems and bool(calls),
                  f"{len(calls)} calls ({', '.join(f'{n} {op}' for op, n in sorted(Counter(c.operation for c in calls).items()))}) "
                  f"in {driver.swaps} swaps" + (f"; problems: {driver.problems[:3]}" if driver.problems else ""))
    responses = check_responses(response_log, timeline, args.plan_name)
    outside = responses["outside_window"]
    aggregated = summary.locust["aggregated"]
    succeeded = aggregated["requests"] - aggregated["failures"]
    summary.check("every response reports a plan version inside the expected window",
                  responses["checked"] == succeeded > 0 and not outside,
                  f"{responses['checked']} of {succeeded} successful responses checked, {len(outside)} outside "
                  f"(active at some moment in [start - {args.lag:g} s, end]); "
                  f"{responses['served_by_swapped_versions']} served by swapped-in versions"
                  + (f"; first: {outside[:2]}" if outside else ""))
    rss = summary.details["rss"]
    change = rss["end_bytes"] / rss["start_bytes"] - 1
    rss["change"] = round(change, 4)
    summary.check(f"worker memory back within {args.rss_tolerance:.0%} after {args.swaps} swaps",
                  abs(change) <= args.rss_tolerance,
                  f"RSS {rss['start_bytes'] / 2**20:.1f} MiB after warm-up, {rss['end_bytes'] / 2**20:.1f} MiB at the end "
                  f"({change:+.1%}); warm-up {rss['warmup']['seconds']:g} s, memory "
                  + ("settled" if rss["warmup"]["settled"] else "still climbing when it ended"))
    summary.details["responses"] = {**responses, "outside_window": outside[:20]}
    summary.details["admin_calls"] = [dataclasses.asdict(c) for c in calls]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stop_on_sigterm()
    if not args.plans.is_dir():
        parser.error(f"--plans {args.plans} is not a directory")
    settings = {"swaps": args.swaps, "warmup_swaps": args.warmup_swaps, "warmup_s": f"{args.warmup:g}-{args.warmup_max:g}",
                "dwell_s": args.dwell,
                "users": args.users, "spawn_rate": args.spawn_rate, "workers": args.workers, "lag_s": args.lag,
                "rss_tolerance": args.rss_tolerance, "weights": weights_text(args.weights)}
    summary = Summary("hotswap", settings)
    args.out.mkdir(parents=True, exist_ok=True)
    response_log = args.out / f"{args.name}-responses.jsonl"
    response_log.unlink(missing_ok=True)
    token = secrets.token_urlsafe(24)  # this run's admin token; the service is on localhost only
    backbone = {"DAS_BACKBONE": str(args.plans / "backbone")} if (args.plans / "backbone").is_dir() else {}
    with tempfile.TemporaryDirectory(prefix="das-hotswap-") as tmp:
        store = copy_store(args.plans, Path(tmp) / "plans")  # admin calls write here, never into the repository
        work = Path(tmp) / "archives"
        work.mkdir()
        try:
            with running_service(args.out / f"{args.name}-service.log", workers=args.workers,
                                 ready_timeout_s=args.ready_timeout, DAS_PLANS=str(store),
                                 DAS_ADMIN_TOKEN=token, **backbone) as service:
                driver, timeline = run_scenario(service, store, work, token, args, response_log, summary)
        except LoadTestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    judge(summary, args, driver, timeline, response_log)
    summary.check("service stopped cleanly", bool(service.stopped_cleanly),
                  "SIGTERM stopped bentoml serve and its workers" if service.stopped_cleanly else "it needed SIGKILL")
    json_path, md_path = summary.write(args.out, args.name)
    print(summary.to_markdown())
    print(f"reports: {args.out / args.name}.html, {json_path}, {md_path}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
