"""Processes for tests and benchmarks: running the CLI, waiting for a started process without guessing times,
killing a process tree, and watching a process tree's memory and CPU from /proc.

Plain functions (no pytest), so that bench/ can use them too (bench scripts put tests/ on sys.path). Linux
only: everything about other processes is read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

HANG_GUARD_S = 300.0
"""The longest a test waits for something that takes well under a second to a few seconds (a handshake, a
condition, processes exiting). Only a hung or broken process ever reaches it: tests wait for events and
conditions, never for an amount of time, so a busy machine only makes them slower."""

# a glibc tunable at its default value, a user setting: mmcl leaves the allocator as it is (mmcl.host_memory)
MALLOC_AS_IS = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
ADDRESS_IN_USE = ("eaddrinuse", "address already in use")
LAUNCH_HANG_GUARD_S = 1800.0  # a whole 2-process training run on a loaded machine: minutes, never this long


def run_mmcl(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would (in the repository root unless `cwd` is given);
    `check`: fail unless it exits 0."""
    kwargs.setdefault("cwd", REPO)
    result = subprocess.run(
        [sys.executable, "-m", "mmcl", *map(str, args)], capture_output=True, text=True, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mmcl {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    return result


# ------------------------------------------------------------------------------------------ waiting


class Handshake:
    """A pipe that a process started by a test writes a line to when it reaches the point the test waits for
    (a stuck worker, a run paused at a known step), so the test acts at that point instead of after a guessed
    time or on a file it polls for.

    Give the process `fd` (``pass_fds=[handshake.fd]``; children forked from it inherit it), call `started()`
    once it runs, then `wait(n)` for its first n lines. When every process that could write has ended first
    (end of file) the test fails at once, saying so; the hang guard only ends a wait for a hung process."""

    def __init__(self) -> None:
        self.read_fd, self.fd = os.pipe()
        self._write_open = True
        self._buffer = b""

    def __enter__(self) -> Handshake:
        return self

    def __exit__(self, *exc) -> None:
        self.started()
        os.close(self.read_fd)

    def started(self) -> None:
        """The process holds its own copy of the write end: close ours, so end of file means it is gone."""
        if self._write_open:
            os.close(self.fd)
            self._write_open = False

    def wait(self, lines: int = 1, timeout: float = HANG_GUARD_S) -> list[str]:
        give_up = time.monotonic() + timeout
        while self._buffer.count(b"\n") < lines:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, give_up - time.monotonic()))
            if not ready:
                raise AssertionError(
                    f"hang guard: no handshake in {timeout:.0f} s (so far: {self._buffer!r})"
                )
            chunk = os.read(self.read_fd, 4096)
            if not chunk:
                raise AssertionError(f"the process ended before its handshake (so far: {self._buffer!r})")
            self._buffer += chunk
        parts = self._buffer.split(b"\n")
        self._buffer = b"\n".join(parts[lines:])
        return [line.decode() for line in parts[:lines]]


def wait_until(
    condition: Callable[[], bool],
    what: str,
    proc: subprocess.Popen | None = None,
    timeout: float = HANG_GUARD_S,
) -> None:
    """Wait until `condition()` holds, with no deadline a busy machine could miss (only the hang guard);
    fails at once when `proc` has exited without it."""
    give_up = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None and not condition():
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > give_up:
            raise AssertionError(f"hang guard: still not {what} after {timeout:.0f} s")
        time.sleep(0.01)


# `accelerate launch` options for N processes on this machine's CPU (gloo), before `--num_processes N -m mmcl`
CPU_LAUNCH = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def free_port() -> int:
    """A TCP port the kernel has just handed out on 127.0.0.1 (free now; see accelerate_launch)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(*args: str, port: int) -> list[str]:
    """`accelerate launch --main_process_port PORT ARGS` (its options, then ``-m mmcl ...``)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port), *args]


def mmcl_command(processes: int, *args: str) -> list[str]:
    """`mmcl ARGS` on `processes` CPU processes: a plain `python -m mmcl`, or through `accelerate launch`
    (gloo; run it with `cpu_launch_env`)."""
    if processes == 1:
        return [sys.executable, "-m", "mmcl", *map(str, args)]
    launch = (*CPU_LAUNCH, "--num_processes", str(processes), "-m", "mmcl", *map(str, args))
    return accelerate_command(*launch, port=free_port())


def cpu_launch_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for processes started by `accelerate launch` on the CPU, talking over the loopback interface."""
    return {**env, "ACCELERATE_USE_CPU": "true", "GLOO_SOCKET_IFNAME": "lo"}


def run_mmcl_on(processes: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`mmcl ARGS` on `processes` CPU processes (`run_mmcl`, or `accelerate_launch` for 2 or more); fails
    unless it exits 0."""
    if processes == 1:
        return run_mmcl(*args, env=env)
    launch = (*CPU_LAUNCH, "--num_processes", str(processes), "-m", "mmcl", *map(str, args))
    result = accelerate_launch(*launch, env={**env, "ACCELERATE_USE_CPU": "true"})
    if result.returncode != 0:
        raise AssertionError(
            f"mmcl {' '.join(map(str, args))} on {processes} processes: {result.stderr[-3000:]}"
        )
    return result


