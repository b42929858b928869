"""Attack corpus: every hostile input through every mmcl entry point it reaches.

Run from the repository root with the project venv:

    .venv/bin/python bench/attack_corpus.py --keep-going       # every case (~10 min on 2 cores)
    .venv/bin/python bench/attack_corpus.py --only shard verify # some groups; stops at the first failure
    .venv/bin/python bench/attack_corpus.py --self-check        # only prove the builders make what they claim

The inputs come from tests/hostile_inputs.py (tar bombs, odd audio, disguised and oversized images, deep JSON,
bad labels, a YAML alias bomb, hostile manifest.json / sizes.json / part records / options.json, `pipe:`
strings, hostile HTTP servers on 127.0.0.1) and are built under --work-dir (default bench/out/attack/,
git-ignored; rebuilt each run). Each case is one real `mmcl` command in a fresh working directory, as a user
would run it: `shard image-text|audio-text` (CSV manifests of local files and of http URLs, hostile tars as
`--format webdataset` input, a corrupt _progress/options.json), `train` (image and audio micro configs over
shards holding a hostile sample among good ones, hostile tars, http shards, a hostile YAML, hostile index
files), `eval zero-shot|retrieval` (with checkpoints trained first), `shard verify|stats|merge`.

Outcomes (any but `failure` is a pass):
  skipped  exit 0 (verify: 1) and the hostile item counted: shard, an _errors.jsonl entry naming it (and
           errors_by_reason not empty); train, metrics.jsonl's last bad_samples >= the hostile samples, or a
           warning naming the hostile shard or URL; eval, results.json "skipped" >= the hostile samples, or
           such a warning; verify, a problem line naming the sample or shard; stats, "unreadable" >= 1 in
           --json output; merge, never (a hostile part record must be refused)
  refused  exit 2 (a bad argument, config or index file), or for train exit 1 (a run that cannot go on, e.g.
           every sample unusable), with an `mmcl ...: error:` message on stderr, no traceback; stderr names
           the hostile input
  accepted exit 0 and nothing else wrong, for a control case (a well-behaved server, a shard file merely named
           like a pipe: URL: everything written or read) or where the input is valid for that entry point and
           handling it quietly is right (e.g. verify on a 44,101 Hz WAV; stats, which reads no media, on a
           shard with a sparse .jpg): the table gives the reason (HARMLESS)
  failure  anything else: a traceback, another exit status, a hang (killed after the case's cap), a process
           tree above 2 GiB of RSS (killed above --memory-cap), a canary file created (a `pipe:` string run by
           a shell, or Ghostscript run on an EPS: a fake `gs` first on PATH creates one), a file written
           outside the case's output folder, an intended option the command does not know yet, a hostile item
           written or trained on without a word

Cases pass the options they rely on: `--url-deadline 5 --retries 0` against the slow servers (the per-read
--timeout stays at its 10 s default, above the slowloris' 9 s trickle, so only the deadline can end it) and
`data.http_timeout: 5` for http training shards; size caps stay at their defaults (64 MiB), which every bomb
exceeds. Options: --only GROUP..., --keep-going, --slow-interval S (the slowloris' byte interval, 9 s),
--memory-cap GiB (3), --work-dir, --self-check. Results: a Markdown table on stdout, a line per case as it
goes, WORK_DIR/results.json and every command's output under WORK_DIR/logs/; exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import hostile_inputs as hostile  # noqa: E402
from fault_training import train_config, train_env  # noqa: E402
from host import machine_line  # noqa: E402
from media_files import COLOURS, make_image, make_tone  # noqa: E402
from processes import TreeMonitor, kill9  # noqa: E402

from shards_tools.writer import sample_bytes  # noqa: E402

MiB = 1 << 20
MEMORY_LIMIT = 2048 * MiB  # a peak above this is a failure
GROUPS = ("shard", "train", "eval", "verify", "stats", "merge")
CAPS = {"shard": 120.0, "train": 300.0, "eval": 120.0, "verify": 120.0, "stats": 120.0, "merge": 60.0}
# slow servers: start-up plus a 5 s deadline, with room; eval has no timeout option (its default is 60 s)
HTTP_CAPS = {"shard": 30.0, "train": 120.0, "eval": 120.0}
INTENDED = ("--max-bytes", "--url-deadline", "--allow-pipe", "data.max_member_bytes", "data.http_timeout")
TRAIN_STEPS = 4
HARMLESS = {  # input -> why processing it without a word is right (where no entry point below overrides it)
    "wav-44101hz": "a valid rate, co-prime with 16 kHz: right to handle in bounded time and memory",
    "wav-1024-channels": "a valid WAV at libsndfile's channel limit: right to mix down in bounded memory",
    "wav-data-claims-4gb": "decoders read the frames present; ignoring the claim is right",
    "flac-1h-silence": "a valid hour of audio: right to read a window or encode it in bounded memory",
    "manifest-count-huge": "an integer count: only a size estimate is wrong",
}
STATS_HARMLESS = {"sparse-8gib": "stats reads .json members only: the sparse .jpg is never extracted"}
AUDIO_TOWER = {
    "tower": "cnn",
    "sample_rate": 16000,
    "clip_seconds": 0.5,
    "n_mels": 32,
    "cnn_channels": [8, 16],
    "spec_augment": {"time_masks": 1, "time_mask_width": 5},
}


# ================================================================================================ cases


@dataclass
class Case:
    """One hostile input through one entry point; `dir` holds its inputs, its output `out`, its cwd."""

    group: str
    input: str
    entry: str
    args: list[str]
    dir: Path
    markers: tuple[str, ...]  # text that names the hostile item in what the command reports
    expect: int = 1  # hostile items that must be counted
    cap_s: float = 0.0  # wall-clock cap (0: the group's)
    control: bool = False  # a well-behaved input: must just work
    control_samples: int = 0  # what a control run must write or read
    harmless: str = ""  # why accepting the input quietly is right for this entry point ("": it is not)

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def canary(self) -> Path:
        return self.dir / "CANARY"


@dataclass
class Result:
    group: str
    input: str
    entry: str
    outcome: str
    reason: str
    exit: int | None
    peak_rss_mib: float
    wall_s: float
    command: str
    log: str


def mmcl_command() -> list[str]:
    """The installed console script beside this interpreter (what a user runs), else `python -m mmcl`."""
    script = Path(sys.executable).with_name("mmcl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mmcl"]


BOMBS = ("sparse-8gib", "header-claims-8gib", "gzip-256mib-zeros", "pax-header-huge", "gnu-longname-huge")
TRAIN_INDEX_KINDS = (
    "manifest-count-string",
    "manifest-count-list",
    "manifest-count-negative",
    "manifest-count-huge",
    "manifest-is-a-list",
    "sizes-count-string",
)
EVAL_INDEX_KINDS = (
    "manifest-count-string",
    "manifest-count-negative",
    "manifest-count-huge",
    "manifest-is-a-list",
)


def hostile_key(name: str) -> str:
    """The key of the sample that carries hostile input `name` (no dots; distinct from the good keys)."""
    return "hostile_" + name.replace("-", "_")


class Corpus:
    """Builds the inputs (under WORK/inputs, shared by the cases that only read them) and the cases."""

    def __init__(self, work: Path, servers: dict[str, str]):
        self.work, self.inputs, self.servers = work, work / "inputs", servers
        self.cases: list[Case] = []
        self._built: set[Path] = set()

    def add(self, group: str, input_: str, entry: str, markers: tuple[str, ...], args: Callable[[Case], list],
            **options) -> Case:  # fmt: skip
        """A case in its own folder WORK/cases/NNN-...; `args(case)` gives its command line (after `mmcl`)."""
        slug = "".join(
            c if c.isalnum() or c in "-_" else "_" for c in f"{len(self.cases):03d}-{group}-{input_}"
        )
        options.setdefault("harmless", HARMLESS.get(input_, ""))
        case = Case(group, input_, entry, [], self.work / "cases" / slug[:60], markers, **options)
        case.dir.mkdir(parents=True, exist_ok=True)
        case.args = [str(a) for a in args(case)]
        self.cases.append(case)
        return case

    # ------------------------------------------------------------------------------------ inputs
    def source(self, modality: str) -> Path:
        return self.inputs / "src" / modality

    def media_folder(self, modality: str, name: str, samples: list[dict]) -> Path:
        """A shard folder with its manifest.json and sizes.json: a shard of 8 good samples, and a shard of 2
        good, the given samples, 2 good."""
        folder = self.inputs / f"{modality}-shards" / name
        if folder not in self._built:
            src = self.source(modality)
            good = hostile.samples_tar(hostile.good_samples(src, modality, 8))
            mixed = hostile.shard_with(src, modality, *map(sample_bytes, samples), first=8)
            hostile.write_shard_folder(
                folder, modality, {"shard-000000.tar": good, "shard-000001.tar": mixed}
            )
            self._built.add(folder)
        return folder

    def good_folder(self, modality: str) -> Path:
        return self.media_folder(modality, "good", [])

    def image_inputs(self) -> dict[str, list[dict]]:
        """Hostile image inputs as samples (all stored as .jpg); the six disguised formats form one input."""
        images = hostile.hostile_images()
        disguised = [f"{fmt.lower()}-as-jpg" for fmt in hostile.DISGUISED_FORMATS]
        groups = {"eps-as-jpg": ["eps-as-jpg"], "pcx-ico-tga-sgi-spider-dds-as-jpg": disguised}
        groups.update({name: [name] for name in hostile.pixel_bombs()})
        return {
            group: [hostile.sample(hostile_key(n), jpg=images[n]) for n in names]
            for group, names in groups.items()
        }

    def audio_inputs(self) -> dict[str, list[dict]]:
        """Each hostile audio file as a sample, its extension the name's first part (wav, flac)."""
        return {name: [hostile.sample(hostile_key(name), **{name.split("-")[0]: data})]
                for name, data in hostile.hostile_audio().items()}  # fmt: skip

    def deep_json_folder(self, caption: bool = False) -> Path:
        """A sample whose .json is 100,000 levels deep; without a .txt (`caption` False) its caption must come
        from the JSON, with one (for verify) the JSON is its only fault."""
        png = hostile.good_samples(self.source("image"), "image", 1)[0]["png"]
        deep = {"__key__": "hostile_deep_json", "png": png, "json": hostile.deep_json(), "cls": b"0"}
        if caption:
            deep["txt"] = b"a sample with a deep .json"
        return self.media_folder("image", f"deep-json-member{'-captioned' if caption else ''}", [deep])

    def bomb_folder(self, name: str) -> tuple[Path, str, str]:
        """A shard folder whose second shard holds tar bomb `name` among good samples (the bombs that swallow
        the rest of the archive end it); returns the folder, the bomb shard's file name and the hostile
        key."""
        key, folder = hostile_key(name), self.inputs / "image-bombs" / name
        shard = "shard-000001.tar.gz" if name == "gzip-256mib-zeros" else "shard-000001.tar"
        if folder in self._built:
            return folder, shard, key
        src = self.source("image")
        rest = sample_bytes(hostile.sample(key))  # the bomb sample's .cls, .json, .txt
        if name == "gzip-256mib-zeros":
            before = b"".join(map(sample_bytes, hostile.good_samples(src, "image", 2, first=8)))
            after = rest + b"".join(map(sample_bytes, hostile.good_samples(src, "image", 2, first=10)))
            data: bytes | Path = hostile.gzip_tar_of_zeros(
                self.inputs / "bomb.tar.gz", before, f"{key}.jpg", after
            )
        elif name == "sparse-8gib":
            data = hostile.shard_with(src, "image", hostile.sparse_member(f"{key}.jpg"), rest, first=8)
        else:
            bomb = {
                "header-claims-8gib": lambda: hostile.oversized_member(f"{key}.jpg"),
                "pax-header-huge": hostile.pax_header_bomb,
                "gnu-longname-huge": hostile.gnu_longname_bomb,
            }[name]()
            data = hostile.shard_with(src, "image", bomb, first=8, after=0, end=False)
        count = 5 if name in ("gzip-256mib-zeros", "sparse-8gib") else 3  # 2 good, the bomb (, 2 good)
        good = hostile.samples_tar(hostile.good_samples(src, "image", 8))
        shards = {"shard-000000.tar": good, shard: data}
        hostile.write_shard_folder(folder, "image", shards, counts={"shard-000000.tar": 8, shard: count})
        self._built.add(folder)
        return folder, shard, key

    def csv_manifest(
        self, modality: str, name: str, files: dict[str, bytes], rows: tuple[str, ...] = ()
    ) -> Path:
        """A CSV manifest: two good files, then a row for each hostile file and each extra path or URL."""
        folder = self.inputs / f"{modality}-csv" / name
        folder.mkdir(parents=True, exist_ok=True)
        if modality == "image":
            good = [make_image(folder / f"good{i}.png", COLOURS[i]).name for i in range(2)]
        else:
            good = [make_tone(folder / f"good{i}.flac", 330 + 110 * i, rate=16000).name for i in range(2)]
        for file_name, data in files.items():
            (folder / file_name).write_bytes(data)
        cells = [*good, *files, *rows]
        manifest = folder / "pairs.csv"
        manifest.write_text(
            "path,caption\n" + "".join(f'"{c}",caption number {i}\n' for i, c in enumerate(cells))
        )
        return manifest

    def pipe_named_tar_folder(self) -> Path:
        """A copy of the good image shards plus one more named `pipe:touch CANARY-cwd.tar` (a shell would
        create CANARY-cwd.tar in the working directory)."""
        folder = self.inputs / "image-pipe-named-tar"
        if folder not in self._built:
            shutil.copytree(self.good_folder("image"), folder)
            shutil.copy(folder / "shard-000001.tar", folder / "pipe:touch CANARY-cwd.tar")
            self._built.add(folder)
        return folder

    def index_copy(self, case: Case, kind: str, target: Path) -> str:
        """Copy the good image shards to `target` and make their index hostile (`kind`); returns the name the
        hostile index gives (for the name kinds, a valid shard outside `target`, in the case folder)."""
        shutil.copytree(self.good_folder("image"), target)
        outside = case.dir / "outside.tar"
        shutil.copy(target / "shard-000001.tar", outside)
        return hostile.hostile_manifest(target, kind, outside=outside, canary=case.canary)

    # ------------------------------------------------------------------------------------ command lines
    def train_args(self, case_dir: Path, modality: str, urls: object, **data: object) -> list:
        """`mmcl train` of a micro model for TRAIN_STEPS steps over `urls` with one loader worker, into
        OUT."""
        model = {"modality": "audio", "audio": AUDIO_TOWER} if modality == "audio" else {}
        sections = {"sources": [{"urls": urls}], "workers": 1, "shuffle_buffer": 20, **data}
        config = train_config(case_dir / "train.yaml", "", case_dir / "out", model=model, data=sections,
                              train={"steps": TRAIN_STEPS, "checkpoint_every": 100})  # fmt: skip
        return ["train", "--config", config]

    def eval_args(self, task: str, modality: str, data: object, case: Case, classes: bool = False) -> list:
        """`mmcl eval TASK` of the set-up checkpoint, in-process decoding; `classes` for data without a
        manifest."""
        checkpoint = self.work / "checkpoints" / modality / "out"
        args = [
            "eval",
            task,
            "--checkpoint",
            checkpoint,
            "--data",
            data,
            "--output",
            case.out,
            "--workers",
            "0",
            "--batch-size",
            "8",
            "--quiet",
        ]
        if task == "zero-shot":
            args += ["--format", "shards"]  # a lone .tar.gz is not auto-detected
        if classes and task == "zero-shot":
            names = case.dir / "classes.txt"
            names.write_text("\n".join(hostile.class_names(modality)) + "\n")
            args += ["--classes", names]
        return args

    # ------------------------------------------------------------------------------------ groups
    def shard_cases(self) -> None:
        quiet = ("--quiet", "--workers", "1")

        def shard(modality: str, source: object, *extra: object) -> Callable[[Case], list]:
            command = ["shard", f"{modality}-text", "--input", source, *extra, *quiet]
            return lambda c: [*command, "--output", c.out]

        for name, samples in self.image_inputs().items():
            files = {f"{s['__key__']}.jpg": s["jpg"] for s in samples}
            self.add(
                "shard",
                name,
                "shard image-text (CSV)",
                tuple(files),
                shard("image", self.csv_manifest("image", name, files)),
                expect=len(files),
            )
            keys = tuple(s["__key__"] for s in samples)
            folder = self.media_folder("image", name, samples)
            self.add("shard", name, "shard image-text --format webdataset", keys,
                     shard("image", folder, "--format", "webdataset"), expect=len(keys))  # fmt: skip
        for name, (sample,) in self.audio_inputs().items():
            ext = name.split("-")[0]
            manifest = self.csv_manifest("audio", name, {f"{name}.{ext}": sample[ext]})
            self.add("shard", name, "shard audio-text --sample-rate 16000 (CSV)", (f"{name}.{ext}",),
                     shard("audio", manifest, "--sample-rate", "16000"))  # fmt: skip
        for name in BOMBS:
            folder, shard_name, key = self.bomb_folder(name)
            self.add("shard", name, "shard image-text --format webdataset", (shard_name, key),
                     shard("image", folder, "--format", "webdataset"))  # fmt: skip
        self.add("shard", "deep-json-member", "shard image-text --format webdataset", ("hostile_deep_json",),
                 shard("image", self.deep_json_folder(), "--format", "webdataset"))  # fmt: skip
        jsonl = self.inputs / "image-jsonl"
        jsonl.mkdir(parents=True, exist_ok=True)
        manifest, _ = hostile.deep_jsonl_manifest(jsonl)
        self.add(
            "shard",
            "deep-jsonl-line",
            "shard image-text (JSONL)",
            ("pairs.jsonl", "deep.png"),
            shard("image", manifest),
        )
        # pipe: strings where a path is accepted: a manifest cell, --input, a tar's file name
        self.add(
            "shard",
            "pipe-in-csv-cell",
            "shard image-text (CSV)",
            ("pipe:",),
            lambda c: shard(
                "image", self.csv_manifest("image", "pipe-cell", {}, rows=(hostile.pipe_string(c.canary),))
            )(c),
        )
        self.add(
            "shard",
            "pipe-as-input",
            "shard image-text --format webdataset",
            ("pipe:",),
            lambda c: shard("image", hostile.pipe_string(c.canary), "--format", "webdataset")(c),
        )
        self.add(
            "shard",
            "tar-named-pipe:touch",
            "shard image-text --format webdataset",
            ("pipe:",),
            shard("image", self.pipe_named_tar_folder(), "--format", "webdataset"),
            control=True,
            control_samples=16,
        )
        # a resumed run into a folder whose _progress/options.json is garbage

        def resume(case: Case) -> list:
            hostile.corrupt_progress_options(case.out)
            return shard("image", self.csv_manifest("image", "resume", {}))(case)

        self.add(
            "shard", "corrupt-progress-options.json", "shard image-text (resume)", ("options.json",), resume
        )
        # http(s) URLs in a manifest: the hostile servers and a control
        for server in ("huge-length", "chunked", "slowloris-headers", "slowloris-body", "control"):
            base = self.servers[server]
            manifest = self.csv_manifest(
                "image",
                f"http-{server}",
                {},
                rows=(f"{base}/{'good' if server == 'control' else 'hostile'}.jpg",),
            )
            self.add(
                "shard",
                f"http-{server}",
                "shard image-text (CSV of URLs)",
                (base,),
                shard("image", manifest, "--url-deadline", "5", "--retries", "0"),
                cap_s=HTTP_CAPS["shard"],
                control=server == "control",
                control_samples=3,
            )

    def train_cases(self) -> None:
        def train(modality: str, urls: object, **data: object) -> Callable[[Case], list]:
            return lambda c: self.train_args(c.dir, modality, urls, **data)

        for name, samples in self.image_inputs().items():
            folder = self.media_folder("image", name, samples)
            self.add(
                "train",
                name,
                "train (image micro)",
                tuple(s["__key__"] for s in samples),
                train("image", str(folder)),
                expect=len(samples),
            )
        for name, samples in self.audio_inputs().items():
            folder = self.media_folder("audio", name, samples)
            self.add(
                "train", name, "train (audio micro)", (samples[0]["__key__"],), train("audio", str(folder))
            )
        for name in BOMBS:
            folder, shard_name, key = self.bomb_folder(name)
            urls = [str(folder / "shard-000000.tar"), str(folder / shard_name)]  # a folder lists *.tar only
            self.add("train", name, "train (image micro)", (shard_name, key), train("image", urls))
        self.add("train", "deep-json-member", "train (image micro)", ("hostile_deep_json",),
                 train("image", str(self.deep_json_folder())))  # fmt: skip
        self.add(
            "train",
            "yaml-alias-bomb",
            "train (model.open_clip_config)",
            ("train.yaml", "alias", "open_clip_config"),
            lambda c: [
                "train",
                "--config",
                hostile.alias_bomb_config(c.dir / "train.yaml", self.good_folder("image"), c.out),
            ],
        )
        for kind in TRAIN_INDEX_KINDS:

            def index(case: Case, kind: str = kind) -> list:
                self.index_copy(case, kind, case.dir / "shards")
                return self.train_args(case.dir, "image", str(case.dir / "shards"))

            self.add(
                "train",
                kind,
                "train (image micro)",
                ("manifest.json", "sizes.json", "shard-000000.tar"),
                index,
            )
        self.add("train", "pipe-in-data.sources", "train (image micro)", ("pipe",),
                 lambda c: self.train_args(c.dir, "image", hostile.pipe_string(c.canary)))  # fmt: skip
        # an http shard after a good local one (one source), and once a source of hostile http shards only
        good = str(self.good_folder("image") / "shard-000000.tar")
        for server in ("huge-length", "chunked", "slowloris-headers", "control"):
            base = self.servers[server]
            self.add(
                "train",
                f"http-{server}",
                "train (image micro, a local + an http shard, data.http_timeout 5)",
                (f"{base}/shard-",),
                train("image", [good, f"{base}/shard-000001.tar"], http_timeout=5),
                cap_s=HTTP_CAPS["train"],
                control=server == "control",
            )
        base = self.servers["chunked"]
        self.add("train", "http-chunked", "train (image micro, only http shards, data.http_timeout 5)",
                 (f"{base}/shard-",), train("image", f"{base}/shard-{{000000..000001}}.tar", http_timeout=5),
                 cap_s=HTTP_CAPS["train"])  # fmt: skip

    def eval_cases(self) -> None:
        def evaluate(task: str, modality: str, data: object, classes: bool = False) -> Callable[[Case], list]:
            return lambda c: self.eval_args(task, modality, data, c, classes)

        for name, samples in self.image_inputs().items():
            keys = tuple(s["__key__"] for s in samples)
            self.add(
                "eval",
                name,
                "eval zero-shot (image)",
                keys,
                evaluate("zero-shot", "image", self.media_folder("image", name, samples)),
                expect=len(keys),
            )
        for name, samples in self.audio_inputs().items():
            self.add("eval", name, "eval zero-shot (audio)", (samples[0]["__key__"],),
                     evaluate("zero-shot", "audio", self.media_folder("audio", name, samples)))  # fmt: skip
        png = hostile.good_samples(self.source("image"), "image", 1)[0]["png"]
        for name, label in hostile.HOSTILE_LABELS.items():
            folder = self.media_folder("image", name, [hostile.sample(hostile_key(name), png=png, cls=label)])
            self.add(
                "eval",
                name,
                "eval zero-shot (image)",
                (hostile_key(name),),
                evaluate("zero-shot", "image", folder),
            )
        for task in ("zero-shot", "retrieval"):
            self.add("eval", "deep-json-member", f"eval {task} (image)", ("hostile_deep_json",),
                     evaluate(task, "image", self.deep_json_folder()))  # fmt: skip
            for name in BOMBS:
                folder, shard_name, key = self.bomb_folder(name)
                # a folder lists *.tar only
                data = folder / shard_name if shard_name.endswith(".gz") else folder
                self.add(
                    "eval", name, f"eval {task} (image)", (shard_name, key), evaluate(task, "image", data)
                )
            self.add(
                "eval",
                "pipe-as-data",
                f"eval {task} (image)",
                ("pipe",),
                lambda c, task=task: self.eval_args(
                    task, "image", hostile.pipe_string(c.canary), c, classes=True
                ),
            )
        self.add(
            "eval",
            "tar-named-pipe:touch",
            "eval zero-shot (image)",
            ("pipe:",),
            evaluate("zero-shot", "image", self.pipe_named_tar_folder()),
            control=True,
            control_samples=16,
        )
        for kind in EVAL_INDEX_KINDS:

            def index(case: Case, kind: str = kind) -> list:
                self.index_copy(case, kind, case.dir / "shards")
                return self.eval_args("zero-shot", "image", case.dir / "shards", case)

            self.add("eval", kind, "eval zero-shot (image)", ("manifest.json", "shard-000000.tar"), index)
        for server in ("huge-length", "chunked", "slowloris-headers"):
            base = self.servers[server]
            self.add(
                "eval",
                f"http-{server}",
                "eval zero-shot (image, http shard)",
                (base.removeprefix("http://"),),
                evaluate("zero-shot", "image", f"{base}/shard-000000.tar", classes=True),
                cap_s=HTTP_CAPS["eval"],
            )

    def inspect_cases(self, groups: set[str]) -> None:
        """verify and stats on copies of hostile shard folders (the copy is the case's output), merge on
        hostile part records."""
        media = [(name, self.media_folder("image", name, s), tuple(x["__key__"] for x in s))
                 for name, s in self.image_inputs().items()]  # fmt: skip
        media += [
            (name, self.media_folder("audio", name, s), (s[0]["__key__"],))
            for name, s in self.audio_inputs().items()
        ]
        tars = [
            (name, folder, (shard_name, key))
            for name in BOMBS
            for folder, shard_name, key in [self.bomb_folder(name)]
        ]
        tars.append(("deep-json-member", self.deep_json_folder(caption=True), ("hostile_deep_json",)))
        for tool in ("verify", "stats"):
            if tool not in groups:
                continue
            extra = ("--json",) if tool == "stats" else ()
            inspected = media + tars if tool == "verify" else tars  # stats reads no media

            for name, folder, markers in inspected:

                def copy(case: Case, folder: Path = folder, tool: str = tool, extra: tuple = extra) -> list:
                    shutil.copytree(folder, case.out)
                    return ["shard", tool, case.out, *extra]

                expect = len(markers) if (name, folder, markers) in media else 1
                harmless = STATS_HARMLESS.get(name, "") if tool == "stats" else HARMLESS.get(name, "")
                self.add(tool, name, f"shard {tool}", markers, copy, expect=expect, harmless=harmless)
            for kind in hostile.HOSTILE_INDEX_KINDS:

                def index(case: Case, kind: str = kind, tool: str = tool, extra: tuple = extra) -> list:
                    named = self.index_copy(case, kind, case.out)
                    case.markers = (named, "manifest.json", "sizes.json", "shard-000000.tar")
                    return ["shard", tool, case.out, *extra]

                self.add(tool, kind, f"shard {tool}", (), index)
            self.add(
                tool,
                "pipe-as-folder",
                f"shard {tool}",
                ("pipe:",),
                lambda c, tool=tool, extra=extra: ["shard", tool, hostile.pipe_string(c.canary), *extra],
            )
        if "merge" in groups:
            for kind in hostile.HOSTILE_PART_KINDS:

                def merge(case: Case, kind: str = kind) -> list:
                    hostile.hostile_part(case.out, kind)
                    return ["shard", "merge", case.out]

                self.add("merge", kind, "shard merge", ("part-00000", "_parts"), merge)


