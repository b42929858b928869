"""Side-by-side benchmark of `mmcl shard`: speed and memory against the library limit and img2dataset.

Run from the repository root with the project venv:

    .venv/bin/python bench/shard_bench.py                       # everything, 3 interleaved repeats
    .venv/bin/python bench/shard_bench.py --only image audio    # some sections
    .venv/bin/python bench/shard_bench.py --skip-img2dataset    # without the .bench-venv comparison

Sections (each timing is one whole process, start to finish, wall clock, like a user's command):

  image   `mmcl shard image-text --workers 2` on COUNT local 512x512 JPEGs (-> 256, keep ratio, q95) vs the
          "library limit": a minimal Pillow pipeline (open, draft, convert, resize, JPEG encode) run by a
          multiprocessing Pool of 2 over the same files, with none of mmcl's checks and no output written.
  url     the same files served on 127.0.0.1 by nginx (when installed: apt-get install nginx-light) or a
          Python ThreadingHTTPServer (--url-server python): mmcl vs img2dataset 1.47 (from .bench-venv) with
          the same settings, side by side against the same server.
  audio   `mmcl shard audio-text --sample-rate 16000 --workers 2` on AUDIO_COUNT 5 s stereo 44.1 kHz WAVs vs
          the library limit of bench/encode_limits.py (soundfile decode, mono, torchaudio resample, FLAC
          encode) run by a Pool of 2.
  memory  mmcl on COUNT and 10 x COUNT 64x64 JPEGs: peak RSS of the main process and of the process tree.

Every run is watched from a thread that samples /proc every 50 ms (VmRSS, VmHWM of the process and all its
descendants), and the CPU time the rest of the machine used meanwhile is computed from /proc/stat, so a
result taken on a busy shared machine says so. Generated inputs are cached under --work-dir (default
bench/out/, git-ignored). Results: a table on stdout and WORK_DIR/results.json.

This is a measurement, not a test: the only checks are sanity checks (every side produced the same number
of samples, `mmcl shard verify` accepts mmcl's output); a failed check makes the exit status 1.
"""

from __future__ import annotations

import sys

# ------------------------------------------------------------------------------------------------------
# The library-limit workers. They run as `python shard_bench.py _limit image|audio ...` in their own
# process so that they are timed whole, like mmcl; this branch is taken before any other import so the
# image limit pays for Pillow's import only (bench/encode_limits.py imports torch for the audio limit).


