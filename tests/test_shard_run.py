"""End-to-end sharding: real files in, real tar shards out, read back by webdataset and verified."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from media_files import COLOURS, make_image, make_tone
from processes import REPO, Handshake, kill9, run_mmcl, wait_until

OUTPUT_FILES = ("manifest.json", "sizes.json", "_errors.jsonl")


def output_digest(folder: Path) -> dict[str, bytes]:
    """Every file a user sees in an output folder (shards, manifest, sizes, errors), by name."""
    files = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    files.update({name: (folder / name).read_bytes() for name in OUTPUT_FILES})
    return files


def shard(manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_mmcl("shard", "image-text", "--input", manifest, "--output", out, "--quiet", *extra)


def test_csv_to_shards_readable_by_webdataset(image_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = shard(image_csv, out, "--shard-size", "16", "--image-size", "32", "--workers", "2")
    assert "wrote 40 samples in 3 shards" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["totals"]["samples"] == 40 and manifest["modality"] == "image"
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 16,
        "shard-000001.tar": 16,
        "shard-000002.tar": 8,
    }
    dataset = wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == 40
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 40 and not any("." in k for k in keys)
    first = samples[0]
    assert max(first["jpg"].size) == 32 and first["jpg"].mode == "RGB"
    assert first["txt"] == "a red square number 0"
    assert first["json"]["text"] == ["a red square number 0"]
    assert first["json"]["source"].endswith("img/000.png")
    assert (first["json"]["original_width"], first["json"]["original_height"]) == (64, 48)
    assert run_mmcl("shard", "verify", out).stdout.strip().endswith("OK")


def test_output_identical_across_worker_counts_and_parts(image_csv: Path, tmp_path: Path) -> None:
    opts = ("--shard-size", "7", "--shuffle", "--seed", "3", "--noise-rate", "0.3")
    shard(image_csv, tmp_path / "one", *opts, "--workers", "1")
    shard(image_csv, tmp_path / "two", *opts, "--workers", "2")
    for k in range(3):
        result = shard(image_csv, tmp_path / "parts", *opts, "--workers", "1", "--part", f"{k}/3")
        assert "mmcl shard merge" in result.stdout
    run_mmcl("shard", "merge", tmp_path / "parts")
    reference = output_digest(tmp_path / "one")
    assert len([n for n in reference if n.endswith(".tar")]) == 6
    assert output_digest(tmp_path / "two") == reference  # the last shard in pieces
    assert output_digest(tmp_path / "parts") == reference
    # one shard: two workers encode its pieces, this process joins them
    shard(image_csv, tmp_path / "single1", *opts[2:], "--workers", "1")
    shard(image_csv, tmp_path / "single2", *opts[2:], "--workers", "2")
    assert output_digest(tmp_path / "single2") == output_digest(tmp_path / "single1")


def test_the_last_shards_are_split_so_every_worker_has_work() -> None:
    from shards_tools.distribute import split_tail
    from shards_tools.plan import PlannedItem, ShardPlan
    from shards_tools.writer import ShardPiece

    def plans(sizes: list[int]) -> list[ShardPlan]:
        return [
            ShardPlan(i, [PlannedItem(f"{i}-{k}", None, []) for k in range(n)]) for i, n in enumerate(sizes)
        ]

    tasks = list(split_tail(plans([10] * 6), 6, workers=4))
    assert [t.index for t in tasks if isinstance(t, ShardPlan)] == [0, 1, 2]  # while >= 4 are left: whole
    pieces = [t for t in tasks if isinstance(t, ShardPiece)]
    assert {t.index for t in pieces} == {3, 4, 5} and len(pieces) >= 12
    for index in (3, 4, 5):
        mine = [t for t in pieces if t.index == index]
        assert [t.piece for t in mine] == list(range(mine[0].pieces)) and len(mine) == mine[0].pieces
        assert [e.key for t in mine for e in t.items] == [f"{index}-{k}" for k in range(10)]
    assert all(isinstance(t, ShardPlan) for t in split_tail(plans([10] * 3), 3, workers=1))
    single = list(split_tail(plans([3]), 1, workers=16))  # fewer items than pieces wanted
    assert [len(t.items) for t in single] == [1, 1, 1]
    empty = list(split_tail(plans([0]), 1, workers=2))
    assert len(empty) == 1 and empty[0].pieces == 1 and empty[0].items == []


def test_merge_refuses_missing_parts(image_csv: Path, tmp_path: Path) -> None:
    shard(image_csv, tmp_path / "parts", "--shard-size", "10", "--workers", "1", "--part", "0/2")
    result = run_mmcl("shard", "merge", tmp_path / "parts", check=False)
    assert result.returncode == 2
    assert "parts 1/2" in result.stderr and "Traceback" not in result.stderr


def test_ray_distributor_gives_identical_output(image_csv: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    shard(image_csv, tmp_path / "mp", "--shard-size", "10", "--workers", "2")
    shard(image_csv, tmp_path / "ray", "--shard-size", "10", "--workers", "2", "--distributor", "ray")
    assert output_digest(tmp_path / "ray") == output_digest(tmp_path / "mp")


def test_bad_items_are_skipped_counted_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "in"
    make_image(root / "good0.jpg", "red")
    make_image(root / "good1.png", "blue")
    (root / "empty.jpg").write_bytes(b"")
    truncated = make_image(root / "trunc_src.jpg", "green", size=(200, 200)).read_bytes()
    (root / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (root / "notimage.jpg").write_bytes(b"this is not an image at all" * 10)
    rows = [
        ("good0.jpg", "a red square"),
        ("good1.png", "a blue square"),
        ("empty.jpg", "an empty file"),
        ("truncated.jpg", "a truncated jpeg"),
        ("notimage.jpg", "text pretending to be an image"),
        ("missing.jpg", "a file that is not there"),
        ("good0.jpg", "   "),
        ("../escape.jpg", "outside the root"),
    ]
    manifest = root / "pairs.tsv"
    manifest.write_text("path\tcaption\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    out = tmp_path / "out"
    result = shard(manifest, out, "--shard-size", "3", "--workers", "2")
    assert "wrote 2 samples" in result.stdout and "6 skipped" in result.stdout
    manifest_json = json.loads((out / "manifest.json").read_text())
    assert manifest_json["errors_by_reason"] == {
        "decode_error": 2,
        "empty_caption": 1,
        "empty_file": 1,
        "missing_file": 1,
        "path_escapes_root": 1,
    }
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 6
    assert {e["source"].rsplit("/", 1)[-1] for e in errors if e["reason"] == "decode_error"} == {
        "truncated.jpg",
        "notimage.jpg",
    }
    assert all(e["detail"] for e in errors)
    assert run_mmcl("shard", "verify", out).returncode == 0


def test_max_error_rate_aborts_and_keeps_finished_shards(tmp_path: Path) -> None:
    root = tmp_path / "in"
    lines = []
    for i in range(12):
        if i < 6:
            make_image(root / f"{i}.png", "red")
        lines.append(f"{i}.png,caption {i}\n")
    manifest = root / "m.csv"
    manifest.write_text("path,caption\n" + "".join(lines))
    result = run_mmcl(
        "shard",
        "image-text",
        "--input",
        manifest,
        "--output",
        tmp_path / "out2",
        "--quiet",
        "--shard-size",
        "6",
        "--workers",
        "1",
        "--max-error-rate",
        "0.2",
        check=False,
    )
    assert result.returncode == 1
    assert "exceeds --max-error-rate 0.2" in result.stderr and "missing_file" in result.stderr
    assert (tmp_path / "out2" / "shard-000000.tar").exists()
    assert not (tmp_path / "out2" / "manifest.json").exists()
    # one shard split across two workers: the abort leaves no piece or shard temporaries behind
    many = [f"{i}.png,caption {i}\n" for i in range(6)] + [f"missing{i}.png,caption\n" for i in range(60)]
    manifest.write_text("path,caption\n" + "".join(many))
    result = run_mmcl(
        "shard",
        "image-text",
        "--input",
        manifest,
        "--output",
        tmp_path / "out3",
        "--quiet",
        "--workers",
        "2",
        "--max-error-rate",
        "0.2",
        check=False,
    )
    assert result.returncode == 1 and "exceeds --max-error-rate 0.2" in result.stderr
    assert not list((tmp_path / "out3").glob("*.tar")) and not list((tmp_path / "out3").glob(".*tmp*"))


def test_noise_injection_permutes_captions_and_records_truth(image_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(image_csv, out, "--noise-rate", "0.5", "--seed", "7", "--workers", "2", "--shard-size", "16")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noise"]["noisy_pairs"] == 20 and len(manifest["noise"]["permutation"]) == 20
    samples = list(wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False).decode())
    noisy = [s for s in samples if s["json"]["noisy"]]
    assert len(noisy) == 20
    assert all(s["json"]["text"] != s["json"]["original_text"] for s in noisy)
    assert all("original_text" not in s["json"] for s in samples if not s["json"]["noisy"])
    # a permutation among the chosen pairs: the multiset of captions is unchanged
    originals = sorted(s["json"].get("original_text", s["json"]["text"])[0] for s in samples)
    assert sorted(s["txt"] for s in samples) == originals
    donor = dict(manifest["noise"]["permutation"])
    by_key = {s["__key__"]: s for s in samples}
    for key, source in donor.items():
        assert by_key[key]["json"]["text"] == by_key[source]["json"].get(
            "original_text", by_key[source]["json"]["text"]
        )


def picture_manifest(root: Path, count: int) -> Path:
    """`count` 320x240 PNGs and a CSV manifest of them: enough work for a kill to land mid-run."""
    rows = []
    for i in range(count):
        make_image(root / f"{i:03d}.png", COLOURS[i % 8], size=(320, 240), seed=i)
        rows.append(f"{i:03d}.png,picture {i}\n")
    manifest = root / "m.csv"
    manifest.write_text("path,caption\n" + "".join(rows))
    return manifest


def start_paused(pause: str, args: list[str], handshake: Handshake) -> subprocess.Popen:
    """`mmcl ARGS` in a process of its own, with `pause` (code run after the imports) installing the hook that
    tells the test (`handshake(message)`) when the run has reached the point to be killed at, and holds it
    there: the kill lands at that point however fast or slowly the machine runs."""
    script = f"""