# ================================================================================================ running


def files_under(*roots: Path, skip: Path | None = None) -> set[str]:
    found = set()
    for root in roots:
        for folder, dirs, names in os.walk(root):
            if skip is not None and Path(folder) == skip.parent:
                dirs[:] = [d for d in dirs if Path(folder) / d != skip]
            found.update(os.path.join(folder, n) for n in names)
    return found


def run_case(case: Case, env: dict, inputs: Path, logs: Path, memory_cap: int) -> Result:
    """Run one case in a fresh working directory, watched; classify what happened."""
    cwd = case.dir / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    before = files_under(case.dir, inputs, skip=case.out)
    log = logs / case.dir.name
    cap = case.cap_s or CAPS[case.group]
    started = time.monotonic()
    with open(f"{log}.stdout", "wb") as out, open(f"{log}.stderr", "wb") as err:
        proc = subprocess.Popen(
            [*mmcl_command(), *case.args],
            cwd=cwd,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env={**env, "ATTACK_GS_CANARY": str(case.canary) + "-ghostscript"},
        )
        with TreeMonitor(proc.pid, kill_above=memory_cap) as monitor:  # the tree's memory every 50 ms
            try:
                code: int | None = proc.wait(timeout=cap)
            except subprocess.TimeoutExpired:
                kill9(proc, whole_group=True, grace=10.0)
                code = None
    wall = time.monotonic() - started
    stdout = Path(f"{log}.stdout").read_text("utf-8", "replace")
    stderr = Path(f"{log}.stderr").read_text("utf-8", "replace")
    new = sorted(files_under(case.dir, inputs, skip=case.out) - before)
    canaries = hostile.canaries(case.canary) + hostile.canaries(cwd / "CANARY")
    outcome, reason = classify(case, code, stdout, stderr, wall, monitor, new, canaries, memory_cap)
    reason = reason.replace(str(case.dir), "CASE").replace(str(inputs), "INPUTS")  # short table cells
    return Result(
        case.group,
        case.input,
        case.entry,
        outcome,
        reason,
        code,
        round(monitor.tree_rss_peak / MiB, 1),
        round(wall, 1),
        "mmcl " + " ".join(case.args),
        str(log),
    )


