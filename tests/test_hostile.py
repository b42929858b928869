"""Hostile input: one regression test per hole of the hostile-input issue, on tiny real inputs.

Every input comes from tests/hostile_inputs.py (the corpus bench/attack_corpus.py runs through every entry
point); here each hole is pinned at the layer that closes it, plus the entry points users meet (the CLI's
exit code and message). Nothing here sleeps: the slow servers trickle on their own threads and the code
under test must cut them off by its deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from hostile_inputs import (
    HOSTILE_LABELS,
    HOSTILE_PART_KINDS,
    alias_bomb_config,
    canaries,
    chunked_server,
    corrupt_progress_options,
    deep_json,
    deep_jsonl_manifest,
    disguised_image,
    eps_bytes,
    file_server,
    gnu_longname_bomb,
    good_samples,
    gzip_tar_of_zeros,
    hostile_manifest,
    hostile_part,
    huge_length_server,
    oversized_member,
    pax_header_bomb,
    pipe_string,
    pixel_bombs,
    sample,
    samples_tar,
    shard_with,
    slowloris_server,
    sparse_member,
    wav_bytes,
    write_shard_folder,
)
from media_files import make_image
from processes import REPO

from mmcl.cli import main
from mmcl.data import BadSample, DataConfig, build_train_stream, load_clip
from mmcl.data.image import decode_image
from mmcl.errors import UsageError
from mmcl.eval.datasets import MediaDecoder, open_classification, open_retrieval
from shards_tools.config import AudioOptions, FetchOptions, ImageOptions, InputSpec, build_config
from shards_tools.decode import MAX_RESAMPLE_KERNEL, DecodeError, resample_cost, resampling_rate
from shards_tools.encode import encode_audio, encode_image
from shards_tools.fetch import fetch_bytes
from shards_tools.items import ItemError, SourceItem
from shards_tools.plan import _source_bytes
from shards_tools.readers import read_items
from shards_tools.run import run_sharding
from shards_tools.stats import collect_stats
from shards_tools.tar_stream import PipeRefused, ReadOptions, ShardReadError, iter_samples
from shards_tools.verify import verify_shards
from shards_tools.writer import sample_bytes, write_atomic

TOKENIZER = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
PIXELS = lambda image: torch.zeros(3, 4, 4)  # noqa: E731


def one_epoch(
    cfg: DataConfig, modality: str = "image", transform=PIXELS
) -> tuple[list[str], dict[str, str], list[str], int]:
    """Epoch 0 of a stream over `cfg` (0 workers): the keys trained on, the samples skipped as bad
    {key: reason}, the shard-level errors the handler saw, and the reader's own count of skipped samples."""
    bad: dict[str, str] = {}
    shard_errors: list[str] = []

    def handler(err: Exception) -> bool:
        if isinstance(err, BadSample):
            bad[err.key] = err.reason
        else:
            shard_errors.append(str(err))
        return True

    stream = build_train_stream(
        cfg,
        modality=modality,
        media_transform=transform if modality == "image" else None,
        tokenizer=TOKENIZER,
        handler=handler,
    )
    keys: list[str] = []
    skipped = 0
    for batch in stream:
        if batch["epoch"] > 0:
            break
        keys += batch["keys"]
        skipped = batch["skipped"]
    return keys, bad, shard_errors, skipped


def data_config(urls: str | list[str], **overrides) -> DataConfig:
    """One sample per batch, so that epoch 0 ends exactly where its last batch does."""
    return DataConfig(sources=[{"urls": urls}], batch_size=1, workers=0, shuffle_buffer=0, **overrides)


# ---------------------------------------------------------------------------------------- 1. pipe: paths