import os, sys, threading
from mmcl.cli import main
import shards_tools.writer as writer

def handshake(message):
    os.write({handshake.fd}, message.encode() + b"\\n")
    threading.Event().wait()  # until the test's kill -9

{pause}
sys.exit(main(sys.argv[1:]))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[handshake.fd],
    )
    handshake.started()
    return proc


# shards 0-2 are written and recorded, shard 3 is half written
PAUSE_IN_SHARD_3 = """
write = writer.ShardFile.write

def write_then_pause(self, data, samples=1):
    write(self, data, samples)
    if self.index == 3 and self.count == 5:
        self.stream.flush()
        handshake("shard 3 half written")

writer.ShardFile.write = write_then_pause
"""


def test_resume_after_kill_gives_identical_output(tmp_path: Path) -> None:
    manifest = picture_manifest(tmp_path / "in", 300)
    opts = ["--shard-size", "10", "--workers", "1", "--image-size", "200", "--quiet"]
    shard(manifest, tmp_path / "reference", *opts)

    out = tmp_path / "killed"
    with Handshake() as handshake:
        proc = start_paused(
            PAUSE_IN_SHARD_3, ["shard", "image-text", "--input", manifest, "--output", out, *opts], handshake
        )
        handshake.wait()
    kill9(proc, whole_group=False)
    progress = out / "_progress"
    done_before = len(list(progress.glob("shard-*.json")))
    assert 3 <= done_before < 30, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    assert list(out.glob(".shard-000003.tar.tmp-*"))  # what the kill left of the shard being written
    (out / ".shard-000029.tar.tmp-99999").write_bytes(b"partial garbage")  # as a kill mid-write leaves
    (out / "shard-000028.tar").write_bytes(b"partial")  # a shard with no record is redone

    shard(manifest, out, *opts)
    assert output_digest(out) == output_digest(tmp_path / "reference")
    assert not list(out.glob(".*tmp*"))