def classify(case: Case, code: int | None, stdout: str, stderr: str, wall: float, monitor: TreeMonitor,
             new: list[str], canaries: list[Path], memory_cap: int) -> tuple[str, str]:  # fmt: skip
    """(outcome, reason) of one finished case; see the module docstring."""
    problems = []
    if canaries:
        problems.append(f"canary created: {', '.join(p.name for p in canaries)}")
    if new:
        problems.append(f"wrote outside its output: {', '.join(new[:3])}")
    if monitor.killed:
        problems.append(f"memory: killed above {memory_cap / MiB:.0f} MiB")
    elif monitor.tree_rss_peak > MEMORY_LIMIT:
        problems.append(f"memory: peak {monitor.tree_rss_peak / MiB:.0f} MiB > {MEMORY_LIMIT / MiB:.0f}")
    if code is None and not monitor.killed:
        problems.append(f"hang: killed after {wall:.0f} s")
    if "Traceback" in stderr:
        problems.append(f"traceback: {exception_line(stderr)}")
    errors = [line for line in lines_of(stderr) if line.startswith("mmcl") and "error:" in line]
    missing = next(
        (
            line
            for line in lines_of(stderr)
            if ("unrecognized arguments" in line or "unknown key" in line)
            and any(k in line for k in INTENDED)
        ),
        None,
    )
    if code == 2 and missing and not problems:
        problems.append(f"intended option missing: {missing.strip()[:200]}")
    if problems:
        return "failure", "; ".join(problems)
    if case.control:
        count, detail = control_count(case)
        if code == 0 and count:
            return "accepted", f"control: {detail}"
        return "failure", f"control case: exit {code}, {detail}; {last_line(stderr)}"
    # the error line, or the warnings it points to, must name the hostile input
    if code == 2 or (code == 1 and case.group == "train"):
        named = any(m.lower() in stderr.lower() for m in case.markers)
        if errors and named:
            return "refused", errors[0][:300]
        if errors:
            return "failure", f"refused for another reason: {errors[0][:300]}"
        return "failure", f"exit 2 without an 'mmcl ...: error:' line: {last_line(stderr)}"
    if code == 0 or (code == 1 and case.group == "verify"):
        count, detail = COUNTERS[case.group](case, stdout, stderr)
        if count >= case.expect:
            return "skipped", detail
        if case.harmless and code == 0:
            return "accepted", f"{case.harmless} ({detail})"
        return "failure", f"exit {code}, hostile item not counted ({count} of {case.expect}): {detail}"
    return "failure", f"exit {code}: {last_line(stderr)}"