def _image_limit_bytes(data: bytes, image_size: int, quality: int) -> bytes:
    """The operations of bench/encode_limits.image_limit (the parent checks that the output is identical)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    scale = image_size / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    img.draft("RGB", size)
    img = img.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _image_limit_one(args: tuple[str, int, int]) -> int:
    """Read one file and encode it; returns the encoded size (nothing is written)."""
    path, image_size, quality = args
    with open(path, "rb") as f:
        return len(_image_limit_bytes(f.read(), image_size, quality))


def _audio_limit_one(args: tuple[str, int]) -> int:
    from encode_limits import audio_limit  # bench/ is on sys.path in the limit process

    path, sample_rate = args
    with open(path, "rb") as f:
        return len(audio_limit(f.read(), sample_rate))


def _one_thread() -> None:
    """Each worker is one of the 2 lanes: torch must not start its own threads in it (it defaults to one per
    core, and 2 x 2 spinning OpenMP threads on 2 cores make the audio limit ~5x slower than mmcl, which pins
    torch to 1 thread per worker in shards_tools/distribute.py)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _limit_main(argv: list[str]) -> None:
    """`_limit KIND LISTFILE WORKERS PARAM...`: encode every file of LISTFILE, print {"count", "bytes"}."""
    import json
    import multiprocessing
    import os

    kind, list_file, workers = argv[0], argv[1], int(argv[2])
    with open(list_file, encoding="utf-8") as f:
        paths = f.read().split("\n")
    if kind == "image":
        from PIL import Image  # noqa: F401  (imported once in the parent, inherited by the forked workers)

        func, tasks = _image_limit_one, [(p, int(argv[3]), int(argv[4])) for p in paths]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import encode_limits  # noqa: F401  (torch, torchaudio, soundfile: imported before the fork)

        func, tasks = _audio_limit_one, [(p, int(argv[3])) for p in paths]
    chunk = max(1, min(64, len(tasks) // (8 * workers)))
    with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        sizes = list(pool.imap_unordered(func, tasks, chunksize=chunk))
    print(json.dumps({"count": len(sizes), "bytes": sum(sizes)}))


if __name__ == "__main__" and sys.argv[1:2] == ["_limit"]:
    _limit_main(sys.argv[2:])
    sys.exit(0)

# ------------------------------------------------------------------------------------------------------

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host import busy_cpu_seconds, host_facts, wait_for_quiet  # noqa: E402
from processes import TreeMonitor, cpu_seconds, descendants  # noqa: E402

DATA_VERSION = 1  # bump when the generators change, so cached inputs are rebuilt
IMAGE_SIZE, QUALITY, SAMPLE_RATE = 256, 95, 16000
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- data


def _upsampled_noise(rng: np.random.Generator, grid: int, size: int, channels: int = 3) -> np.ndarray:
    """Smooth random field: a grid x grid random image upsampled with bicubic interpolation, in [-1, 1]."""
    small = rng.uniform(-1, 1, (grid, grid, channels)).astype(np.float32)
    planes = [
        np.asarray(Image.fromarray(small[:, :, c], "F").resize((size, size), Image.Resampling.BICUBIC))
        for c in range(channels)
    ]
    return np.stack(planes, axis=-1)


def photo_like(seed: int, size: int) -> Image.Image:
    """A deterministic photo-like RGB image: smooth colour regions, a lighting gradient, oriented texture,
    a few hard-edged shapes and sensor-like noise (so JPEG sizes and decode work are those of photos,
    unlike flat colours)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, math.pi)
    light = np.cos(angle) * xx + np.sin(angle) * yy
    base = rng.uniform(40, 200, 3).astype(np.float32)
    img = base + 60 * _upsampled_noise(rng, 4, size) + 25 * _upsampled_noise(rng, 24, size)
    img += (70 * (light - 0.5))[..., None]
    freq, theta = rng.uniform(8, 40), rng.uniform(0, math.pi)
    texture = np.sin(2 * math.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy))
    mask = _upsampled_noise(rng, 6, size, 1)[..., 0] > 0.2
    img += (12 * texture * mask)[..., None]
    shapes = Image.new("RGB", (size, size))  # a few hard-edged objects, shaded and noisy like the rest
    alpha = Image.new("L", (size, size))
    draw, draw_alpha = ImageDraw.Draw(shapes), ImageDraw.Draw(alpha)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * size
        w, h = rng.uniform(0.05, 0.4, 2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + w, y0 + h]
        shape = "ellipse" if rng.random() < 0.5 else "rectangle"
        getattr(draw, shape)(box, fill=colour)
        getattr(draw_alpha, shape)(box, fill=255)
    a = np.asarray(alpha, np.float32)[..., None] / 255
    shaded = np.asarray(shapes, np.float32) + (40 * (light - 0.5))[..., None]
    img = img * (1 - a) + shaded * a
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    return pil


def _write_image(args: tuple[str, int, int]) -> None:
    path, seed, size = args
    img = photo_like(seed, size)
    if size <= 64:  # small images: keep them cheap to make, still not flat
        img = img.filter(ImageFilter.SMOOTH)
    img.save(path, "JPEG", quality=QUALITY)


def _write_wav(args: tuple[str, int]) -> None:
    import soundfile as sf

    path, seed = args
    rng = np.random.default_rng(seed)
    rate, seconds = 44100, 5.0
    t = np.arange(int(rate * seconds), dtype=np.float64) / rate
    channels = []
    for _ in range(2):
        sig = np.zeros_like(t)
        for _ in range(3):
            f0, amp = rng.uniform(80, 4000), rng.uniform(0.05, 0.2)
            envelope = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(0.2, 3) * t + rng.uniform(0, 6.3))
            sig += amp * envelope * np.sin(2 * math.pi * f0 * t + rng.uniform(0, 6.3))
        sig += rng.normal(0, 0.03, t.shape)
        channels.append(sig)
    sf.write(path, np.clip(np.stack(channels, axis=1), -1, 1), rate, subtype="PCM_16", format="WAV")


def ensure_dataset(root: Path, kind: str, count: int, pool) -> list[Path]:
    """Create (or reuse) COUNT inputs of `kind` (img512, img64, wav) under root/kind; returns their paths.
    Files are named by index, so a larger count reuses a smaller one's files."""
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "_version.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("version") != DATA_VERSION:
        for old in folder.iterdir():
            old.unlink()
        stamp.write_text(json.dumps({"version": DATA_VERSION}))
    ext = "wav" if kind == "wav" else "jpg"
    paths = [folder / f"{i:06d}.{ext}" for i in range(count)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"generating {len(todo)} {kind} files in {folder} ...", flush=True)
        if kind == "wav":
            tasks = [(str(paths[i]), 10_000_000 + i) for i in todo]
            pool.map(_write_wav, tasks, chunksize=8)
        else:
            size = 512 if kind == "img512" else 64
            tasks = [(str(paths[i]), i, size) for i in todo]
            pool.map(_write_image, tasks, chunksize=32)
    return paths


def write_manifest(path: Path, sources: list[str], column: str = "path") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([column, "caption"])
        for i, source in enumerate(sources):
            writer.writerow([source, f"a synthetic test picture number {i}"])
    return path


# ----------------------------------------------------------------------------------- measuring runs


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a long-running process and its descendants (nginx: the master and its worker)."""
    return sum(cpu_seconds(p)[0] for p in [pid, *descendants(pid)])


@dataclass
class Run:
    label: str
    command: list[str]
    wall_s: float
    returncode: int
    tree_cpu_s: float  # user+sys of the process and its reaped descendants (wait4)
    other_cpu_s: float  # CPU used meanwhile by everything else on the machine (other users), server excluded
    server_cpu_s: float  # CPU used meanwhile by the benchmark's HTTP server, if any
    load_before: tuple[float, float, float]
    main_peak_rss: int
    tree_peak_rss: int  # largest simultaneous sum of RSS (shared pages counted in every process)
    largest_child_peak_rss: int
    kernel_maxrss: int  # wait4's ru_maxrss: the largest single-process peak in the tree
    processes: int
    samples: int
    count: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def other_load(self) -> float:
        return self.other_cpu_s / self.wall_s if self.wall_s else 0.0


def timed_run(
    label: str,
    command: list[str],
    log: Path,
    options: Options,
    *,
    env: dict | None = None,
    server_pid: int | None = None,
) -> Run:
    """Run `command` once (whole process, start to finish) while watching its memory and the machine; first
    wait (up to --max-wait s) for a lull; under `taskset -c` with --client-cpus."""
    busy_before = None
    if options.max_wait > 0:
        busy_before = wait_for_quiet(options.quiet_threshold, options.max_wait)[1]
    load_before = os.getloadavg()
    busy0, self0 = busy_cpu_seconds(), time.process_time()
    server0 = _tree_cpu_seconds(server_pid) if server_pid else 0.0
    if options.client_cpus:
        command = ["taskset", "-c", options.client_cpus, *command]
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with TreeMonitor(proc.pid) as monitor:  # every 50 ms
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    busy = busy_cpu_seconds() - busy0
    own = time.process_time() - self0
    server = (_tree_cpu_seconds(server_pid) - server0) if server_pid else 0.0
    tree_cpu = usage.ru_utime + usage.ru_stime
    run = Run(
        label=label,
        command=command,
        wall_s=wall,
        returncode=proc.returncode,
        tree_cpu_s=tree_cpu,
        other_cpu_s=max(0.0, busy - tree_cpu - own - server),
        server_cpu_s=server,
        load_before=load_before,
        main_peak_rss=monitor.main_hwm,
        tree_peak_rss=monitor.tree_rss_peak,
        largest_child_peak_rss=max(monitor.child_hwm.values(), default=0),
        kernel_maxrss=usage.ru_maxrss * 1024,
        processes=monitor.max_processes,
        samples=monitor.samples,
    )
    run.extra["busy_cores_before"] = busy_before
    if run.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        print(f"!! {label} exited {run.returncode}; log {log}:\n{tail}", file=sys.stderr)
    return run


def describe_load(run: Run) -> str:
    before = run.extra.get("busy_cores_before")
    quiet = "" if before is None else f"busy {before:.2f} cores just before, "
    return f"load avg {run.load_before[0]:.2f}, {quiet}others used {run.other_load:.2f} cores during"


# ------------------------------------------------------------------------------------- the sides


class Bench:
    def __init__(self, options: Options):
        self.options = options
        self.work = Path(options.work_dir).resolve()
        self.data = self.work / "data"
        self.runs_dir = self.work / "runs"
        self.logs = self.work / "logs"
        for d in (self.data, self.runs_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        self.mmcl = [str(bindir / "mmcl")] if (bindir / "mmcl").exists() else [sys.executable, "-m", "mmcl"]
        self.img2dataset = options.img2dataset
        self.problems: list[str] = []
        self.results: dict[str, dict] = {}
        self.counter = 0

    # -- helpers

    def fresh_dir(self, name: str) -> Path:
        path = self.runs_dir / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def log(self, name: str) -> Path:
        self.counter += 1
        return self.logs / f"{self.counter:03d}-{name}.log"

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)
            print(f"!! sanity check failed: {message}", file=sys.stderr)

    def mmcl_image(self, manifest: Path, out: Path, image_size: int = IMAGE_SIZE) -> list[str]:
        return [
            *self.mmcl,
            "shard",
            "image-text",
            "--input",
            str(manifest),
            "--output",
            str(out),
            "--image-size",
            str(image_size),
            "--resize-mode",
            "keep-ratio-largest",
            "--quality",
            str(QUALITY),
            "--workers",
            str(self.options.workers),
            "--shard-size",
            str(self.options.shard_size),
        ]

    def mmcl_samples(self, out: Path) -> int | None:
        try:
            return json.loads((out / "manifest.json").read_text())["totals"]["samples"]
        except (OSError, ValueError, KeyError):
            return None

    def verify(self, out: Path, expected: int, label: str) -> str:
        result = subprocess.run(
            [*self.mmcl, "shard", "verify", str(out)], capture_output=True, text=True, cwd=REPO
        )
        summary = (result.stdout + result.stderr).strip().splitlines()
        line = summary[0] if summary else f"exit {result.returncode}"
        self.check(result.returncode == 0, f"{label}: mmcl shard verify {out}: {line}")
        self.check(
            self.mmcl_samples(out) == expected,
            f"{label}: {self.mmcl_samples(out)} samples, expected {expected}",
        )
        return line

    def limit(self, kind: str, files: list[Path], params: list[int], label: str) -> Run:
        list_file = self.work / f"{kind}-{len(files)}.list"
        list_file.write_text("\n".join(str(p) for p in files), encoding="utf-8")
        command = [sys.executable, str(Path(__file__).resolve()), "_limit", kind, str(list_file),
                   str(self.options.workers), *(str(p) for p in params)]  # fmt: skip
        log = self.log(label)
        run = timed_run(label, command, log, self.options)
        try:
            run.count = json.loads(log.read_text().strip().splitlines()[-1])["count"]
        except (ValueError, IndexError, KeyError):
            run.count = None
        self.check(run.count == len(files), f"{label}: encoded {run.count} of {len(files)}")
        return run

    def alternate(self, count: int, sides: list) -> list[list[Run]]:
        """Run the sides alternately, reversing the order every round, so drift in the machine's load falls
        on both sides alike. A round in which other processes used more than --quiet-threshold cores during
        any run is set aside and repeated, up to --max-rounds rounds; the kept rounds are returned (all rounds
        if fewer than `count` were quiet, and then the summary says the machine was shared)."""
        kept: list[list[Run]] = [[] for _ in sides]
        every: list[list[Run]] = [[] for _ in sides]
        self.last_discarded = []
        rounds = 0
        while len(kept[0]) < count and rounds < max(count, self.options.max_rounds):
            order = list(range(len(sides))) if rounds % 2 == 0 else list(reversed(range(len(sides))))
            round_runs: dict[int, Run] = {}
            for i in order:
                run = sides[i](rounds)
                round_runs[i] = run
                every[i].append(run)
                print(
                    f"   {run.label:<28} {run.wall_s:7.2f} s  {run.tree_cpu_s:6.2f} CPU s  "
                    f"{describe_load(run)}",
                    flush=True,
                )
            rounds += 1
            if all(r.other_load <= self.options.quiet_threshold for r in round_runs.values()):
                for i, run in round_runs.items():
                    kept[i].append(run)
            else:
                self.last_discarded.extend(asdict(r) for r in round_runs.values())
                print("   (round set aside: other processes were busy during it)", flush=True)
        if len(kept[0]) < count:
            print(f"   only {len(kept[0])} quiet round(s) of {rounds}: reporting all rounds", flush=True)
            self.last_discarded = []
            return every
        return kept

    def summarise(self, name: str, runs: list[Run], count: int, unit: str) -> dict:
        walls = [r.wall_s for r in runs]
        med = statistics.median(walls)
        return {
            "name": name,
            "command": " ".join(runs[-1].command),
            "count": count,
            "unit": unit,
            "wall_s": walls,
            "median_s": med,
            "rate_median": count / med,
            "rate_best": count / min(walls),
            "other_load_cores": [round(r.other_load, 3) for r in runs],
            "quiet": all(r.other_load <= self.options.quiet_threshold for r in runs),
            "load_before": [r.load_before[0] for r in runs],
            "tree_cpu_s": [round(r.tree_cpu_s, 3) for r in runs],
            "tree_cpu_median_s": statistics.median(r.tree_cpu_s for r in runs),
            "main_peak_rss_mib": max(r.main_peak_rss for r in runs) / MiB,
            "tree_peak_rss_mib": max(r.tree_peak_rss for r in runs) / MiB,
            "largest_child_peak_rss_mib": max(r.largest_child_peak_rss for r in runs) / MiB,
            "runs": [asdict(r) for r in runs],
        }

    def versus_limit(
        self,
        name: str,
        files: list[Path],
        limit_args: list,
        command,
        count: int,
        limit_label: str,
        mmcl_label: str,
        unit: str,
    ) -> None:
        """Alternate the library limit and `mmcl shard` (`command(out)`) on the same files, verify mmcl's
        output and record both and their ratio (target 0.70) under results[name]."""

        def limit_side(r: int) -> Run:
            return self.limit(name, files, limit_args, f"{name}-limit-{r}")

        def mmcl_side(r: int) -> Run:
            out = self.fresh_dir(f"{name}-mmcl")
            run = timed_run(f"{name}-mmcl-{r}", command(out), self.log(f"{name}-mmcl-{r}"), self.options)
            run.count = self.mmcl_samples(out)
            self.check(run.count == count, f"{name}-mmcl-{r}: {run.count} samples, expected {count}")
            return run

        limit_runs, mmcl_runs = self.alternate(self.options.repeat, [limit_side, mmcl_side])
        verified = self.verify(self.runs_dir / f"{name}-mmcl", count, f"{name}-mmcl")
        lim = self.summarise(limit_label, limit_runs, count, unit)
        mm = self.summarise(mmcl_label, mmcl_runs, count, unit)
        mm["verify"] = verified
        self.results[name] = {
            "discarded_runs": self.last_discarded,
            "limit": lim,
            "mmcl": mm,
            "ratio": mm["rate_median"] / lim["rate_median"],
            "target": 0.70,
        }

    # -- sections

    def image_section(self, pool) -> None:
        count = self.options.count
        files = ensure_dataset(self.data, "img512", count, pool)
        self.check_limit_equals_reference(files[0])
        manifest = write_manifest(self.work / f"img512-{count}.csv", [str(p) for p in files])
        print(
            f"== image: {count} local 512x512 JPEGs -> {IMAGE_SIZE}, q{QUALITY}, "
            f"{self.options.workers} processes"
        )

        self.versus_limit(
            "image",
            files,
            [IMAGE_SIZE, QUALITY],
            lambda out: self.mmcl_image(manifest, out),
            count,
            "library limit (Pillow draft pipeline, Pool(2))",
            "mmcl shard image-text (local files)",
            "images/s",
        )

    def check_limit_equals_reference(self, sample: Path) -> None:
        """The inline image limit must do exactly what bench/encode_limits.image_limit does."""
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from encode_limits import image_limit
        except ImportError as err:
            print(f"(bench/encode_limits.py not importable, limit not cross-checked: {err})")
            return
        data = sample.read_bytes()
        self.check(_image_limit_bytes(data, IMAGE_SIZE, QUALITY) == image_limit(data, IMAGE_SIZE, QUALITY),
                   "inline image limit differs from bench/encode_limits.image_limit")  # fmt: skip

    def url_section(self, pool) -> None:
        count = self.options.count
        files = ensure_dataset(self.data, "img512", count, pool)
        use_i2d = not self.options.skip_img2dataset
        if use_i2d and not self.img2dataset.exists():
            print(f"!! {self.img2dataset} not found: create it with python3 -m venv .bench-venv && "
                  ".bench-venv/bin/pip install img2dataset==1.47, or pass --skip-img2dataset")  # fmt: skip
            self.check(False, f"img2dataset missing at {self.img2dataset}")
            use_i2d = False
        latency = self.options.url_latency_ms
        kind = self.options.url_server
        if kind == "auto":
            kind = "nginx" if shutil.which("nginx") and not latency else "python"
        server, base = start_server(
            kind, files[0].parent, latency, self.work / "nginx", self.options.server_cpus
        )
        try:
            urls = [f"{base}/{p.name}" for p in files]
            manifest = write_manifest(self.work / f"urls-{count}.csv", urls, column="url")
            pinning = f", server on CPUs {self.options.server_cpus}" if self.options.server_cpus else ""
            pinning += f", sides on CPUs {self.options.client_cpus}" if self.options.client_cpus else ""
            print(f"== url: {count} JPEGs from {base} ({kind} server, pid {server.pid}, {latency:g} ms added "
                  f"latency per request{pinning}), same settings")  # fmt: skip

            def mmcl_side(r: int) -> Run:
                out = self.fresh_dir("url-mmcl")
                run = timed_run(
                    f"url-mmcl-{r}",
                    self.mmcl_image(manifest, out),
                    self.log(f"url-mmcl-{r}"),
                    self.options,
                    server_pid=server.pid,
                )
                run.count = self.mmcl_samples(out)
                self.check(run.count == count, f"url-mmcl-{r}: {run.count} samples, expected {count}")
                return run

            def i2d_side(r: int) -> Run:
                out = self.fresh_dir("url-img2dataset")
                command = [
                    str(self.img2dataset),
                    "--url_list",
                    str(manifest),
                    "--input_format",
                    "csv",
                    "--url_col",
                    "url",
                    "--caption_col",
                    "caption",
                    "--output_folder",
                    str(out),
                    "--output_format",
                    "webdataset",
                    "--image_size",
                    str(IMAGE_SIZE),
                    "--resize_mode",
                    "keep_ratio_largest",
                    "--encode_quality",
                    str(QUALITY),
                    "--processes_count",
                    str(self.options.workers),
                    "--thread_count",
                    str(self.options.thread_count),
                    "--number_sample_per_shard",
                    "1000",
                    "--enable_wandb",
                    "False",
                ]
                # no albumentations update check over the (absent) network at import time
                env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
                run = timed_run(
                    f"url-img2dataset-{r}",
                    command,
                    self.log(f"url-img2dataset-{r}"),
                    self.options,
                    env=env,
                    server_pid=server.pid,
                )
                run.count = count_tar_members(out, ".jpg")
                self.check(run.count == count, f"url-img2dataset-{r}: {run.count} images, expected {count}")
                return run

            sides = [mmcl_side, i2d_side] if use_i2d else [mmcl_side]
            runs = self.alternate(self.options.repeat, sides)
        finally:
            server.terminate()
            server.wait()
        verified = self.verify(self.runs_dir / "url-mmcl", count, "url-mmcl")
        mm = self.summarise("mmcl shard image-text (127.0.0.1 URLs)", runs[0], count, "images/s")
        mm["verify"] = verified
        mm["server_cpu_s"] = [round(r.server_cpu_s, 3) for r in runs[0]]
        section = {
            "mmcl": mm,
            "target": 3.0,
            "latency_ms": latency,
            "server": kind,
            "server_cpus": self.options.server_cpus,
            "client_cpus": self.options.client_cpus,
            "discarded_runs": self.last_discarded,
        }
        if use_i2d:
            i2d = self.summarise(
                f"img2dataset 1.47 (thread_count {self.options.thread_count})", runs[1], count, "images/s"
            )
            i2d["server_cpu_s"] = [round(r.server_cpu_s, 3) for r in runs[1]]
            section["img2dataset"] = i2d
            section["ratio"] = mm["rate_median"] / i2d["rate_median"]
        self.results["url"] = section

    def audio_section(self, pool) -> None:
        count = self.options.audio_count
        files = ensure_dataset(self.data, "wav", count, pool)
        manifest = write_manifest(self.work / f"wav-{count}.csv", [str(p) for p in files])
        print(
            f"== audio: {count} WAVs (5 s, stereo, 44.1 kHz) -> mono {SAMPLE_RATE} Hz FLAC, "
            f"{self.options.workers} processes"
        )

        def command(out: Path) -> list[str]:
            return [*self.mmcl, "shard", "audio-text", "--input", str(manifest), "--output", str(out),
                    "--sample-rate", str(SAMPLE_RATE), "--workers", str(self.options.workers),
                    "--shard-size", str(self.options.shard_size)]  # fmt: skip

        self.versus_limit(
            "audio",
            files,
            [SAMPLE_RATE],
            command,
            count,
            "library limit (soundfile+torchaudio, Pool(2))",
            "mmcl shard audio-text (local files)",
            "clips/s",
        )

    def memory_section(self, pool) -> None:
        small, large = self.options.count, 10 * self.options.count
        files = ensure_dataset(self.data, "img64", large, pool)
        print(f"== memory: mmcl on {small} and {large} 64x64 JPEGs (same command, -> {IMAGE_SIZE})")
        section = {}
        for n in (small, large):
            manifest = write_manifest(self.work / f"img64-{n}.csv", [str(p) for p in files[:n]])
            out = self.fresh_dir(f"memory-{n}")
            run = timed_run(f"memory-mmcl-{n}", self.mmcl_image(manifest, out), self.log(f"memory-mmcl-{n}"),
                            self.options)  # fmt: skip
            run.count = self.mmcl_samples(out)
            print(
                f"   {run.label:<28} {run.wall_s:7.2f} s  main {run.main_peak_rss / MiB:.0f} MiB, tree "
                f"{run.tree_peak_rss / MiB:.0f} MiB, largest worker {run.largest_child_peak_rss / MiB:.0f} "
                f"MiB; {describe_load(run)}",
                flush=True,
            )
            summary = self.summarise(f"mmcl shard image-text, {n} 64x64 images", [run], n, "images/s")
            summary["verify"] = self.verify(out, n, f"memory-{n}")
            section[str(n)] = summary
            shutil.rmtree(out, ignore_errors=True)
        a, b = section[str(small)], section[str(large)]
        section["growth"] = {
            "main_peak_rss": b["main_peak_rss_mib"] / a["main_peak_rss_mib"],
            "tree_peak_rss": b["tree_peak_rss_mib"] / a["tree_peak_rss_mib"],
        }
        self.results["memory"] = section


def start_server(
    kind: str, folder: Path, latency_ms: float, work: Path, cpus: str | None = None
) -> tuple[subprocess.Popen, str]:
    """Serve `folder` on 127.0.0.1: "nginx" (a real web server, sendfile, one worker: what answers a crawler,
    and cheap enough not to take the client's cores) or "python" (ThreadingHTTPServer; supports
    --url-latency-ms), under `taskset -c CPUS` when given. Returns the server process and the base URL."""
    pin = ["taskset", "-c", cpus] if cpus else []
    if kind == "python":
        server = subprocess.Popen([*pin, sys.executable, "-c", SERVER_CODE, str(folder), str(latency_ms)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        return server, f"http://127.0.0.1:{int(server.stdout.readline())}"
    if latency_ms:
        raise SystemExit("--url-latency-ms needs --url-server python (nginx adds no delay)")
    if not shutil.which("nginx"):
        raise SystemExit("nginx not found: apt-get install nginx-light, or pass --url-server python")
    with socket.socket() as probe:  # a free port (nginx cannot report the one it bound)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (work / "temp").mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the files a root run wrote
    temp = " ".join(
        f"{name}_temp_path {work}/temp/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (work / "nginx.conf").write_text(f"""{user} worker_processes 1; daemon off; pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nodelay on; keepalive_requests 1000000; \
default_type image/jpeg; {temp}
  server {{ listen 127.0.0.1:{port}; root {folder}; }} }}
