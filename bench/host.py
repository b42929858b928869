"""What the benchmark scripts record about the machine they run on, and how busy it is (Linux /proc)."""

from __future__ import annotations

import os
import platform
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown CPU"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def ram_gib() -> float | None:
    """Total memory in GiB (one decimal) from /proc/meminfo, or None."""
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def host_facts() -> dict:
    """CPU model, cores, memory, kernel and Python version: the keys every bench JSON records."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine_line() -> str:
    """The machine in one line for a log and a results file: CPU, cores, Python and the load at start."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {load:.1f} at start"
    )


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot, all cores (from /proc/stat: user, nice,
    system, irq, softirq, steal; guest time is already in user)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def busy_cores(seconds: float = 2.0) -> float:
    """Cores in use on the machine over the next `seconds` (this process sleeps meanwhile)."""
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (busy_cpu_seconds() - busy0) / (time.perf_counter() - t0)


def wait_for_quiet(below: float, max_wait: float, window: float = 2.0) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until the machine uses fewer than `below` cores over `window` s, so that a
    run on a shared machine starts in a lull rather than in the middle of someone else's job; returns (seconds
    waited, busy cores of the last window)."""
    t0 = time.perf_counter()
    while True:
        cores = busy_cores(window)
        waited = time.perf_counter() - t0
        if cores < below or waited >= max_wait:
            return waited, cores
