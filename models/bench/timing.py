"""Timing forward passes on a shared machine: interleaved rounds, other processes' CPU use read from
/proc/stat (busy rounds replaced), medians, quartiles and a bootstrap interval of the efficiency, and
what the machine is."""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def efficiency_interval(
    full: list[float], plan: list[float], flops_saved: float, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """90% bootstrap interval of the efficiency: resample the timed rounds (each round timed the
    full plan and this plan alike, so they are resampled in pairs) and take the 5th and 95th
    percentiles of (1 - median(plan) / median(full)) / flops_saved."""
    n = len(full)
    if n < 3 or len(plan) != n or flops_saved <= 0:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratio = statistics.median(plan[i] for i in picks) / statistics.median(full[i] for i in picks)
        values.append((1 - ratio) / flops_saved)
    values.sort()
    return [round(values[int(0.05 * (resamples - 1))], 3), round(values[int(0.95 * (resamples - 1))], 3)]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuMonitor:
    """CPU time used by *other* processes while a run is timed: all CPUs' busy time from
    /proc/stat (steal included) minus this process's own CPU time. On a quiet machine it is ~0;
    where it is not, the latencies are inflated and noisy. Linux only (None elsewhere)."""

    def __init__(self) -> None:
        self.available = Path("/proc/stat").is_file()
        self.ticks = os.sysconf("SC_CLK_TCK") if self.available else 100

    def sample(self) -> tuple[float, float]:
        """(seconds all CPUs were busy since boot, seconds this process has used)."""
        own = os.times()
        if not self.available:
            return 0.0, own.user + own.system
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / self.ticks, own.user + own.system


@dataclass
class Timing:
    seconds: list[float]  # wall time of each kept timed run
    others_cpu_seconds: float = 0.0  # CPU time other processes used during those runs


@dataclass
class RoundLog:
    """What happened at one batch size: timed rounds run, and which were kept."""

    rounds_run: int
    kept: list[int]  # indices of the kept rounds, in the order they ran
    others_cpu: list[float]  # per timed round: share of all CPUs other processes used
    busy: list[bool]  # per timed round: above --max-others-cpu (beyond clock-tick rounding)

    @property
    def kept_busy(self) -> int:
        return sum(self.busy[r] for r in self.kept)


def time_round_robin(
    forwards: list[Callable[[], Any]], device: torch.device, warmup: int, repeats: int, progress, monitor: CpuMonitor,
    max_others_cpu: float = 1.0, extra_rounds: int = 0,
) -> tuple[list[Timing], RoundLog]:
    """Time each forward: ``warmup`` untimed rounds, then timed rounds; every round runs each
    forward once, starting one later each round.

    A timed round in which other processes used more than ``max_others_cpu`` of all CPUs is busy:
    while fewer than ``repeats`` rounds are clean, another round is run, at most ``extra_rounds``
    more. The ``repeats`` rounds with the least such load are kept (whole rounds, so every plan is
    measured under the same conditions). The garbage collector is off meanwhile (as in timeit)."""
    n = len(forwards)
    cpus = os.cpu_count() or 1
    seconds: list[list[float]] = []  # per timed round, per forward: wall seconds
    others: list[list[float]] = []  # per timed round, per forward: CPU seconds other processes used
    rounds: list[tuple[float, float]] = []  # per timed round: (others' CPU seconds, wall seconds)
    # /proc/stat and os.times() count in clock ticks: forgive two ticks of rounding per round
    slack = 2.0 / monitor.ticks

    def share(r: int) -> float:
        return rounds[r][0] / (rounds[r][1] * cpus)

    def busy(r: int) -> bool:
        return rounds[r][0] - slack > max_others_cpu * rounds[r][1] * cpus

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        round_index = 0
        while True:
            timed = round_index >= warmup
            if timed:
                clean = sum(not busy(r) for r in range(len(rounds)))
                if clean >= repeats or len(rounds) >= repeats + extra_rounds:
                    break
                if len(rounds) >= repeats:  # an extra round, to replace a busy one
                    progress.total += n
                    progress.refresh()
            round_seconds, round_others = [0.0] * n, [0.0] * n
            round_cpu_before, round_own_before = monitor.sample()
            round_started = time.perf_counter()
            for k in range(n):
                i = (round_index + k) % n
                _synchronize(device)
                busy_before, own_before = monitor.sample()
                started = time.perf_counter()
                forwards[i]()
                _synchronize(device)
                round_seconds[i] = time.perf_counter() - started
                busy_after, own_after = monitor.sample()
                round_others[i] = max(0.0, (busy_after - busy_before) - (own_after - own_before))
                progress.update(1)
            round_wall = time.perf_counter() - round_started
            busy_after, own_after = monitor.sample()
            if timed:
                seconds.append(round_seconds)
                others.append(round_others)
                rounds.append((max(0.0, (busy_after - round_cpu_before) - (own_after - round_own_before)), round_wall))
            round_index += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    kept = sorted(sorted(range(len(rounds)), key=lambda r: (busy(r), share(r)))[:repeats])
    timings = [Timing([seconds[r][i] for r in kept], sum(others[r][i] for r in kept)) for i in range(n)]
    return timings, RoundLog(
        len(rounds), kept, [round(share(r), 4) for r in range(len(rounds))], [busy(r) for r in range(len(rounds))]
    )