""")
    server = subprocess.Popen([*pin, "nginx", "-p", str(work), "-c", str(work / "nginx.conf")])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nginx did not start; see {work}/error.log") from None
            time.sleep(0.05)


SERVER_CODE = r"""
import functools, sys, time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
DELAY = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
class Quiet(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as web servers and CDNs allow (clients may still close)
    # TCP_NODELAY, as nginx's default tcp_nodelay (else kept-alive replies stall)
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
    def do_GET(self):
        if DELAY:
            time.sleep(DELAY)  # --url-latency-ms: a stand-in for a remote server's round trip
        super().do_GET()
server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=sys.argv[1]))
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def count_tar_members(folder: Path, suffix: str) -> int:
    count = 0
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            count += sum(1 for m in tar if m.name.endswith(suffix))
    return count


# ---------------------------------------------------------------------------------------- reporting


def machine_info(options: Options) -> dict:
    import PIL
    from PIL import features

    info = {
        "code": code_state(),
        "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
        **host_facts(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "load_at_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
    }
    for module in ("soundfile", "torch", "torchaudio", "webdataset"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional, reporting only
            info[module] = None
    pyc = os.environ.get("PYTHONDONTWRITEBYTECODE")
    info["PYTHONDONTWRITEBYTECODE"] = pyc
    if options.img2dataset.exists():
        out = subprocess.run(
            [
                str(options.img2dataset.parent / "python"),
                "-c",
                "import importlib.metadata as m, cv2; print(m.version('img2dataset'), cv2.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        info["img2dataset_opencv"] = out.stdout.strip() or out.stderr.strip()[-200:]
    return info


def code_state() -> dict:
    """Which code was measured: the commit, the files under test that differ from it, and a hash of their
    content (the working tree is shared, so the code can change while the benchmark runs)."""
    import hashlib

    def git(*cmd: str) -> str:
        result = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO)
        return result.stdout.rstrip()

    digest = hashlib.sha256()
    for folder in ("mmcl", "shards_tools", "pipelines"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": git("status", "--porcelain", "--", "mmcl", "shards_tools", "pipelines").splitlines(),
        "source_sha256": digest.hexdigest()[:16],
    }


def fmt_mib(value: float) -> str:
    return f"{value:,.0f}"


def table(results: dict) -> str:
    rows = [
        (
            "side",
            "median s",
            "rate/s (best)",
            "ratio",
            "target",
            "CPU s",
            "main peak MiB",
            "tree peak MiB",
            "others' cores",
        )
    ]

    def row(s: dict, ratio: str = "", target: str = "") -> None:
        loads = s["other_load_cores"]
        rows.append(
            (
                s["name"],
                f"{s['median_s']:.2f}",
                f"{s['rate_median']:,.0f} ({s['rate_best']:,.0f})",
                ratio,
                target,
                f"{s['tree_cpu_median_s']:.2f}",
                fmt_mib(s["main_peak_rss_mib"]),
                fmt_mib(s["tree_peak_rss_mib"]),
                f"{min(loads):.2f}-{max(loads):.2f}",
            )
        )

    for key, reference in (("image", "limit"), ("audio", "limit"), ("url", "img2dataset")):
        if key not in results:
            continue
        sec = results[key]
        if reference in sec:
            row(sec[reference], "1.00")
        ratio = sec.get("ratio")
        met = "" if ratio is None else ("met" if ratio >= sec["target"] else "NOT met")
        target = f">= {sec['target']:g}{'x' if key == 'url' else ''} {met}".strip()
        row(sec["mmcl"], "" if ratio is None else f"{ratio:.2f}", target)
    if "memory" in results:
        mem = results["memory"]
        for key, s in mem.items():
            if key != "growth":
                row(s)
        g = mem["growth"]
        rows.append(
            (
                f"memory growth for 10x input: main x{g['main_peak_rss']:.2f}, tree "
                f"x{g['tree_peak_rss']:.2f}",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class Options:
    """The command line, read once by main()."""

    count: int
    audio_count: int
    work_dir: Path
    repeat: int
    workers: int
    shard_size: int
    thread_count: int
    img2dataset: Path
    skip_img2dataset: bool
    url_server: str
    url_latency_ms: float
    server_cpus: str | None
    client_cpus: str | None
    only: tuple[str, ...]
    quiet_threshold: float
    max_rounds: int
    max_wait: float
    json: Path | None


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--count",
        type=int,
        default=2000,
        help="512x512 JPEGs for the image and url sections; "
        "the memory section uses COUNT and 10 x COUNT 64x64 JPEGs",
    )
    parser.add_argument("--audio-count", type=int, default=500, help="5 s stereo 44.1 kHz WAV files")
    parser.add_argument(
        "--work-dir", type=Path, default=REPO / "bench" / "out", help="generated data, outputs, logs"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--workers", type=int, default=2, help="processes on every side")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="mmcl's --shard-size (its default, 1000; "
        "with fewer shards than workers mmcl splits them into pieces across the workers)",
    )
    parser.add_argument("--thread-count", type=int, default=16, help="img2dataset --thread_count")
    parser.add_argument("--img2dataset", default=str(REPO / ".bench-venv" / "bin" / "img2dataset"))
    parser.add_argument("--skip-img2dataset", action="store_true", help="url section: mmcl only")
    parser.add_argument(
        "--url-server",
        choices=["auto", "nginx", "python"],
        default="auto",
        help="url section: the web server on 127.0.0.1 (auto: nginx when installed)",
    )
    parser.add_argument(
        "--url-latency-ms",
        type=float,
        default=0.0,
        help="url section: the server waits this long before each answer (default 0: plain loopback)",
    )
    parser.add_argument(
        "--server-cpus",
        help="url section: run the server under `taskset -c SERVER_CPUS`, e.g. 1 "
        "(with --client-cpus 0: the server off the sides' cores, as on another machine)",
    )
    parser.add_argument(
        "--client-cpus", help="run every timed side under `taskset -c CLIENT_CPUS`, e.g. 0 or 0,1"
    )
    parser.add_argument("--only", nargs="+", choices=["image", "url", "audio", "memory"],
                        default=["image", "url", "audio", "memory"])  # fmt: skip
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="a round is repeated when other processes used more cores than this during a run",
    )
    parser.add_argument("--max-rounds", type=int, default=12,
                        help="most rounds per section when disturbed rounds are repeated")  # fmt: skip
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="before each timed run, wait up to this many seconds for the machine to be idle "
                        "(other work below --quiet-threshold cores over 2 s); 0 starts at once")  # fmt: skip
    parser.add_argument("--json", type=Path, help="results file (default WORK_DIR/results.json)")
    args = parser.parse_args(argv)
    return Options(**{**vars(args), "img2dataset": Path(args.img2dataset), "only": tuple(args.only)})


def main() -> int:
    options = parse_options()
    bench = Bench(options)
    info = machine_info(options)
    print(
        f"machine: {info['cpu_model']}, {info['cores']} cores, {info['ram_gib']} GiB; Python "
        f"{info['python']}, Pillow {info['pillow']}; load average at start {info['load_at_start'][0]:.2f}"
    )
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for section in options.only:
            getattr(bench, f"{section}_section")(pool)
    info["load_at_end"] = os.getloadavg()
    info["code_at_end"] = code_state()
    if info["code_at_end"]["source_sha256"] != info["code"]["source_sha256"]:
        bench.problems.append(
            "the code under test (mmcl/, shards_tools/, pipelines/) changed during the run: "
            f"{info['code']} -> {info['code_at_end']}"
        )
    report = table(bench.results)
    print("\n" + report)
    shared = [
        s["name"]
        for sec in bench.results.values()
        for s in (sec.values() if isinstance(sec, dict) else [])
        if isinstance(s, dict) and "quiet" in s and not s["quiet"]
    ]
    if shared:
        print(
            "\nnote: other processes used more than --quiet-threshold cores during some reported runs "
            "(shared machine): " + "; ".join(shared)
        )
    if bench.problems:
        print("\nSANITY CHECKS FAILED:\n  " + "\n  ".join(bench.problems))
    out = options.json or Path(options.work_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": bench.results, "problems": bench.problems,
                               "table": report}, indent=1, default=str))  # fmt: skip
    print(f"\nresults: {out}")
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
