"""mmcl.data on real tar shards: real JPEG/FLAC bytes written with webdataset's TarWriter, decoded by
the real pipeline (DataLoader workers, a loopback http server, pipe: URLs), no mocks."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import json
import pickle
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import soundfile
import torch
import webdataset as wds
from localhost import clear_proxies
from open_clip.transform import image_transform
from PIL import Image
from processes import HANG_GUARD_S
from pydantic import ValidationError

from mmcl.data import DataConfig, DataProgress, StreamState, build_loader, build_train_stream
from mmcl.errors import UsageError

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # the bundled SimpleTokenizer: works offline
IMAGE_SIZE = 32
TRAIN_TRANSFORM = image_transform(IMAGE_SIZE, is_train=True)


def jpeg_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(36, 44, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def flac_bytes(seed: int, seconds: float, rate: int = 22050, channels: int = 2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 20 * seed) * t)
    out = io.BytesIO()
    soundfile.write(out, np.stack([wave] * channels, axis=1), rate, format="FLAC")
    return out.getvalue()


def write_shards(
    folder: Path,
    prefix: str,
    shards: int,
    per_shard: int,
    *,
    modality: str = "image",
    style: str = "mmcl",
    bad: dict[str, str] | None = None,
) -> list[str]:
    """Write shards like `mmcl shard` (or img2dataset / LAION-CLAP with `style`) plus sizes.json and
    manifest.json; returns every key. `bad` maps keys to a defect: "media", "caption" or "no-text"."""
    bad = bad or {}
    folder.mkdir(parents=True, exist_ok=True)
    keys, records = [], []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(folder / name), encoder=False, mtime=0.0) as writer:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{prefix}{n:05d}"
                captions = [f"{prefix} sample {n}", f"another caption of {n}"]
                if modality == "image":
                    media = {"jpg": jpeg_bytes(n)}
                    if bad.get(key) == "media":
                        media["jpg"] = media["jpg"][: len(media["jpg"]) // 3]
                else:
                    audio = flac_bytes(n, seconds=0.3 + 0.1 * (n % 5))
                    media = {"flac": audio[: len(audio) // 2] if bad.get(key) == "media" else audio}
                if bad.get(key) == "caption":
                    captions = ["  ", ""]
                if style == "img2dataset":
                    meta = {"key": key, "caption": captions[0], "url": f"http://example.com/{n}.jpg"}
                    files = {"txt": captions[0], "json": meta}
                elif style == "clap":
                    files = {"json": {"text": captions[0] if n % 2 else captions, "original_data": {"id": n}}}
                else:
                    meta = {
                        "key": key,
                        "source": f"in/{n}",
                        "text": captions,
                        "label": f"c{n % 3}",
                        "label_index": n % 3,
                        "noisy": n % 4 == 0,
                        "alignment_score": n / 100,
                    }
                    files = {"txt": captions[0], "json": meta, "cls": str(n % 3)}
                if bad.get(key) == "no-text":
                    files = {}
                sample = {"__key__": key, **media}
                for ext, value in files.items():
                    sample[ext] = (json.dumps(value) if ext == "json" else value).encode("utf-8")
                writer.write(sample)
                keys.append(key)
        records.append(
            {"name": name, "count": per_shard, "bytes": (folder / name).stat().st_size, "sha256": ""}
        )
    (folder / "sizes.json").write_text(json.dumps({r["name"]: r["count"] for r in records}))
    manifest = {"shards": records, "totals": {"samples": len(keys)}, "modality": modality, "class_names": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return keys


def config(urls, **overrides) -> DataConfig:
    sources = urls if isinstance(urls, list) and isinstance(urls[0], dict) else [{"urls": urls}]
    values = {"sources": sources, "batch_size": 4, "workers": 0, "shuffle_buffer": 8, "seed": 7}
    return DataConfig(**{**values, **overrides})


def stream(cfg: DataConfig, modality: str = "image", **kwargs):
    transform = TRAIN_TRANSFORM if modality == "image" else None
    return build_train_stream(
        cfg, modality=modality, media_transform=transform, tokenizer=TOKENIZER, **kwargs
    )


def take(iterable, n: int) -> list[dict]:
    return list(itertools.islice(iter(iterable), n))


def one_epoch(batches) -> list[str]:
    """Keys of epoch 0 from a single reader whose epoch ends on a batch boundary."""
    keys = []
    for batch in batches:
        if batch["epoch"] > 0:
            return keys
        keys += batch["keys"]
    raise AssertionError("epoch 0 did not end")


def test_image_batches(tmp_path):
    write_shards(tmp_path / "img", "i", shards=2, per_shard=6)
    batch = take(stream(config(str(tmp_path / "img"))), 1)[0]
    assert batch["media"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["media"].dtype == torch.float32
    assert batch["text"].shape == (4, 77) and batch["text"].dtype == torch.long
    assert len(batch["keys"]) == 4 and all(isinstance(k, str) for k in batch["keys"])
    assert batch["noisy"].dtype == torch.bool and batch["alignment_score"].dtype == torch.float32
    assert batch["label_index"].tolist() == [int(k[1:]) % 3 for k in batch["keys"]]
    assert (batch["worker"], batch["epoch"], batch["position"], batch["skipped"]) == (0, 0, 4, 0)


def test_audio_batches_and_truncated_flac(tmp_path):
    keys = write_shards(
        tmp_path / "aud", "a", shards=2, per_shard=5, modality="audio", bad={"a00003": "media"}
    )
    cfg = config(str(tmp_path / "aud"), batch_size=3, sample_rate=16000, clip_seconds=0.5)
    batches = take(stream(cfg, "audio"), 6)
    assert batches[0]["media"].shape == (3, 8000) and batches[0]["media"].dtype == torch.float32
    assert batches[0]["text"].shape == (3, 77)
    # Clips of 0.3-0.7 s at 22.05 kHz stereo: cropped or repeated to exactly 0.5 s at 16 kHz, never silent.
    assert batches[0]["media"].abs().amax(dim=1).min() > 0.1
    assert batches[0]["noisy"].dtype == torch.bool
    epoch0 = [k for b in batches[:3] for k in b["keys"]]
    assert sorted(epoch0) == sorted(set(keys) - {"a00003"})
    assert batches[2]["skipped"] == 1 and batches[2]["position"] == 10


def test_bad_samples_skipped_and_counted(tmp_path):
    bad = {"b00001": "media", "b00004": "caption", "b00009": "no-text"}
    keys = write_shards(tmp_path / "img", "b", shards=3, per_shard=5, bad=bad)
    batches = take(stream(config(str(tmp_path / "img"))), 6)
    assert sorted(k for b in batches[:3] for k in b["keys"]) == sorted(set(keys) - set(bad))
    assert batches[2]["skipped"] == 3 and batches[2]["position"] == 15
    assert batches[3]["epoch"] == 1 and batches[5]["skipped"] == 6


def test_sources_mixed_by_weight(tmp_path):
    write_shards(tmp_path / "a", "a", shards=4, per_shard=40)
    write_shards(tmp_path / "b", "b", shards=2, per_shard=10)
    sources = [{"urls": str(tmp_path / "a"), "weight": 3.0}, {"urls": str(tmp_path / "b"), "weight": 1.0}]
    batches = take(stream(config(sources, batch_size=16)), 10)
    counts = Counter(k[0] for b in batches for k in b["keys"])
    assert 0.62 < counts["a"] / 160 < 0.88, counts  # binomial sd is ~0.034 around 0.75
    # Within epoch 0 (160 samples of "a"), the small source is read through more than once.
    assert all(b["epoch"] == 0 for b in batches) and counts["b"] > 20


def test_split_by_node_is_disjoint_and_complete(tmp_path):
    keys = write_shards(tmp_path / "img", "n", shards=4, per_shard=6)
    cfg = config(str(tmp_path / "img"))
    per_rank = [one_epoch(stream(cfg, rank=r, world_size=2)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_epochs_reshuffle(tmp_path):
    keys = write_shards(tmp_path / "img", "e", shards=3, per_shard=8)
    batches = take(stream(config(str(tmp_path / "img"), batch_size=8)), 6)
    first = [k for b in batches[:3] for k in b["keys"]]
    second = [k for b in batches[3:] for k in b["keys"]]
    assert [b["epoch"] for b in batches] == [0, 0, 0, 1, 1, 1]
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second


def test_pipe_urls_refused_unless_allowed(tmp_path):
    write_shards(tmp_path / "img", "p", shards=1, per_shard=4)
    url = f"pipe:cat {tmp_path / 'img' / 'shard-000000.tar'}"
    with pytest.raises(ValidationError, match="allow_pipe") as err:
        config(url)
    assert url in str(err.value)
    batch = take(stream(config(url, allow_pipe=True)), 1)[0]
    assert len(batch["keys"]) == 4
    with pytest.raises(ValidationError, match="unsupported scheme 's3'"):
        config("s3://bucket/shard-000000.tar")
    with pytest.raises(ValidationError, match="unsupported scheme 'ftp'") as err:
        config("ftp://host/shard-000000.tar")
    assert "pipe:curl -s ftp://" in str(err.value) and "allow_pipe: true" in str(err.value)


def test_config_rejects_unknown_keys_and_bad_weights(tmp_path):
    with pytest.raises(ValidationError, match="batchsize"):
        DataConfig(sources=[{"urls": "x.tar"}], batchsize=8)
    with pytest.raises(ValidationError, match="weight"):
        DataConfig(sources=[{"urls": "x.tar", "weight": 0}])


def test_missing_shard_is_named(tmp_path):
    write_shards(tmp_path / "img", "m", shards=2, per_shard=2)
    pattern = str(tmp_path / "img" / "shard-{000000..000002}.tar")
    with pytest.raises(UsageError, match="shard-000002.tar"):
        stream(config(pattern))


def test_too_few_shards_for_the_readers(tmp_path):
    write_shards(tmp_path / "img", "f", shards=3, per_shard=2)
    with pytest.raises(UsageError, match=r"3 shards for world_size\*workers = 4 readers.*--shard-size"):
        stream(config(str(tmp_path / "img"), workers=2), world_size=2)
    resampled = stream(config(str(tmp_path / "img"), resampled=True), rank=3, world_size=4)
    assert len(take(resampled, 1)[0]["keys"]) == 4


def test_modality_mismatch_is_refused(tmp_path):
    write_shards(tmp_path / "aud", "x", shards=1, per_shard=2, modality="audio")
    with pytest.raises(UsageError, match="audio-text pairs"):
        stream(config(str(tmp_path / "aud")), "image")


def test_img2dataset_and_laion_clap_layouts(tmp_path):
    keys = write_shards(tmp_path / "i2d", "d", shards=1, per_shard=4, style="img2dataset")
    (tmp_path / "i2d" / "manifest.json").unlink()  # img2dataset writes no manifest; sizes.json only
    batch = take(stream(config(str(tmp_path / "i2d"))), 1)[0]
    assert sorted(batch["keys"]) == keys and batch["label_index"] is None
    assert batch["text"].shape == (4, 77)

    write_shards(tmp_path / "clap", "c", shards=1, per_shard=4, modality="audio", style="clap")
    cfg = config(str(tmp_path / "clap"), sample_rate=8000, clip_seconds=1.0)
    batch = take(stream(cfg, "audio"), 1)[0]
    assert batch["media"].shape == (4, 8000) and batch["skipped"] == 0
    # Each caption is one of the sample's JSON "text" entries (a list, or a single string).
    for key, tokens in zip(batch["keys"], batch["text"], strict=True):
        n = int(key[1:])
        choices = TOKENIZER([f"c sample {n}", f"another caption of {n}"])
        assert any(torch.equal(tokens, c) for c in choices[: 1 if n % 2 else 2])


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """Serve tmp_path/www over http on the loopback interface; yields the base URL. The requests (urllib's for
    sizes.json, the shard reader's) go straight to it whatever proxy the environment names."""
    clear_proxies(monkeypatch)
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_http_shards_are_streamed(http_root):
    root, base = http_root
    keys = write_shards(root / "shards", "h", shards=2, per_shard=4)
    # a server on 127.0.0.1 answers however busy the machine is: the timeout is only a hang guard
    cfg = config(f"{base}/shards/shard-{{000000..000001}}.tar", http_timeout=HANG_GUARD_S)
    built = stream(cfg)
    assert built.sources[0].num_samples == 8  # from sizes beside the shards, over http
    assert sorted(one_epoch(built)) == keys


def test_stream_pickles_for_spawned_workers(tmp_path):
    write_shards(tmp_path / "img", "k", shards=2, per_shard=4)
    built = stream(config(str(tmp_path / "img")))
    copy = pickle.loads(pickle.dumps(built))
    assert take(copy, 1)[0]["keys"] == take(built, 1)[0]["keys"]


def test_exact_resume_with_two_workers(tmp_path):
    """Batches k..k+m of an uninterrupted loader == batches 0..m of one resumed from the state after
    batch k-1: 2 workers, two weighted sources, shuffling, a bad sample, across epoch boundaries."""
    write_shards(tmp_path / "a", "a", shards=4, per_shard=8, bad={"a00005": "media"})
    write_shards(tmp_path / "b", "b", shards=2, per_shard=4)
    sources = [{"urls": str(tmp_path / "a"), "weight": 2.0}, {"urls": str(tmp_path / "b"), "weight": 1.0}]
    cfg = config(sources, workers=2)
    kwargs = {"modality": "image", "media_transform": TRAIN_TRANSFORM, "tokenizer": TOKENIZER}
    k, m = 7, 8
    fresh = take(build_loader(cfg, **kwargs), k + m)
    assert {b["worker"] for b in fresh} == {0, 1} and max(b["epoch"] for b in fresh) >= 1
    assert max(b["skipped"] for b in fresh) == 1

    state = StreamState(num_workers=2)
    for batch in fresh[:k]:
        state.update(batch)
    progress = DataProgress(world_size=1, num_workers=2, resampled=False)
    progress.record(k, [state.state_dict()], [state.take_consumed()])
    saved = json.loads(json.dumps(progress.state_dict()))  # as a checkpoint stores it
    assert saved["ranks"]["0"]["next_worker"] == k % 2 and set(saved["ranks"]["0"]["workers"]) == {"0", "1"}
    loader = build_loader(cfg, resume=saved, **kwargs)
    assert loader.dataset.elastic is None  # the same layout replays
    resumed = take(loader, m)

    for want, got in zip(fresh[k:], resumed, strict=True):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["media"], want["media"]) and torch.equal(got["text"], want["text"])
        for name in ("worker", "epoch", "position", "skipped"):
            assert got[name] == want[name]
        for name in ("noisy", "alignment_score", "label_index", "consumed"):
            assert torch.equal(got[name], want[name])

    # another layout continues from the ledger instead (tests/test_elastic_resume.py)
    assert build_loader(config(sources, workers=1), resume=saved, **kwargs).dataset.elastic is not None


def test_shard_cut_inside_a_tar_header_is_reported(tmp_path, caplog):
    """Python's tar reader ends quietly at a header cut short; the stream compares with the manifest."""
    keys = write_shards(tmp_path / "img", "t", shards=2, per_shard=5)
    shard = tmp_path / "img" / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        third_sample = [m for m in tar.getmembers() if m.name.startswith("t00007.")][0]
    shard.write_bytes(shard.read_bytes()[: third_sample.offset + 100])  # inside that member's header
    with caplog.at_level("WARNING", logger="mmcl.data"):
        seen = one_epoch(stream(config(str(tmp_path / "img"), batch_size=1, shuffle_buffer=1)))
    assert sorted(seen) == keys[:7]  # shard 0 whole, shard 1 up to the cut
    assert f"{shard}: read 2 of the 5 samples" in caplog.text
    assert "mmcl shard verify" in caplog.text