def lines_of(text: str) -> list[str]:
    """Non-empty lines, also split at the carriage returns of progress bars."""
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def last_line(text: str) -> str:
    lines = lines_of(text)
    return lines[-1][:300] if lines else "(no output)"


def exception_line(text: str) -> str:
    """The last line that names an exception (`SomeError: ...`), else the last line."""
    named = [line for line in lines_of(text) if re.search(r"\b\w*(Error|Exception|Failed|Exit)\b:", line)]
    return named[-1][:300] if named else last_line(text)


def naming_lines(case: Case, text: str) -> list[str]:
    """The lines naming the hostile item, a progress bar written before a warning on its line cut off."""
    named = [line for line in lines_of(text) if any(m in line for m in case.markers)]
    return [line[line.find("WARNING") :] if "WARNING" in line else line for line in named]


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def shard_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """_errors.jsonl entries naming the hostile item (with errors_by_reason not empty); for a resumed run into
    a damaged folder, a warning naming the damaged file."""
    manifest = read_json(case.out / "manifest.json")
    if not isinstance(manifest, dict):
        return 0, "no manifest.json"
    errors = (case.out / "_errors.jsonl").read_text("utf-8") if (case.out / "_errors.jsonl").exists() else ""
    named = naming_lines(case, errors)
    if named and manifest.get("errors_by_reason"):
        reasons = Counter(str((read_json_line(line) or {}).get("reason")) for line in named)
        detail = str((read_json_line(named[0]) or {}).get("detail", ""))[:160]
        return len(named), f"{', '.join(f'{r} x{n}' for r, n in reasons.items())}: {detail}"
    warned = naming_lines(case, stderr)
    if warned and case.input.startswith("corrupt-"):
        return 1, f"warning: {warned[0][:200]}"
    return (
        0,
        f"errors_by_reason {manifest.get('errors_by_reason')}, samples "
        f"{manifest.get('totals', {}).get('samples')}",
    )


