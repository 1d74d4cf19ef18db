"""What the load-test scripts share: a real `bentoml serve` started and stopped, Locust run headless
against it, Locust's CSV turned into a summary (JSON + markdown) with pass/fail checks."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil

from loadtests.payloads import ENDPOINT_TASKS, parse_weights

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
DEFAULT_RESULTS = REPO / "loadtests" / "results"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Bounds on what these scripts will run: they are for a developer machine or CI, not a stress rig.
MAX_USERS = 64
MAX_DURATION_S = 1800


class LoadTestError(RuntimeError):
    """The load test could not run (the service did not start, Locust failed to start...)."""


# -- command-line argument types -----------------------------------------------------------------
def duration_seconds(text: str) -> int:
    """argparse type: "45", "45s", "2m", "1m30s" -> seconds, at most MAX_DURATION_S."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 2m or 1m30s, got {text!r}")
    seconds = int(match.group(1) or 0) * 60 + int(match.group(2) or 0)
    if not 1 <= seconds <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"duration must be between 1 s and {MAX_DURATION_S} s, got {text!r}")
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def user_count(text: str) -> int:
    """argparse type: simulated users, 1..MAX_USERS."""
    value = positive_int(text)
    if value > MAX_USERS:
        raise argparse.ArgumentTypeError(f"users must be between 1 and {MAX_USERS}, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def local_url(text: str) -> str:
    """argparse type: an http URL on this machine (the scripts never load a remote host)."""
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOCAL_HOSTS:
        raise argparse.ArgumentTypeError(f"expected http://localhost:PORT or http://127.0.0.1:PORT, got {text!r}")
    return text.rstrip("/")


def stop_on_sigterm() -> None:
    """Let SIGTERM (from `timeout`, CI, a supervisor) unwind like an exception, so that the service
    and Locust, which run in their own process groups, are still stopped."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


# -- the service -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen
    log_path: Path
    stopped_cleanly: bool | None = None  # set once it has been stopped

    def worker_processes(self) -> list[psutil.Process]:
        """BentoML's worker processes (children of the `bentoml serve` process)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def worker_rss_bytes(self) -> int:
        """Resident memory summed over every worker process."""
        total = 0
        for process in self.worker_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def median_worker_rss_bytes(self, samples: int = 5, interval_s: float = 0.5) -> int:
        """A steadier reading than one sample: RSS moves with requests in flight."""
        readings = []
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            readings.append(self.worker_rss_bytes())
        return int(statistics.median(readings))


def http_get_json(url: str, timeout_s: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        if process.poll() is not None or time.monotonic() > deadline:
            why = "exited" if process.poll() is not None else f"was not ready after {timeout_s:.0f} s"
            raise LoadTestError(f"bentoml serve {why}; the end of {log_path}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_tree(process: subprocess.Popen, timeout_s: float = 60) -> bool:
    """SIGTERM the `bentoml serve` process (it stops its workers, which run their shutdown hooks);
    SIGKILL its process group only if something is still there ``timeout_s`` later. True when it
    stopped cleanly."""
    deadline = time.monotonic() + timeout_s
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
    while True:  # the workers may outlive their parent by a moment
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return False
        time.sleep(0.2)
    process.wait()
    return True


@contextlib.contextmanager
def running_service(log_path: Path, workers: int = 1, ready_timeout_s: float = 180,
                    **settings: str) -> Iterator[RunningService]:
    """Run `bentoml serve service.service:DASService` on a free localhost port with DAS_* ``settings``
    (the embedded default when none are given); yield once /readyz answers; stop it on exit."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true", DAS_WORKERS=str(workers), **settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "bentoml"), "serve", "service.service:DASService", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches this script, which stops it in order
        )
        service = RunningService(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_ready(service.url, process, log_path, ready_timeout_s)
            yield service
        finally:
            service.stopped_cleanly = stop_process_tree(process)
            if not service.stopped_cleanly:
                print(f"note: bentoml serve needed SIGKILL to stop (see {log_path})", file=sys.stderr)


# -- Locust ----------------------------------------------------------------------------------------
@dataclass
class LocustRun:
    """A headless Locust process writing ``<prefix>_stats.csv`` etc. and ``<prefix>.html``."""

    process: subprocess.Popen
    prefix: Path
    log_path: Path

    @classmethod
    def start(cls, host: str, users: int, spawn_rate: float, prefix: Path, run_time_s: int | None = None,
              env: dict[str, str] | None = None) -> LocustRun:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        command = [str(VENV_BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", host,
                   "-u", str(users), "-r", str(spawn_rate), "--csv", str(prefix), "--html", f"{prefix}.html",
                   "--json-file", str(prefix),  # the final stats (Locust appends .json)
                   "--stop-timeout", "60",  # a stop lets requests in flight finish, so none is cut and miscounted
                   "--only-summary"]
        if run_time_s is not None:
            command += ["-t", f"{run_time_s}s"]
        log_path = prefix.with_name(prefix.name + "-locust.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **(env or {})),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(process, prefix, log_path)

    def stop(self, timeout_s: float = 90) -> int:
        """Ask Locust to finish (SIGTERM: it stops its users, then writes the CSV and HTML reports).
        Not SIGINT: after a few minutes of load, Locust 2.47 sometimes never acted on it (no
        "Shutting down" logged, reports never written), where its own SIGTERM handler always runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise LoadTestError(f"locust did not finish within {timeout_s:.0f} s; see {self.log_path}") from None

    def summary(self) -> dict[str, Any]:
        """Once it has finished: ``summarize_locust`` plus its exit status."""
        return {**summarize_locust(self.prefix), "exit_code": self.process.returncode}

    def failed_to_start(self) -> str | None:
        if self.process.poll() is not None and not Path(f"{self.prefix}.json").is_file():
            return f"locust exited with status {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}"
        return None


def response_time_percentile(response_times: dict[int, int], count: int, fraction: float) -> int:
    """The response time ``fraction`` of the requests finished within, computed as Locust computes it
    (its CSV and HTML show the same numbers) from its histogram {rounded ms: requests}."""
    wanted, seen = int(count * fraction), 0
    for response_time in sorted(response_times, reverse=True):
        seen += response_times[response_time]
        if count - seen <= wanted:
            return response_time
    return 0


def _latency_entry(response_times: dict[int, int], requests: int, failures: int, total_ms: float,
                   max_ms: float, seconds: float) -> dict[str, Any]:
    return {
        "requests": requests, "failures": failures,
        **{f"p{round(q * 100)}_ms": response_time_percentile(response_times, requests, q) if requests else None
           for q in (0.5, 0.95, 0.99)},
        "max_ms": round(max_ms, 1) if requests else None,
        "mean_ms": round(total_ms / requests, 1) if requests else None,
        "rps": round(requests / seconds, 3),
    }


def summarize_locust(prefix: Path) -> dict[str, Any]:
    """Per endpoint and overall: requests, failures, p50/p95/p99/max and mean latency (ms), req/s.

    Read from Locust's final JSON stats (``--json-file``), written after its users stopped; its
    ``_stats.csv`` is rewritten once a second and can miss the last requests. Percentiles are
    approximate: Locust keeps response times rounded to 2 significant digits."""
    stats_path = Path(f"{prefix}.json")
    if not stats_path.is_file():
        raise LoadTestError(f"Locust wrote no {stats_path}")
    entries = [e for e in json.loads(stats_path.read_text()) if e["num_requests"] or e["num_failures"]]
    if not entries:
        return {"endpoints": {}, "aggregated": {"requests": 0, "failures": 0}, "errors": []}
    # req/s over the whole run, as Locust reports it: first request to last request
    seconds = max(1.0, max(e["last_request_timestamp"] or 0 for e in entries) - min(e["start_time"] for e in entries))
    endpoints, histogram = {}, Counter()
    for e in entries:
        times = {int(float(k)): v for k, v in e["response_times"].items()}
        histogram.update(times)
        endpoints[e["name"]] = _latency_entry(times, e["num_requests"], e["num_failures"], e["total_response_time"],
                                              e["max_response_time"], seconds)
    aggregated = _latency_entry(dict(histogram), sum(e["num_requests"] for e in entries),
                                sum(e["num_failures"] for e in entries), sum(e["total_response_time"] for e in entries),
                                max(e["max_response_time"] for e in entries), seconds)
    errors = []
    failures_path = Path(f"{prefix}_failures.csv")
    if failures_path.is_file():
        with open(failures_path, newline="") as f:
            errors = [{"endpoint": r["Name"], "error": r["Error"], "occurrences": int(r["Occurrences"])}
                      for r in csv.DictReader(f)]
    return {"endpoints": dict(sorted(endpoints.items())), "aggregated": aggregated, "errors": errors}


# -- the summary ------------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a load-test run reports: settings, Locust's numbers, and the checks that decide pass/fail."""

    scenario: str
    settings: dict[str, Any]
    locust: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["passed"] for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "passed": self.passed, "settings": self.settings, **self.locust,
                "checks": self.checks, **self.details}

    def to_markdown(self) -> str:
        lines = [f"# {self.scenario}: {'PASS' if self.passed else 'FAIL'}", "",
                 "Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), ""]
        if self.locust.get("endpoints"):
            lines += ["| endpoint | requests | failures | p50 ms | p95 ms | p99 ms | max ms | req/s |",
                      "|---|--:|--:|--:|--:|--:|--:|--:|"]
            rows = [*sorted(self.locust["endpoints"].items()), ("all", self.locust["aggregated"])]
            for name, e in rows:
                cells = [e["requests"], e["failures"], *(_ms(e[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
                         f"{e['rps']:.2f}"]
                lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
            lines += ["", "Latencies are Locust's (approximate: rounded to 2 significant digits).", ""]
        lines += ["Checks:", ""] + [f"- [{'x' if c['passed'] else ' '}] {c['name']}: {c['detail']}" for c in self.checks]
        for error in self.locust.get("errors", [])[:10]:
            lines.append(f"- failure on {error['endpoint']} ({error['occurrences']}x): {error['error'][:300]}")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path, name: str) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out_dir / f"{name}-summary.json", out_dir / f"{name}-summary.md"
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md_path.write_text(self.to_markdown())
        return json_path, md_path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def add_locust_checks(summary: Summary, expected_endpoints: list[str]) -> None:
    """The checks every scenario makes: no failed request, Locust ran without errors, every endpoint in
    the mix was hit."""
    aggregated = summary.locust.get("aggregated") or {}
    failures = aggregated.get("failures", 0)
    summary.check("zero failed requests", aggregated.get("requests", 0) > 0 and failures == 0,
                  f"{aggregated.get('requests', 0)} requests, {failures} failed")
    exit_code = summary.locust.get("exit_code")
    summary.check("Locust finished without errors", exit_code == 0,
                  f"exit status {exit_code}" + ("" if exit_code == 0 else
                                                 " (failed requests or exceptions in the users: see the *_exceptions.csv"
                                                 " and *-locust.log)"))
    hit = {name for name, e in summary.locust.get("endpoints", {}).items() if e["requests"] > 0}
    missing = [e for e in expected_endpoints if e not in hit]
    summary.check("every endpoint in the mix was hit", not missing,
                  "all of " + ", ".join(expected_endpoints) if not missing else "not hit: " + ", ".join(missing))


def endpoints_in_mix(weights: dict[str, int]) -> list[str]:
    """The routes a weight mix (``payloads.parse_weights``) sends requests to."""
    return [ENDPOINT_TASKS[name] for name, weight in weights.items() if weight > 0]


def weights_argument(text: str) -> dict[str, int]:
    """argparse type for --weights (the locustfile's LOADTEST_WEIGHTS format)."""
    try:
        return parse_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def weights_text(weights: dict[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights.items())