# the first piece is joined into the shard's temporary file; the workers go on writing the other pieces
PAUSE_WHILE_JOINING = """
append = writer.ShardFile.append

def append_then_pause(self, piece, samples):
    append(self, piece, samples)
    self.stream.flush()
    handshake("joining")

writer.ShardFile.append = append_then_pause
"""


def test_kill_while_a_shard_is_joined_from_pieces_then_resume(tmp_path: Path) -> None:
    """One shard on two workers is written in pieces; a kill while they are being joined leaves piece files
    and the shard's temporary, which the re-run removes before ending with the uninterrupted output."""
    manifest = picture_manifest(tmp_path / "in", 240)
    opts = ["--image-size", "200", "--quiet"]
    shard(manifest, tmp_path / "reference", *opts, "--workers", "1")

    out = tmp_path / "killed"
    args = ["shard", "image-text", "--input", manifest, "--output", out, *opts, "--workers", "2"]
    with Handshake() as handshake:
        proc = start_paused(PAUSE_WHILE_JOINING, args, handshake)
        handshake.wait()

    def pieces() -> list[Path]:
        return list(out.glob(".shard-000000.tar.tmp-piece*"))

    wait_until(lambda: bool(pieces()), "a worker has written a piece that is still to be joined", proc)
    kill9(proc, whole_group=False)  # the main process, as `kill -9 PID` (its workers die with it)
    assert not (out / "shard-000000.tar").exists(), "the kill should land while pieces are written"
    assert pieces() and [p for p in out.glob(".shard-000000.tar.tmp-*") if "piece" not in p.name]
    shard(manifest, out, *opts, "--workers", "2")
    assert output_digest(out) == output_digest(tmp_path / "reference")
    assert not list(out.glob(".*tmp*"))