def read_json_line(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def train_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """metrics.jsonl's last bad_samples, else 1 for a warning naming the hostile shard or URL."""
    rows = [read_json_line(line) for line in (case.out / "metrics.jsonl").read_text().splitlines()] if (
        case.out / "metrics.jsonl").exists() else []  # fmt: skip
    bad = int((rows[-1] or {}).get("bad_samples", 0)) if rows else 0
    return counted_or_warned(case, bad, f"bad_samples {bad} after {len(rows)} steps", stderr)


def eval_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """results.json "skipped", else 1 for a warning naming the hostile shard or URL."""
    results = read_json(case.out / "results.json")
    skipped = int(results.get("skipped", 0)) if isinstance(results, dict) else 0
    total = results.get("num_samples", results.get("num_items")) if isinstance(results, dict) else None
    return counted_or_warned(case, skipped, f"skipped {skipped} of {total}", stderr)


def counted_or_warned(case: Case, count: int, detail: str, stderr: str) -> tuple[int, str]:
    """(count, detail) when the entry point counted the hostile samples, else (1, the warning) when a warning
    names the hostile shard or URL, else (count, why it is not counted)."""
    if count >= case.expect:
        return count, detail
    warned = naming_lines(case, stderr)
    if warned:
        return max(count, 1), f"warning: {warned[0][:200]}"
    return count, f"{detail}, no warning naming it"


def verify_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """Problem lines naming the hostile sample or shard (verify exits 1 when it found any)."""
    named = naming_lines(case, stdout + "\n" + stderr)
    if not named:
        return 0, f"no problem names it: {last_line(stdout)}"
    keys = sum(any(m in line for line in named) for m in case.markers)
    return max(keys, 1) if case.expect > 1 else len(named), f"problem: {named[0][:200]}"


def stats_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """The "unreadable" count of `mmcl shard stats --json`."""
    start = stdout.find("{")
    try:
        stats = json.loads(stdout[start:]) if start >= 0 else None
    except ValueError:
        stats = None
    if not isinstance(stats, dict):
        return 0, "no JSON on stdout"
    unreadable = stats.get("unreadable")
    return (unreadable if isinstance(unreadable, int) else 0), f"unreadable {unreadable}"


def merge_count(case: Case, stdout: str, stderr: str) -> tuple[int, str]:
    """Never counted: merge must refuse a hostile part record."""
    return 0, "merge accepted the hostile part record"


COUNTERS: dict[str, Callable[[Case, str, str], tuple[int, str]]] = {
    "shard": shard_count,
    "train": train_count,
    "eval": eval_count,
    "verify": verify_count,
    "stats": stats_count,
    "merge": merge_count,
}


def control_count(case: Case) -> tuple[int, str]:
    """A control run wrote (shard), evaluated (eval) or trained on (train) everything it was given."""
    if case.group == "shard":
        manifest = read_json(case.out / "manifest.json")
        samples = manifest.get("totals", {}).get("samples") if isinstance(manifest, dict) else None
        return int(samples == case.control_samples), f"{samples} samples written of {case.control_samples}"
    if case.group == "eval":
        results = read_json(case.out / "results.json")
        items = results.get("num_samples") if isinstance(results, dict) else None
        return int(items == case.control_samples), f"{items} items evaluated of {case.control_samples}"
    rows = (
        (case.out / "metrics.jsonl").read_text().splitlines() if (case.out / "metrics.jsonl").exists() else []
    )
    bad = (read_json_line(rows[-1]) or {}).get("bad_samples") if rows else None
    return int(len(rows) == TRAIN_STEPS and bad == 0), f"{len(rows)} steps, bad_samples {bad}"


# ================================================================================================ set-up


@contextlib.contextmanager
def servers(slow_interval: float, good: dict[str, bytes]) -> Iterator[dict[str, str]]:
    """The hostile servers and the control server, for the whole run."""
    with contextlib.ExitStack() as stack:
        yield {
            "huge-length": stack.enter_context(hostile.huge_length_server()),
            "chunked": stack.enter_context(hostile.chunked_server()),
            "slowloris-headers": stack.enter_context(hostile.slowloris_server(slow_interval)),
            "slowloris-body": stack.enter_context(
                hostile.slowloris_server(slow_interval, slow_headers=False)
            ),
            "control": stack.enter_context(hostile.file_server(good)),
        }


def control_files(corpus: Corpus) -> dict[str, bytes]:
    folder = corpus.good_folder("image")
    files = {f"/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["/good.jpg"] = make_image(corpus.inputs / "src" / "http-good.jpg", "red").read_bytes()
    return files


def fake_ghostscript(folder: Path) -> Path:
    """A `gs` that only records that it ran (Pillow renders EPS with whatever `gs` is first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    gs = folder / "gs"
    gs.write_text('#!/bin/sh\ntouch "$ATTACK_GS_CANARY"\nexit 1\n')
    gs.chmod(0o755)
    return folder


def train_checkpoint(corpus: Corpus, modality: str, env: dict) -> None:
    """A tiny run on good shards whose checkpoint the eval cases load."""
    run = corpus.work / "checkpoints" / modality
    args = corpus.train_args(run, modality, str(corpus.good_folder(modality)))
    started = time.monotonic()
    result = subprocess.run(
        [*mmcl_command(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=corpus.work,
    )
    log(
        f"set-up: {modality} checkpoint for the eval cases: exit {result.returncode} in "
        f"{time.monotonic() - started:.0f} s"
    )
    if result.returncode != 0:
        log(result.stderr[-1500:])


# ================================================================================================ output


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(results: list[Result]) -> str:
    lines = [
        "| input | entry point | outcome | reason / message | peak RSS MiB | wall s |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in results:
        outcome = f"**{r.outcome}**" if r.outcome == "failure" else r.outcome
        lines.append(f"| {cell(r.input, 40)} | {cell(r.entry, 50)} | {outcome} | {cell(r.reason)} | "
                     f"{r.peak_rss_mib:.0f} | {r.wall_s:.1f} |")  # fmt: skip
    return "\n".join(lines)


def totals(results: list[Result]) -> str:
    counts = Counter(r.outcome for r in results)
    line = (
        f"{len(results)} cases: {counts['skipped']} skipped, {counts['refused']} refused, "
        f"{counts['failure']} failures"
    )
    return line + (f", {counts['accepted']} accepted (controls and harmless)" if counts["accepted"] else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "attack")
    parser.add_argument("--only", nargs="+", choices=GROUPS, help="some groups only")
    parser.add_argument(
        "--slow-interval", type=float, default=9.0, help="seconds between the slowloris' bytes"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every case (default: stop at the first failure)"
    )
    parser.add_argument(
        "--memory-cap", type=float, default=3.0, help="GiB: a process tree above this is killed"
    )
    parser.add_argument(
        "--self-check", action="store_true", help="only check that the builders make what they claim"
    )
    args = parser.parse_args(argv)
    work = Path(os.path.abspath(args.work_dir))
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    if args.self_check:
        problems = hostile.self_check(work / "self-check")
        print("\n".join(problems) or "every builder makes what it claims")
        return 1 if problems else 0
    groups = set(args.only or GROUPS)
    started = time.time()
    info = machine_line()
    log(f"attack corpus in {work} on {info}")
    env = {**train_env(), "PATH": f"{fake_ghostscript(work / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}"}
    results: list[Result] = []
    corpus = Corpus(work, {})
    with servers(args.slow_interval, control_files(corpus)) as urls:
        corpus.servers = urls
        for group, build in (
            ("shard", corpus.shard_cases),
            ("train", corpus.train_cases),
            ("eval", corpus.eval_cases),
        ):
            if group in groups:
                build()
        if groups & {"verify", "stats", "merge"}:
            corpus.inspect_cases(groups)
        if "eval" in groups:
            for modality in ("image", "audio"):
                train_checkpoint(corpus, modality, env)
        log(f"{len(corpus.cases)} cases built in {time.time() - started:.0f} s")
        for index, case in enumerate(corpus.cases, 1):
            result = run_case(case, env, corpus.inputs, work / "logs", int(args.memory_cap * 1024 * MiB))
            results.append(result)
            log(
                f"[{index}/{len(corpus.cases)}] {case.group} | {case.input} | {case.entry}: {result.outcome} "
                f"({result.wall_s:.1f} s, {result.peak_rss_mib:.0f} MiB) {cell(result.reason, 140)}"
            )
            if result.outcome == "failure" and not args.keep_going:
                log("stopping at the first failure (--keep-going runs every case)")
                break
    elapsed = time.time() - started
    text = table(results)
    print(f"\n{text}\n\n{totals(results)}\n\n{elapsed / 60:.1f} min on {info}")
    (work / "results.json").write_text(json.dumps({
        "command": "python bench/attack_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info, "elapsed_s": round(elapsed, 1), "totals": totals(results), "table": text,
        "cases": [r.__dict__ for r in results],
    }, indent=1, default=str))  # fmt: skip
    print(f"results: {work / 'results.json'}")
    return 1 if any(r.outcome == "failure" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