def accelerate_launch(
    *args: str, env: dict[str, str], attempts: int = 5, timeout: float = LAUNCH_HANG_GUARD_S
) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` (its options, then ``-m mmcl ...``) with a rendezvous port of its own.

    accelerate takes the port as a number and torchrun's TCP store binds it later, so the port cannot be bound
    by us and handed over: a port the kernel has just handed out (bound to port 0, then closed) is free, but
    another process (a concurrent test run) may bind it first. That clash cannot pass unnoticed (TCP stores
    do not share a port; the store fails with EADDRINUSE in the launcher, before any worker exists or any
    file is written), so exactly that failure is retried on a fresh port; any other outcome is returned.
    GLOO_SOCKET_IFNAME=lo: gloo uses the loopback interface instead of resolving the machine's host name."""
    env = {**env, "GLOO_SOCKET_IFNAME": "lo"}
    for _ in range(attempts):
        command = accelerate_command(*args, port=free_port())
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
        if result.returncode == 0 or not any(sign in result.stderr.lower() for sign in ADDRESS_IN_USE):
            return result
    return result


# ------------------------------------------------------------------------------------------ process trees


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first); None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z...), None when it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, parents before their children. Read from every process's
    /proc/PID/stat, which holds its parent (a process's own children files are only exact while its children
    are stopped)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user + system CPU s of the process, of the children it has reaped); zeros when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0, 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def system_and_faults(pid: int) -> tuple[float, int]:
    """(system CPU s, minor page faults) of the process itself; zeros when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0, 0
    return int(fields[12]) / CLK_TCK, int(fields[7])


def kill9(proc: subprocess.Popen, whole_group: bool, grace: float = HANG_GUARD_S) -> list[int]:
    """SIGKILL the process (or its whole process group) and wait until its descendants have exited too;
    returns those still running `grace` s later (orphans), which are then killed (they are ours). The wait
    ends as soon as the last one is gone: `grace` only bounds how long an orphan is waited for."""
    children = descendants(proc.pid)
    if whole_group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()
    give_up = time.monotonic() + grace
    while time.monotonic() < give_up and any(process_state(c) not in (None, "Z") for c in children):
        time.sleep(0.02)
    orphans = [c for c in children if process_state(c) not in (None, "Z")]
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return orphans


def _memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, None for a process that is gone or has no memory any more (a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, number, _unit = line.split()
            values[key[:-1]] = int(number) * 1024
    return (values["VmRSS"], values["VmHWM"]) if "VmRSS" in values else None


def _pss(pid: int) -> int:
    """Proportional set size in bytes (pages shared with other processes divided among them), 0 when gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Watches a process and all its descendants from /proc every `interval` s, from `start()` to `stop()`
    (or as a context manager around the wait for the process).

    Memory: `main_hwm`, the root process's VmHWM (its peak RSS, tracked by the kernel: exact);
    `main_rss_peak`, its largest VmRSS in one sample; `tree_rss_peak`, the largest sum of VmRSS over the tree
    in one sample (pages shared copy-on-write count once per process, so it overstates real use);
    `tree_pss_peak`, the same for PSS (shared pages divided among their processes), read every `pss_every`-th
    sample (0: never: it is the costly read); `child_hwm`, the VmHWM of every descendant seen;
    `max_processes`, the most live processes in one sample.

    Progress: with `progress` (a function returning the run's current step, or None), every sample that sees
    a higher step appends (perf_counter time, step, CPU s of the root, CPU s of the tree) to `events`, the
    bench's own clock for a steady state. With `kill_above` (bytes), the process group is killed with SIGKILL
    the first time `tree_rss_peak` exceeds it, and `killed` is set."""

    def __init__(
        self,
        pid: int,
        interval: float = 0.05,
        *,
        pss_every: int = 0,
        progress: Callable[[], int | None] | None = None,
        kill_above: int | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.progress, self.kill_above = progress, kill_above
        self.main_hwm = self.main_rss_peak = self.tree_rss_peak = self.tree_pss_peak = 0
        self.child_hwm: dict[int, int] = {}
        self.max_processes = 0
        self.samples = 0
        # (time, step, main CPU s, tree CPU s, main system CPU s, main minor page faults)
        self.events: list[tuple[float, int, float, float, float, int]] = []
        self.killed = False
        self._halt = threading.Event()

    def __enter__(self) -> TreeMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """End the sampling and wait for the thread."""
        self._halt.set()
        self.join()

    def sample(self) -> None:
        now = time.perf_counter()
        pids = [self.pid, *descendants(self.pid)]
        memory = {pid: mem for pid in pids if (mem := _memory(pid)) is not None}
        for pid, (rss, hwm) in memory.items():
            if pid == self.pid:
                self.main_hwm = max(self.main_hwm, hwm)
                self.main_rss_peak = max(self.main_rss_peak, rss)
            else:
                self.child_hwm[pid] = max(self.child_hwm.get(pid, 0), hwm)
        self.tree_rss_peak = max(self.tree_rss_peak, sum(rss for rss, _ in memory.values()))
        self.max_processes = max(self.max_processes, len(memory))
        if self.pss_every and self.samples % self.pss_every == 0:
            self.tree_pss_peak = max(self.tree_pss_peak, sum(_pss(pid) for pid in pids))
        if self.progress is not None:
            self._record_progress(now, pids)
        if self.kill_above is not None and self.tree_rss_peak > self.kill_above and not self.killed:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.samples += 1

    def _record_progress(self, now: float, pids: list[int]) -> None:
        step = self.progress()
        if step is not None and (not self.events or step > self.events[-1][1]):
            own, reaped = cpu_seconds(self.pid)
            tree = own + reaped + sum(cpu_seconds(pid)[0] for pid in pids[1:])
            system, faults = system_and_faults(self.pid)
            self.events.append((now, step, own, tree, system, faults))