def test_eval_refuses_a_pipe_data_path_and_runs_nothing(tmp_path: Path, capsys) -> None:
    """`mmcl eval retrieval --data "pipe:touch X{0..0}"` exits 2 naming --allow-pipe, and no shell ran."""
    canary = tmp_path / "canary"
    argv = ["eval", "retrieval", "--open-clip", "mmcl-micro-vit", "--data", pipe_string(canary),
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "--allow-pipe" in capsys.readouterr().err
    for opener in (open_retrieval, open_classification):
        with pytest.raises(UsageError, match="runs a shell command"):
            opener(pipe_string(canary), "image")
    assert canaries(canary) == []


def test_an_allowed_pipe_data_path_is_read(tmp_path: Path) -> None:
    """With --allow-pipe the same path kind is a shard stream (the user's own `pipe:cat`)."""
    shard = tmp_path / "s.tar"
    shard.write_bytes(samples_tar(good_samples(tmp_path / "src", "image", 3)))
    data = open_retrieval(f"pipe:cat {shard}", "image", read_options=ReadOptions(allow_pipe=True))
    decoder = MediaDecoder("image", image_transform=PIXELS)
    assert sum(item is not None for item in data.dataset(decoder)) == 3


def test_a_pipe_eval_path_in_a_training_config_is_refused_by_check(tmp_path: Path, capsys) -> None:
    """eval.retrieval[].data: pipe:... fails `mmcl train --check` (data.allow_pipe is false) with the key."""
    shards = write_shard_folder(
        tmp_path / "shards", "image", {"shard-000000.tar": shard_with(tmp_path / "s", "image")}
    )
    canary = tmp_path / "canary"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(shards)}], "workers": 1},
        "optim": {"warmup_steps": 1}, "train": {"steps": 2},
        "eval": {"every_steps": 1, "retrieval": [{"name": "r", "data": pipe_string(canary)}]},
    }))  # fmt: skip
    assert main(["train", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert "eval.retrieval[0].data" in err and "data.allow_pipe: true" in err
    assert canaries(canary) == []


def test_the_shard_opener_never_runs_a_pipe_it_was_not_allowed(tmp_path: Path) -> None:
    """Below every config check, the opener itself refuses, whatever the error handler says."""
    canary = tmp_path / "canary"
    with pytest.raises(PipeRefused):
        list(iter_samples(f"pipe:touch {canary}", handler=lambda err: True))
    assert not canary.exists()


# ---------------------------------------------------------------------------------------- 2. sample rates


def test_odd_sample_rates_resample_at_bounded_cost_or_are_refused() -> None:
    """44,101 Hz -> 16 kHz would need a ~700M-element kernel; it is resampled from 44,100 Hz. Rates out of
    range are refused by the loader and by the sharder, each with its reason."""
    assert resample_cost(44_101, 16_000) > 100 * MAX_RESAMPLE_KERNEL
    assert resampling_rate(44_101, 16_000) == 44_100
    assert resampling_rate(44_100, 16_000) == 44_100 and resampling_rate(16_000, 16_000) == 16_000
    with pytest.raises(DecodeError, match="bounded cost"):
        resampling_rate(1_001, 16_001)  # no round rate near 1,001 Hz shares a divisor with 16,001
    clip = load_clip(wav_bytes(44_101, frames=44_101), "k", sample_rate=16_000, clip_seconds=1.0, rng=None)
    assert clip.shape == (16_000,) and torch.isfinite(clip).all() and clip.abs().max() > 0.05
    encoded = encode_audio(wav_bytes(44_101, frames=44_101), AudioOptions(sample_rate=16_000))
    assert encoded.meta["sample_rate"] == 16_000 and encoded.meta["original_sample_rate"] == 44_101
    for rate in (999_983, 1, 2**31 - 1):
        with pytest.raises(BadSample, match="outside"):
            load_clip(wav_bytes(rate), "k", sample_rate=16_000, clip_seconds=1.0, rng=None)
        with pytest.raises(ItemError) as caught:
            encode_audio(wav_bytes(rate), AudioOptions(sample_rate=16_000))
        assert caught.value.reason == "decode_error" and "outside" in caught.value.detail


def test_a_clip_that_decodes_to_hours_is_refused_by_the_sharder() -> None:
    """An hour of FLAC silence (35 KB) would decode to 690 MB of floats: skipped as too_large."""
    from hostile_inputs import silent_flac

    with pytest.raises(ItemError) as caught:
        encode_audio(silent_flac(), AudioOptions())
    assert caught.value.reason == "too_large" and "--max-seconds" in caught.value.detail


# ---------------------------------------------------------------------------------------- 3. tar members


@pytest.mark.parametrize(
    "bomb",
    ["sparse", "oversized", "pax", "longname", "gzip"],
)
def test_tar_bombs_are_refused_before_their_bytes_are_read(bomb: str, tmp_path: Path) -> None:
    """Each bomb ends as a refused member or an unreadable shard, and the reader's Python allocations stay
    under 32 MiB (the bombs claim 256 MiB to 8 GiB); the good samples before it are read."""
    head = [sample_bytes(s) for s in good_samples(tmp_path / "src", "image", 2)]
    path = tmp_path / ("bomb.tar.gz" if bomb == "gzip" else "bomb.tar")
    if bomb == "gzip":
        gzip_tar_of_zeros(path, b"".join(head), "000009.jpg", b"")
    else:
        piece = {
            "sparse": lambda: sparse_member("000009.jpg"),
            "oversized": lambda: oversized_member("000009.jpg"),
            "pax": pax_header_bomb,
            "longname": gnu_longname_bomb,
        }[bomb]()
        path.write_bytes(b"".join([*head, piece]) + bytes(1024))
    errors: list[Exception] = []
    tracemalloc.start()
    try:
        samples = list(iter_samples(str(path), handler=lambda err: errors.append(err) or True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    assert [s["__key__"] for s in samples[:2]] == ["000000", "000001"]
    problems = [s["__problem__"] for s in samples if "__problem__" in s] + [str(e) for e in errors]
    assert problems, "the bomb went unreported"
    assert all(isinstance(e, ShardReadError) for e in errors)


def test_a_sparse_member_is_a_counted_skip_in_training_verify_stats_and_the_sharder(tmp_path: Path) -> None:
    """The same hostile shard through the training stream (skipped, counted, the other samples trained on),
    verify (a problem naming it), stats (an unreadable record) and the webdataset input reader (an item
    with its problem)."""
    shard = shard_with(tmp_path / "src", "image", sparse_member("000099.jpg"), sparse_member("000099.json"))
    folder = write_shard_folder(
        tmp_path / "shards", "image", {"shard-000000.tar": shard}, counts={"shard-000000.tar": 5}
    )
    keys, bad, _, _ = one_epoch(data_config(str(folder)))
    assert sorted(keys) == ["000000", "000001", "000002", "000003"] and "sparse" in bad["000099"]
    report = verify_shards(folder)
    assert any("000099" in p and "sparse" in p for p in report.problems)
    assert collect_stats(folder)["unreadable"] == 1
    items = list(
        read_items(InputSpec(modality="image", path=folder / "shard-000000.tar", format="webdataset"))
    )
    flagged = [i for i in items if i.problem is not None]
    assert len(items) == 5 and len(flagged) == 1 and "sparse" in flagged[0].problem.detail


def test_verify_streams_a_shard_larger_than_its_cap_without_holding_it(tmp_path: Path) -> None:
    """A 3 MiB media member with --max-bytes 1 MiB is reported, not read; the other samples are checked."""
    big = sample("000007", jpg=bytes(3 << 20))
    shard = shard_with(tmp_path / "src", "image", sample_bytes(big))
    folder = write_shard_folder(tmp_path / "shards", "image", {"shard-000000.tar": shard})
    report = verify_shards(folder, max_member_bytes=1 << 20)
    assert report.samples == 5 and any("000007" in p and "over the cap" in p for p in report.problems)
    assert not any(p.startswith("shard-000000.tar: sample 000000") for p in report.problems)


# ---------------------------------------------------------------------------------------- 4. URLs


def test_a_url_announcing_terabytes_is_skipped_too_large_at_once() -> None:
    with huge_length_server(duration=5.0) as base:
        with pytest.raises(ItemError) as caught:
            fetch_bytes(f"{base}/image.jpg", FetchOptions(retries=0))
    assert caught.value.reason == "too_large" and "10,000,000,000,000" in caught.value.detail


def test_an_endless_body_stops_at_max_bytes() -> None:
    with chunked_server() as base:
        with pytest.raises(ItemError) as caught:
            fetch_bytes(f"{base}/image.jpg", FetchOptions(retries=0, max_bytes=1 << 20))
    assert caught.value.reason == "too_large"


def test_a_trickling_server_is_cut_off_by_the_url_deadline() -> None:
    """One byte every 0.2 s passes a 5 s read timeout forever (100 KB would take 5.5 hours); the 1.5 s
    deadline ends it, whether the server trickles its headers or its body."""
    for slow_headers in (True, False):
        with slowloris_server(interval=0.2, slow_headers=slow_headers) as base:
            with pytest.raises(ItemError) as caught:
                fetch_bytes(f"{base}/image.jpg", FetchOptions(timeout=5, retries=1, deadline=1.5))
        assert caught.value.reason == "fetch_error" and "--url-deadline" in caught.value.detail


def test_training_goes_on_past_a_stalled_http_shard(tmp_path: Path, monkeypatch) -> None:
    """A shard whose server trickles is abandoned after data.http_timeout with an error naming it; the
    other shard of the source is trained on."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    good = samples_tar(good_samples(tmp_path / "src", "image", 4))
    with (
        file_server({"/shard-000000.tar": good}) as fast,
        slowloris_server(interval=0.2, slow_headers=False) as slow,
    ):
        cfg = data_config([f"{fast}/shard-000000.tar", f"{slow}/shard-000001.tar"], http_timeout=1.0)
        keys, bad, shard_errors, _ = one_epoch(cfg)
    assert sorted(keys) == ["000000", "000001", "000002", "000003"] and not bad
    assert any("shard-000001.tar" in e and "stalled" in e for e in shard_errors), shard_errors


def test_a_server_that_trickles_its_status_line_costs_a_shard_not_the_run() -> None:
    """The header deadline cuts the status line short (http.client's BadStatusLine, not an OSError): the
    shard goes to the handler like any unreadable shard."""
    errors: list[Exception] = []
    with slowloris_server(interval=0.2, slow_headers=True) as slow:
        samples = list(
            iter_samples(
                f"{slow}/shard-000000.tar",
                handler=lambda err: errors.append(err) or True,
                options=ReadOptions(http_timeout=1.0),
            )
        )
    assert samples == [] and len(errors) == 1 and isinstance(errors[0], ShardReadError)
    assert "shard-000000.tar" in str(errors[0]) and "http_timeout" in str(errors[0])


# ---------------------------------------------------------------------------------------- 5. formats


def test_eps_and_other_formats_never_reach_a_decoder() -> None:
    """EPS (which Pillow renders with Ghostscript) and formats off the allow-list, stored as .jpg, are
    refused by the loader, the evaluator and the sharder; pixel bombs are refused before decoding."""
    for data in (eps_bytes(), disguised_image("PCX"), disguised_image("TGA")):
        with pytest.raises(BadSample, match="cannot identify an image of an allowed format"):
            decode_image(data, "k")
        with pytest.raises(ItemError, match="decode_error: cannot identify"):
            encode_image(data, ImageOptions())
    for data in pixel_bombs().values():
        with pytest.raises(BadSample, match="decompression bomb"):
            decode_image(data, "k")
        with pytest.raises(ItemError) as caught:
            encode_image(data, ImageOptions())
        assert caught.value.reason in ("decompression_bomb", "decode_error")


# ---------------------------------------------------------------------------------------- 6. samples


def test_bad_samples_in_a_training_shard_are_counted_skips(tmp_path: Path) -> None:
    """Deep JSON, a disguised EPS, a pixel bomb and an out-of-range audio rate among good samples: every
    good sample is trained on, every bad one skipped with its reason, nothing raised."""
    hostile = [
        sample("000090", jpg=make_image(tmp_path / "x.png", "red").read_bytes(), json=deep_json()),
        sample("000091", jpg=eps_bytes()),
        sample("000092", png=pixel_bombs()["png-100000x100000"]),
        sample(
            "000093",
            jpg=make_image(tmp_path / "y.png", "red").read_bytes(),
            cls=HOSTILE_LABELS["cls-5000-digits"],
        ),
    ]
    shard = shard_with(tmp_path / "src", "image", *map(sample_bytes, hostile))
    folder = write_shard_folder(
        tmp_path / "shards", "image", {"shard-000000.tar": shard}, counts={"shard-000000.tar": 8}
    )
    keys, bad, errors, skipped = one_epoch(data_config(str(folder)))
    assert sorted(keys) == [
        "000000",
        "000001",
        "000002",
        "000003",
        "000093",
    ]  # a label is not needed to train
    assert sorted(bad) == ["000090", "000091", "000092"] and skipped == 3 and not errors
    assert "nested deeper" in bad["000090"] and "allowed format" in bad["000091"] and "bomb" in bad["000092"]

    audio = shard_with(tmp_path / "asrc", "audio", sample_bytes(sample("000095", wav=wav_bytes(999_983))))
    audio_folder = write_shard_folder(tmp_path / "ashards", "audio", {"shard-000000.tar": audio})
    keys, bad, _, _ = one_epoch(data_config(str(audio_folder), sample_rate=16_000, clip_seconds=0.5), "audio")
    assert len(keys) == 4 and list(bad) == ["000095"] and "outside" in bad["000095"]


def test_one_exception_boundary_per_sample_in_the_loader_and_the_evaluator(tmp_path: Path) -> None:
    """A transform that raises what Pillow raises on some hostile files (NotImplementedError for a mode it
    cannot convert) costs the loader and the evaluator that one sample, counted, not the run."""
    odd = make_image(tmp_path / "odd.png", "blue", size=(13, 13)).read_bytes()

    def transform(image):
        if image.width == 13:
            raise NotImplementedError("conversion from mode 'X' is not supported")
        return torch.zeros(3, 4, 4)

    shard = shard_with(tmp_path / "src", "image", sample_bytes(sample("000050", png=odd)))
    folder = write_shard_folder(tmp_path / "shards", "image", {"shard-000000.tar": shard})
    keys, bad, _, skipped = one_epoch(data_config(str(folder)), transform=transform)
    assert sorted(keys) == ["000000", "000001", "000002", "000003"] and skipped == 1
    assert list(bad) == ["000050"] and "NotImplementedError" in bad["000050"]
    data = open_classification(folder, "image")
    items = list(data.dataset(MediaDecoder("image", image_transform=transform)))
    assert len(items) == 5 and sum(item is None for item in items) == 1


def test_hostile_labels_in_eval_shards_are_skipped_not_fatal(tmp_path: Path) -> None:
    """A .cls of 5,000 digits (int() refuses it), a negative, a non-ASCII digit and an index beyond the
    class names: each sample is skipped and counted; the others are evaluated."""
    image = make_image(tmp_path / "z.png", "green").read_bytes()
    hostile = [sample(f"00008{i}", png=image, cls=label) for i, label in enumerate(HOSTILE_LABELS.values())]
    shard = shard_with(tmp_path / "src", "image", *map(sample_bytes, hostile))
    folder = write_shard_folder(tmp_path / "shards", "image", {"shard-000000.tar": shard})
    items = list(open_classification(folder, "image").dataset(MediaDecoder("image", image_transform=PIXELS)))
    assert len(items) == 4 + len(HOSTILE_LABELS) and sum(item is None for item in items) == len(
        HOSTILE_LABELS
    )


def test_deep_json_in_sharder_inputs_is_an_item_problem(tmp_path: Path) -> None:
    """A JSONL manifest row nested 100,000 deep and a webdataset input sample with such a .json: the first
    is skipped with its reason, the second sharded without its meta; the run completes."""
    manifest, deep_source = deep_jsonl_manifest(tmp_path / "jsonl")
    items = list(read_items(InputSpec(modality="image", path=manifest)))
    assert len(items) == 3 and sum(i.problem is not None for i in items) == 1
    shard = samples_tar([{**s, "json": deep_json()} if s["__key__"] == "000001" else s
                         for s in good_samples(tmp_path / "src", "image", 3)])  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(shard)
    out = tmp_path / "out"
    manifest = run_sharding(
        build_config(
            {
                "input": {"modality": "image", "path": tmp_path / "in", "format": "webdataset"},
                "output": out,
                "workers": 1,
            }
        ),
        progress=False,
    )
    assert manifest["totals"]["samples"] == 3 and manifest["totals"]["skipped"] == 0
    assert deep_source.endswith("deep.png")


# ---------------------------------------------------------------------------------------- 7. the rest


def test_a_run_whose_every_sample_is_unusable_ends_with_one_message(tmp_path: Path, capsys) -> None:
    """Shards of EPS files only, read by a DataLoader worker: after 1,000 unusable samples in a row the run
    stops with exit 1 and one line (the worker's traceback, which torch puts in the message, is not shown)."""
    shard = samples_tar([sample(f"{i:06d}", jpg=eps_bytes()) for i in range(4)])
    folder = write_shard_folder(tmp_path / "shards", "image", {"shard-000000.tar": shard})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"modality": "image", "open_clip_name": "mmcl-micro-vit"},
        "data": {"sources": [{"urls": str(folder)}], "workers": 1, "batch_size": 2},
        "optim": {"warmup_steps": 1}, "train": {"steps": 2},
    }))  # fmt: skip
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "1000 samples in a row could not be used" in lines[0]
    assert "Traceback" not in err and "Original" not in err


@pytest.mark.parametrize("kind", HOSTILE_PART_KINDS)
def test_a_hostile_part_record_is_refused_by_merge(kind: str, tmp_path: Path, capsys) -> None:
    hostile_part(tmp_path / "out", kind)
    assert main(["shard", "merge", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00000-of-00001.json" in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_yaml_alias_bomb_is_refused_with_one_message(tmp_path: Path, capsys) -> None:
    config = alias_bomb_config(tmp_path / "bomb.yaml", tmp_path / "shards", tmp_path / "run")
    assert main(["train", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aliases" in err[0] and "100,000" in err[0]


@pytest.mark.parametrize("kind", ["name-absolute", "name-dotdot", "name-etc-passwd"])
def test_manifest_shard_names_outside_the_folder_are_refused(kind: str, tmp_path: Path, capsys) -> None:
    """verify and stats open the manifest's shard names as files: one outside the folder stops them."""
    outside = tmp_path / "outside.tar"
    outside.write_bytes(samples_tar(good_samples(tmp_path / "o", "image", 2)))
    folder = write_shard_folder(
        tmp_path / "shards", "image", {"shard-000000.tar": shard_with(tmp_path / "s", "image")}
    )
    hostile_manifest(folder, kind, outside=outside)
    for command in ("verify", "stats"):
        assert main(["shard", command, str(folder)]) == 2
        assert "not a plain file name in the shard folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["manifest-count-string", "manifest-count-negative", "manifest-is-a-list",
                                  "sizes-count-string"])  # fmt: skip
def test_a_malformed_index_beside_training_shards_is_a_message(kind: str, tmp_path: Path, capsys) -> None:
    folder = write_shard_folder(
        tmp_path / "shards", "image", {"shard-000000.tar": shard_with(tmp_path / "s", "image")}
    )
    named = hostile_manifest(folder, kind)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": [{"urls": str(folder)}], "workers": 1}}))
    assert main(["train", "--config", str(config), "--check"]) == 2
    err = capsys.readouterr().err
    assert named in err and "fix or delete it" in err and "Traceback" not in err


def test_a_damaged_options_file_in_a_shard_folder_is_a_message(tmp_path: Path, image_csv: Path) -> None:
    out = tmp_path / "out"
    corrupt_progress_options(out)
    with pytest.raises(UsageError, match="options.json is damaged"):
        run_sharding(
            build_config({"input": {"modality": "image", "path": image_csv}, "output": out, "workers": 1})
        )


def test_temporary_files_are_never_written_through_a_planted_link(tmp_path: Path) -> None:
    """Someone with access to a shared output folder links the next temporary name to a file of yours."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out" / "manifest.json"
    target.parent.mkdir()
    os.symlink(victim, target.with_name(f".{target.name}.tmp-{os.getpid()}"))
    write_atomic(target, b"{}")
    assert victim.read_text() == "precious" and target.read_bytes() == b"{}" and not target.is_symlink()


def test_a_local_ray_instance_listens_on_loopback_only(tmp_path: Path) -> None:
    """`--distributor ray` without RAY_ADDRESS starts Ray on 127.0.0.1, not on a routable address."""
    pytest.importorskip("ray")
    code = ("from shards_tools.distribute import init_ray; init_ray(1); import ray; "
            "print(ray.nodes()[0]['NodeManagerAddress']); ray.shutdown()")  # fmt: skip
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300, check=True)  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "127.0.0.1"


def test_a_local_path_with_a_hash_counts_its_bytes(tmp_path: Path) -> None:
    """--max-shard-bytes: a file named 'a#1.jpg' is a file, not a tar member; a real TARPATH#MEMBER is 0."""
    path = tmp_path / "a#1.jpg"
    path.write_bytes(bytes(1234))
    assert _source_bytes(SourceItem(str(path), ["c"])) == 1234
    assert _source_bytes(SourceItem(f"{tmp_path / 'shard.tar'}#x.jpg", ["c"])) == 0


def test_dependency_floors_exclude_versions_with_known_holes() -> None:
    """torch < 2.6 can run code from a file loaded with weights_only=True; webdataset < 1.0.2 builds a
    shell command from http URLs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert "torch>=2.6" in requirements and "torchaudio>=2.6" in requirements
    assert "webdataset>=1.0.2" in requirements
    assert not any(r.startswith("webdataset") for r in project["dependencies"])
