"""`mmcl shard verify` on shard sets damaged in each way it checks, and `mmcl shard merge` refusing part
records it cannot join. The shards are real ones written by the project's sharder; the damage is done with
tarfile."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from media_files import COLOURS, make_image
from processes import run_mmcl

from mmcl.cli import main
from shards_tools.config import build_config
from shards_tools.run import run_sharding

SHARDS = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def write_images(root: Path, count: int) -> Path:
    """`count` real PNG images and a CSV manifest captioning them."""
    rows = []
    for i in range(count):
        colour = COLOURS[i % len(COLOURS)]
        make_image(root / f"{i:03d}.png", colour, size=(36, 30), seed=i)
        rows.append(f"{i:03d}.png,a {colour} square number {i}\n")
    (root / "pairs.csv").write_text("path,caption\n" + "".join(rows))
    return root / "pairs.csv"


def shard(manifest: Path, output: Path, **options: object) -> dict:
    """Run the project's sharder in this process (24 images in shards of 8 unless told otherwise)."""
    fields = {
        "input": {"modality": "image", "path": manifest},
        "output": output,
        "shard_size": 8,
        "workers": 1,
    }
    return run_sharding(build_config({**fields, **options}), progress=False)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("verify_images"), 24)


@pytest.fixture(scope="module")
def pristine(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards of 8 real samples that verify cleanly."""
    output = tmp_path_factory.mktemp("pristine") / "shards"
    result = shard(manifest, output)
    assert [s["name"] for s in result["shards"]] == SHARDS
    return output


def verify(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """`mmcl shard verify FOLDER` through the CLI's entry point: (exit code, the problem lines)."""
    capsys.readouterr()
    code = main(["shard", "verify", str(folder)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("checked 3 shards, ")
    return code, [line.strip() for line in lines[1:]]


def rewrite_tar(path: Path, keep: Callable[[tarfile.TarInfo], bool]) -> list[str]:
    """Rewrite a shard with only the members `keep` accepts, in their order; returns the dropped names."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    buffer = io.BytesIO()
    dropped = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for member, data in members:
            if keep(member):
                out.addfile(member, io.BytesIO(data) if data is not None else None)
            else:
                dropped.append(member.name)
    path.write_bytes(buffer.getvalue())
    return dropped


def record_in_manifest(folder: Path, name: str) -> None:
    """Make manifest.json's bytes and sha256 for shard `name` match the file as it is now."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    data = (folder / name).read_bytes()
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(manifest))


def first_key(path: Path) -> str:
    with tarfile.open(path) as tar:
        return tar.getmembers()[0].name.split(".")[0]


@pytest.fixture
def damaged(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine shards to damage."""
    folder = tmp_path / "shards"
    shutil.copytree(pristine, folder)
    return folder


def test_the_pristine_shards_verify(pristine: Path, capsys: pytest.CaptureFixture) -> None:
    """The baseline every damage below departs from: exit 0, no problem lines."""
    code, problems = verify(pristine, capsys)
    assert (code, problems) == (0, [])


@pytest.mark.parametrize("member", ["txt", "json"])
def test_a_sample_missing_a_member_is_named(
    damaged: Path, member: str, capsys: pytest.CaptureFixture
) -> None:
    """A sample whose .txt or .json was removed from its shard: exit 1 and a line naming shard, key and
    member; nothing is reported about the other shards."""
    path = damaged / "shard-000001.tar"
    key = first_key(path)
    assert rewrite_tar(path, lambda m: m.name != f"{key}.{member}") == [f"{key}.{member}"]
    code, problems = verify(damaged, capsys)
    assert code == 1
    assert f"shard-000001.tar: sample {key}: missing .{member}" in problems
    assert "shard-000001.tar: sha256 differs from the manifest (the file changed)" in problems
    assert all(p.startswith("shard-000001.tar: ") for p in problems)


def test_a_sample_count_other_than_the_manifest_is_reported(
    damaged: Path, capsys: pytest.CaptureFixture
) -> None:
    """A whole sample removed from a shard whose bytes and sha256 were then recorded again: the count is the
    only thing left that disagrees, and verify says so."""
    path = damaged / "shard-000002.tar"
    key = first_key(path)
    dropped = rewrite_tar(path, lambda m: m.name.split(".")[0] != key)
    assert len(dropped) == 3  # image, .txt and .json
    record_in_manifest(damaged, "shard-000002.tar")
    code, problems = verify(damaged, capsys)
    assert (code, problems) == (1, ["shard-000002.tar: 7 samples, manifest says 8"])


def test_sizes_json_disagreeing_with_the_manifest(damaged: Path, capsys: pytest.CaptureFixture) -> None:
    """sizes.json (what open_clip's trainer reads) with one count changed: exit 1, the file is named."""
    sizes = json.loads((damaged / "sizes.json").read_text())
    assert sizes == dict.fromkeys(SHARDS, 8)
    sizes["shard-000000.tar"] = 9
    (damaged / "sizes.json").write_text(json.dumps(sizes))
    code, problems = verify(damaged, capsys)
    assert (code, problems) == (1, ["sizes.json: counts disagree with manifest.json"])


def test_sizes_json_missing(damaged: Path, capsys: pytest.CaptureFixture) -> None:
    (damaged / "sizes.json").unlink()
    code, problems = verify(damaged, capsys)
    assert (code, problems) == (1, ["sizes.json: missing (open_clip's trainer reads it)"])


def test_a_stray_shard_not_in_the_manifest(damaged: Path, capsys: pytest.CaptureFixture) -> None:
    """A shard file with the set's prefix that manifest.json does not list (e.g. left by another run)."""
    shutil.copy(damaged / "shard-000000.tar", damaged / "shard-000007.tar")
    code, problems = verify(damaged, capsys)
    assert (code, problems) == (1, ["shard-000007.tar: a shard file not listed in manifest.json"])


def test_a_missing_shard_file(damaged: Path, capsys: pytest.CaptureFixture) -> None:
    (damaged / "shard-000001.tar").unlink()
    code, problems = verify(damaged, capsys)
    assert (code, problems) == (1, ["shard-000001.tar: missing"])


def test_verify_exit_code_through_the_real_command(damaged: Path) -> None:
    """Through a subprocess, as a shell script sees it: exit status 1 and the problem on stdout."""
    (damaged / "shard-000002.tar").unlink()
    result = run_mmcl("shard", "verify", damaged, "--no-decode", check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "checked 3 shards, 16 samples: 1 problem(s)",
        "  shard-000002.tar: missing",
    ]


# ------------------------------------------------------------------------------------------ merge


def merge(folder: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """`mmcl shard merge FOLDER` through the CLI's entry point: (exit code, stderr lines)."""
    capsys.readouterr()  # only what the merge itself says
    code = main(["shard", "merge", str(folder)])
    captured = capsys.readouterr()
    return code, captured.err.splitlines()


def parts_of(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "_parts").glob("part-*.json"))


def test_merge_without_part_records(tmp_path: Path) -> None:
    """A folder no part run wrote to: exit 2, one line saying what to run first, no traceback (the real
    command in a subprocess)."""
    (tmp_path / "empty").mkdir()
    result = run_mmcl("shard", "merge", tmp_path / "empty", check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mmcl shard merge: error: no part records in {tmp_path / 'empty' / '_parts'}: "
        f"run `mmcl shard ... --output {tmp_path / 'empty'}` first"
    ]


def test_merge_refuses_parts_of_runs_split_differently(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Part 0/2 and part 0/3 of the same input in one folder: exit 2, one line naming both splits."""
    out = tmp_path / "out"
    shard(manifest, out, part=(0, 2))
    shard(manifest, out, part=(0, 3))
    assert parts_of(out) == ["part-00000-of-00002.json", "part-00000-of-00003.json"]
    code, err = merge(out, capsys)
    assert code == 2
    assert err == [
        f"mmcl shard merge: error: {out / '_parts'} mixes runs split into [2, 3] parts; remove the stale ones"
    ]
    assert not (out / "manifest.json").exists()


def test_merge_refuses_while_a_part_is_missing(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Parts 0/3 and 2/3 done, 1/3 not: exit 2, one line naming the missing part, no manifest; once the part
    is done the merge succeeds."""
    out = tmp_path / "out"
    shard(manifest, out, part=(0, 3))
    shard(manifest, out, part=(2, 3))
    code, err = merge(out, capsys)
    assert code == 2
    assert err == [
        f"mmcl shard merge: error: parts 1/3 of {out} have not finished; "
        "run them (--part K/N), then merge again"
    ]
    assert not (out / "manifest.json").exists()
    shard(manifest, out, part=(1, 3))
    assert merge(out, capsys) == (0, [])
    assert json.loads((out / "manifest.json").read_text())["totals"]["samples"] == 24


def test_merge_refuses_parts_written_with_other_options(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Part 1/2 of a run with other options (--shuffle --seed 5) copied beside part 0/2 (the sharder refuses
    to write it there itself): exit 2, one line naming the part, no manifest."""
    out, other = tmp_path / "out", tmp_path / "other"
    shard(manifest, out, part=(0, 2))
    shard(manifest, other, part=(1, 2), seed=5, shuffle=True)
    shutil.copy(other / "_parts" / "part-00001-of-00002.json", out / "_parts")
    assert parts_of(out) == ["part-00000-of-00002.json", "part-00001-of-00002.json"]
    code, err = merge(out, capsys)
    assert code == 2
    assert err == [f"mmcl shard merge: error: part 1 of {out} was written with other options than part 0"]
    assert not (out / "manifest.json").exists()
