"""`make loadtest`: start the service, run the Locust scenarios against it for a bounded time, write
Locust's CSV/HTML reports and a short summary, stop the service.

    python -m loadtests.run --users 6 --spawn-rate 2 --duration 30s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from loadtests.harness import (
    DEFAULT_RESULTS, LoadTestError, LocustRun, Summary, add_locust_checks, duration_seconds, endpoints_in_mix,
    local_url, positive_float, positive_int, running_service, stop_on_sigterm, user_count,
    weights_argument, weights_text,
)
from loadtests.payloads import DEFAULT_WEIGHTS

EPILOG = """\
Writes into --out (default loadtests/results/):
  NAME.html, NAME.json, NAME_stats.csv, NAME_stats_history.csv, NAME_failures.csv  (Locust's reports)
  NAME-summary.json, NAME-summary.md   requests, failures, p50/p95/p99/max latency and req/s per endpoint; checks
  NAME-service.log, NAME-locust.log     the service's and Locust's output

Exit status: 0 when every request succeeded, Locust raised no errors and every endpoint in the mix was hit, 1 otherwise,
2 for bad arguments or when the service or Locust could not start.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="Load-test DAS Serve with the Locust scenarios of loadtests/locustfile.py: start the service "
                    "(bentoml serve service.service:DASService, the embedded default, on a free localhost port), "
                    "run a bounded headless load, write reports and a summary, stop the service.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=user_count, default=6, help="simulated users (1-64; default 6)")
    parser.add_argument("--spawn-rate", type=positive_float, default=2.0, help="users started per second (default 2)")
    parser.add_argument("--duration", type=duration_seconds, default=30,
                        help="how long the load runs: 30s, 2m, 1m30s (at most 30 min; default 30s)")
    parser.add_argument("--weights", type=weights_argument, default=weights_argument(DEFAULT_WEIGHTS),
                        help=f"endpoint weights, 0 leaves one out (default {DEFAULT_WEIGHTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image pool and of each user's requests")
    parser.add_argument("--workers", type=positive_int, default=1, help="BentoML worker processes of the service started (default 1)")
    parser.add_argument("--ready-timeout", type=positive_float, default=300,
                        help="seconds the started service may take to answer /readyz (default 300)")
    parser.add_argument("--host", type=local_url, default=None,
                        help="load a service already running on this machine (e.g. http://localhost:3000) "
                             "instead of starting one")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="report folder (default loadtests/results)")
    parser.add_argument("--name", default="loadtest", help="file name prefix of the reports (default loadtest)")
    return parser


def run_load(host: str, args: argparse.Namespace) -> LocustRun:
    """Run Locust for --duration with a progress bar; Ctrl-C stops it early (the reports are still written)."""
    locust = LocustRun.start(host, args.users, args.spawn_rate, args.out / args.name, run_time_s=args.duration,
                             env={"LOADTEST_WEIGHTS": weights_text(args.weights), "LOADTEST_SEED": str(args.seed)})
    try:
        with tqdm(total=args.duration, unit="s", desc=f"load ({args.users} users)") as bar:
            started = time.monotonic()
            while locust.process.poll() is None and bar.n < args.duration:
                time.sleep(1)
                bar.update(min(args.duration, int(time.monotonic() - started)) - bar.n)
        locust.wait(timeout_s=300)  # its start-up, then requests in flight finish after the run time
    except KeyboardInterrupt:
        print("interrupted: stopping Locust, the reports cover the run so far", file=sys.stderr)
    finally:
        if locust.process.poll() is None:
            locust.stop()
    problem = locust.failed_to_start()
    if problem:
        raise LoadTestError(problem)
    return locust


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    settings = {"users": args.users, "spawn_rate": args.spawn_rate, "duration_s": args.duration,
                "weights": weights_text(args.weights), "seed": args.seed}
    summary = Summary("loadtest", settings)
    try:
        if args.host:
            locust = run_load(args.host, args)
            summary.details["service"] = {"url": args.host, "started_here": False}
        else:
            settings["workers"] = args.workers
            with running_service(args.out / f"{args.name}-service.log", workers=args.workers,
                                 ready_timeout_s=args.ready_timeout) as service:
                locust = run_load(service.url, args)
            summary.details["service"] = {"url": service.url, "started_here": True, "log": str(service.log_path),
                                          "stopped_cleanly": service.stopped_cleanly}
        summary.locust = locust.summary()
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    add_locust_checks(summary, endpoints_in_mix(args.weights))
    if summary.details["service"]["started_here"]:
        stopped = summary.details["service"]["stopped_cleanly"]
        summary.check("service stopped cleanly", bool(stopped),
                      "SIGTERM stopped bentoml serve and its workers" if stopped else "it needed SIGKILL")
    json_path, md_path = summary.write(args.out, args.name)
    print(summary.to_markdown())
    print(f"reports: {args.out / args.name}.html, {json_path}, {md_path}")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    sys.exit(main())