def test_resume_refuses_other_options(image_csv: Path, tmp_path: Path) -> None:
    shard(image_csv, tmp_path / "out", "--shard-size", "10")
    result = run_mmcl(
        "shard",
        "image-text",
        "--input",
        image_csv,
        "--output",
        tmp_path / "out",
        "--shard-size",
        "11",
        check=False,
    )
    assert result.returncode == 2
    assert "shard_size" in result.stderr and "new --output" in result.stderr


def test_verify_catches_a_corrupted_shard(image_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(image_csv, out, "--shard-size", "20")
    path = out / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run_mmcl("shard", "verify", out, check=False)
    assert result.returncode == 1
    assert "shard-000001.tar: sha256 differs" in result.stdout
    assert "shard-000000.tar" not in result.stdout


def test_stats_and_plot(image_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(image_csv, out, "--shard-size", "20")
    result = run_mmcl("shard", "stats", out, "--json", "--plot", tmp_path / "stats.png")
    stats = json.loads(result.stdout.split("\nplot:")[0])
    assert stats["samples"] == 40 and stats["shards"] == 2
    assert stats["width"]["min"] == 64 and stats["width"]["max"] == 103
    assert stats["caption_words"]["min"] == 5
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audio_folder_to_laion_clap_layout(tmp_path: Path) -> None:
    root = tmp_path / "audio_in"
    for i, freq in enumerate([220, 330, 440, 550, 660]):
        make_tone(root / f"tone{i}.wav", freq, seconds=1.0, rate=44100, channels=2)
        (root / f"tone{i}.txt").write_text(f"a pure tone at {freq} hertz\n")
    out = tmp_path / "out"
    run_mmcl(
        "shard",
        "audio-text",
        "--input",
        root,
        "--output",
        out,
        "--sample-rate",
        "16000",
        "--max-seconds",
        "0.5",
        "--quiet",
    )
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert len(samples) == 5
    import io

    import soundfile

    for sample in samples:
        assert set(sample) >= {"flac", "json", "txt"}
        meta = json.loads(sample["json"])
        assert meta["text"] == [sample["txt"].decode()]  # LAION-CLAP reads json["text"]
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16000 and audio.ndim == 1 and len(audio) == 8000
        assert meta["sample_rate"] == 16000 and meta["duration"] == 0.5
    assert run_mmcl("shard", "verify", out).stdout.strip().endswith("OK")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard-size", "0"], "--shard-size: Input should be greater than or equal to 1"),
        (["--part", "3/2"], "--part must be K/N with 0 <= K < N"),
        (["--part", "x"], "--part: expected K/N"),
        (["--noise-rate", "1.5"], "--noise-rate"),
        (["--image-size", "-4"], "--image-size"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_message(image_csv: Path, tmp_path: Path, flags, message) -> None:
    result = run_mmcl(
        "shard", "image-text", "--input", image_csv, "--output", tmp_path / "o", *flags, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    result = run_mmcl(
        "shard", "image-text", "--input", tmp_path / "nope.csv", "--output", tmp_path / "o", check=False
    )
    assert result.returncode == 2 and "nope.csv" in result.stderr and "Traceback" not in result.stderr


def test_help_shows_examples() -> None:
    for command in (
        ["shard", "image-text"],
        ["shard", "audio-text"],
        ["shard", "verify"],
        ["shard", "stats"],
    ):
        assert "example:" in run_mmcl(*command, "--help").stdout


def test_open_clip_trainer_reads_image_shards(image_csv: Path, tmp_path: Path) -> None:
    """open_clip's own loader (it needs webdataset 0.2.86, installed apart by the Makefile) reads the
    shards."""
    old_wds = REPO / ".venv" / "wds-0.2.86"
    if not old_wds.exists():
        pytest.fail("missing .venv/wds-0.2.86: run `make install`")
    out = tmp_path / "out"
    shard(image_csv, out, "--shard-size", "10", "--image-size", "40")
    script = f"""
import argparse, open_clip
from open_clip_train.data import get_wds_dataset
_, _, preprocess = open_clip.create_model_and_transforms("RN50", pretrained=None) \
if False else (None, None, None)
import torchvision.transforms as T
preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
tokenizer = open_clip.get_tokenizer("ViT-B-32")
args = argparse.Namespace(train_data="{out}/shard-{{000000..000003}}.tar", train_num_samples=None, \
dataset_resampled=False,
    train_data_upsampling_factors=None, seed=0, batch_size=8, world_size=1, workers=1)
data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
seen = 0
for images, texts in data.dataloader:
    assert images.shape[1:] == (3, 32, 32) and texts.shape[1] == 77
    seen += images.shape[0]
print("samples", data.dataloader.num_samples, "seen", seen)
"""
    env = {**os.environ, "PYTHONPATH": str(old_wds)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "samples 40 seen 40" in result.stdout


def test_shards_are_valid_tar_with_sorted_members(image_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(image_csv, out, "--shard-size", "40", "--image-format", "png")
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.json", "000000000.png", "000000000.txt"]
    assert all(m.mtime == 0 for m in tarfile.open(out / "shard-000000.tar").getmembers())


def test_csv_with_several_caption_columns(tmp_path: Path) -> None:
    root = tmp_path / "in"
    make_image(root / "a.jpg", "red")
    with open(root / "m.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "cap1", "cap2"])
        writer.writerow(["a.jpg", "first caption", "second caption"])
    out = tmp_path / "out"
    run_mmcl(
        "shard",
        "image-text",
        "--input",
        root / "m.csv",
        "--output",
        out,
        "--quiet",
        "--caption-column",
        "cap1",
        "--caption-column",
        "cap2",
    )
    sample = next(iter(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode()))
    assert sample["txt"] == "first caption"
    assert sample["json"]["text"] == ["first caption", "second caption"]


def test_cli_parser_builds_without_importing_torch() -> None:
    """`mmcl shard ...` and every `--help` start in well under a second: torch and open_clip load only when
    a command trains, embeds or evaluates."""
    script = (
        "import sys; from mmcl.cli import build_parser; build_parser(); "
        "print(sorted({'torch', 'open_clip'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


def test_tar_members_are_the_bytes_webdataset_writes(tmp_path: Path) -> None:
    """shards_tools writes tars with the stdlib (importing webdataset costs a torch import); the bytes must
    stay exactly what webdataset's own TarWriter writes."""
    import io

    from shards_tools.writer import TAR_MTIME, sample_bytes, tar_end

    for count in (0, 1, 5, 40):  # the end padding depends on the size
        samples = [
            {
                "__key__": f"k{i:03d}" if i else "clé_0",
                "txt": f"caption {i} é".encode(),
                "jpg": bytes(range(256)) * (i + 1),
                "cls": b"3",
            }
            for i in range(count)
        ]
        members = b"".join(sample_bytes(sample) for sample in samples)
        ours = members + tar_end(len(members))
        theirs = io.BytesIO()
        with wds.TarWriter(theirs, encoder=False, mtime=TAR_MTIME, user="mmcl", group="mmcl") as writer:
            for sample in samples:
                writer.write(sample)
        assert ours == theirs.getvalue()
    assert b"PaxHeader" in ours[:512] and ours.count(b"PaxHeader") == 3  # the non-ASCII key's 3 members only


def test_noise_with_a_label_column_never_gives_a_pair_its_own_class(tmp_path: Path) -> None:
    """Captions in several wordings per class: without --label-column the noise tells captions apart by text,
    so some noisy pairs get their own class in other words (matched pairs recorded as noisy), and the sharder
    says which column to pass; with it, every noisy pair gets another class's caption."""
    root = tmp_path / "in"
    rows = []
    for i in range(60):
        colour = COLOURS[i % 4]
        make_image(root / f"{i:03d}.png", colour, size=(16, 16), seed=i)
        rows.append(
            {
                "path": f"{i:03d}.png",
                "caption": f"{['a', 'one', 'the'][i % 3]} {colour} square",
                "label": colour,
            }
        )
    manifest = root / "pairs.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)

    def own_class_noisy(out: Path) -> int:
        samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode())
        noisy = [s for s in samples if s["json"]["noisy"]]
        assert len(noisy) == 30
        return sum(s["json"]["label"] in s["txt"] for s in noisy)

    unlabelled = shard(
        manifest, tmp_path / "text", "--noise-rate", "0.5", "--seed", "1", "--shard-size", "60"
    )
    assert "pass --label-column label" in unlabelled.stderr
    assert own_class_noisy(tmp_path / "text") > 0
    labelled = shard(manifest, tmp_path / "label", "--noise-rate", "0.5", "--seed", "1", "--shard-size", "60",
                     "--label-column", "label")  # fmt: skip
    assert "--label-column" not in labelled.stderr
    assert own_class_noisy(tmp_path / "label") == 0
