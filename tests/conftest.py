"""Shared fixtures: small real datasets written in tmp folders (real JPEG/PNG/WAV files), and the helpers that
keep tests which start processes or servers independent of the machine's load and environment."""

from __future__ import annotations

import contextlib
import csv
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 160),
    "orange": (240, 140, 20),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_image(path: Path, colour: str, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    """A real image file: a coloured square with some texture so JPEG sizes vary."""
    rng = np.random.default_rng(seed)
    base = np.array(RGB[colour], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-20, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_tone(path: Path, freq: float, seconds: float = 0.5, rate: int = 22050, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, data, rate)
    return path


@pytest.fixture
def image_csv(tmp_path: Path) -> Path:
    """A CSV manifest of 40 real images (JPEG and PNG) with captions naming their colour."""
    root = tmp_path / "images_in"
    rows = []
    for i in range(40):
        colour = COLOURS[i % len(COLOURS)]
        ext = "jpg" if i % 3 else "png"
        make_image(root / "img" / f"{i:03d}.{ext}", colour, size=(64 + i, 48 + i), seed=i)
        rows.append({"filepath": f"img/{i:03d}.{ext}", "caption": f"a {colour} square number {i}"})
    manifest = root / "pairs.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["filepath", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run_mmcl(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    result = subprocess.run(
        [sys.executable, "-m", "mmcl", *map(str, args)], capture_output=True, text=True, cwd=REPO, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mmcl {' '.join(map(str, args))} exited {result.returncode}\n{result.stderr}")
    return result


SHAPES = ["square", "circle", "triangle", "cross"]


def make_shape(path: Path, colour: str, shape: str, seed: int, size: int = 48) -> Path:
    """A real picture of a coloured shape on a grey textured background, slightly jittered."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    background = np.clip(128 + rng.integers(-25, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    c = size // 2 + int(rng.integers(-4, 5))
    r = size // 3 + int(rng.integers(-3, 4))
    fill = RGB[colour]
    if shape == "square":
        draw.rectangle([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=fill)
    else:
        w = max(2, r // 3)
        draw.rectangle([c - r, c - w, c + r, c + w], fill=fill)
        draw.rectangle([c - w, c - r, c + w, c + r], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_shapes_manifest(root: Path, count: int, seed: int = 0) -> Path:
    """`count` pictures of 8 colours x 4 shapes with captions naming both (32 distinct captions)."""
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        make_shape(root / f"{i:05d}.png", colour, shape, seed=seed * 100003 + i)
        rows.append(f"{i:05d}.png,a {colour} {shape}\n")
    manifest = root / "pairs.csv"
    manifest.write_text("path,caption\n" + "".join(rows))
    return manifest


# ------------------------------------------------------------------------------------------ timing, processes

HANG_GUARD_S = 300.0
"""The longest a test waits for something that takes well under a second to a few seconds (a handshake, a
condition, processes exiting). Only a hung or broken process ever reaches it: tests wait for events and
conditions, never for an amount of time, so a busy machine only makes them slower."""


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


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return None


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill9(proc: subprocess.Popen, whole_group: bool, grace: float = HANG_GUARD_S) -> list[int]:
    """SIGKILL the process (or its whole process group) and wait until its descendants have exited too; returns
    those still running `grace` s later (orphans), which are then killed (they are ours). The wait ends as
    soon as the last one is gone: `grace` only bounds how long an orphan is waited for."""
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


# ------------------------------------------------------------------------------------------ network


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every proxy setting (http_proxy, HTTPS_PROXY, all_proxy, no_proxy, ...: any *_proxy in any case,
    which is what urllib and curl read) from this test's environment, so that requests to a server on 127.0.0.1
    go straight to it whatever the user's environment says. Child processes inherit the change. urlopen's
    global opener keeps the proxies of the environment it was first used in (perhaps by an earlier test in
    this process): it is dropped too, so the next urlopen builds one from the cleared environment."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(urllib.request, "_opener", None)


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxies(monkeypatch)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for as long as it is held: bound but not listening, so no
    other process can bind it (a port merely found free a moment ago could be taken and answer)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


ADDRESS_IN_USE = ("eaddrinuse", "address already in use")
LAUNCH_HANG_GUARD_S = 1800.0  # a whole 2-process training run on a loaded machine: minutes, never this long


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
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--main_process_port",
            str(port),
            *args,
        ]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
        if result.returncode == 0 or not any(sign in result.stderr.lower() for sign in ADDRESS_IN_USE):
            return result
    return result
