"""Image loader cost at 224 px: images/s per loader core, mmcl shards of photo-like JPEGs, 256 px short side.

    .venv/bin/python bench/image_loader_bench.py            # 400 images, median of 5 rounds
    .venv/bin/python bench/image_loader_bench.py --quick    # 128 images, 1 round: checks that it runs

The sides run in one DataLoader worker process (torch at 1 thread, torch's worker info set, so mmcl seeds
each sample as in training without saving and restoring the RNGs around it; glibc keeping freed memory as
in mmcl's loader workers, mmcl.data.pipeline.init_loader_worker, for every side), after a warm-up pass each,
taking turns in every round so that the machine's drift is shared; each figure is images/s on that one
core, the median over the rounds. The sides, over the same shards (open_clip's ViT-B-32 preprocessing:
224 px, RandomResizedCrop scale 0.9-1, bicubic, OpenAI mean/std):

  decode                Pillow decodes every JPEG whole to RGB: the floor of any loader
  decode + crop/resize  the same, then RandomResizedCrop's box and Pillow's bicubic resize to 224, kept
                        uint8: a loader that resizes on the CPU and leaves the float conversion out (the
                        bare limit); "handed over": also stacked by 64 into shared memory, as a loader
                        must hand its images over (into a worker's batch buffers, given back at once:
                        mmcl.data.batch_buffers)
  open_clip transform   decode + open_clip's train transform (crop + resize, ToTensor, Normalize)
  open_clip loader      open_clip_train.data.get_wds_dataset over the shards, iterated with workers=0 (tar
                        reading, shuffling, decode, transform, tokenizing, batching)
  mmcl CPU path         mmcl's stream (build_train_stream) as a CPU run builds it (data.image_on_device
                        auto or false): decode, crop and resize in the worker, uint8 hand-over
  mmcl whole transform  mmcl's stream running the model's whole transform in the worker (float hand-over),
                        as for transforms the uint8 hand-over does not take (colour jitter, timm's)
  mmcl device path      mmcl's stream with the device path: the worker's half (decode, with JPEG draft when
                        the crop allows, crop, uint8 hand-over padded per batch); "not given back": the
                        same with every batch in a fresh shared-memory segment, as for a consumer that
                        never gives batches back (mmcl.data.batch_buffers)
  device half on CPU    mmcl.data.device_transform.crops_to_model_input on those batches (resize, float,
                        normalise), timed on this CPU at 1 thread; on a GPU it runs on the training device
  tar reading           the part of the streams that reads the shards into samples: mmcl's reader
                        (shards_tools.tar_stream.iter_samples, grouped into samples) and tarfile's
                        as webdataset's tar_file_iterator uses it (stream mode, extractfile().read())

Streams are timed over whole batches of 64 (fresh iterators each round, tar reading included), each batch
handed over as a worker sends it to the training process (its tensors put into shared memory); mmcl's
batches are then given back, as the trainer gives each back after its step, and open_clip's are not (torch's
collate puts every batch in a fresh segment). The images
are bench/shard_bench.py's photo-like pictures cut to 342 x 256 (landscape and portrait alternate), JPEG
quality 95, written as mmcl shards of 50 in --work-dir (default bench/out/image_loader/, git-ignored) and
reused. Results: a table on stdout and WORK_DIR/results.json (results-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import tarfile
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import RandomResizedCrop

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from host import host_facts  # noqa: E402
from shard_bench import QUALITY, photo_like  # noqa: E402
from worker_timing import drain, hand_over, in_worker  # noqa: E402

from mmcl.data import DataConfig, build_train_stream  # noqa: E402
from mmcl.data.batch_buffers import TICKET, BatchBuffers  # noqa: E402
from mmcl.data.device_transform import DeviceImageSpec, crops_to_model_input, device_image_spec  # noqa: E402
from shards_tools.tar_stream import iter_samples  # noqa: E402
from shards_tools.writer import sample_bytes, tar_end  # noqa: E402

DATA_VERSION = 1  # bump when the images change, so cached shards are rebuilt
SHORT, LONG, PER_SHARD, BATCH = 256, 342, 50, 64
WDS_OLD = REPO / ".venv" / "wds-0.2.86"
TRANSFORM = image_transform_v2(PreprocessCfg(), is_train=True)  # ViT-B-32's: 224 px, OpenAI mean/std
SPEC = device_image_spec(TRANSFORM)
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # the bundled SimpleTokenizer: works offline


def photo_jpeg(index: int) -> bytes:
    """shard_bench's photo-like picture, 342 x 256 or 256 x 342, as a JPEG."""
    picture = photo_like(index, LONG)
    box = (0, 0, LONG, SHORT) if index % 2 else (0, 0, SHORT, LONG)
    out = io.BytesIO()
    picture.crop(box).save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def build_shards(folder: Path, count: int) -> list[bytes]:
    """Write the shards once (reused when the folder holds them for this count); returns every JPEG."""
    stamp = folder / "_version.json"
    want = {"version": DATA_VERSION, "count": count}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        jpegs = []
        for shard in sorted(folder.glob("shard-*.tar")):
            jpegs += _jpegs_of(shard)
        return jpegs
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.tar"):
        old.unlink()
    print(f"writing {count} images to {folder} ...", flush=True)
    jpegs = [photo_jpeg(i) for i in range(count)]
    for start in range(0, count, PER_SHARD):
        body = b"".join(
            sample_bytes({"__key__": f"{i:06d}", "jpg": jpegs[i], "txt": f"a photo number {i}".encode()})
            for i in range(start, min(start + PER_SHARD, count))
        )
        (folder / f"shard-{start // PER_SHARD:06d}.tar").write_bytes(body + tar_end(len(body)))
    stamp.write_text(json.dumps(want))
    return jpegs


def _jpegs_of(shard: Path) -> list[bytes]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]


# ------------------------------------------------------------------------------------------------ sides


def decode(jpegs: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")

    return run


def crop_resized(jpegs: list[bytes]) -> Iterator[np.ndarray]:
    """The bare limit's work: decode, RandomResizedCrop's box, Pillow's bicubic resize, uint8."""
    for data in jpegs:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, height, width = RandomResizedCrop.get_params(image, list(SPEC.scale), list(SPEC.ratio))
        box = (left, top, left + width, top + height)
        yield np.asarray(image.resize(SPEC.size[::-1], Image.Resampling.BICUBIC, box=box))


def decode_crop_resize(jpegs: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        for _ in crop_resized(jpegs):
            pass

    return run


def decode_crop_resize_handed_over(jpegs: list[bytes]) -> Callable[[], None]:
    """The bare limit, its images handed over as a loader must: stacked by 64 into shared memory (a
    worker's batch buffers, each given back at once)."""
    buffers = BatchBuffers(1)

    def run() -> None:
        batch: list[np.ndarray] = []
        for image in crop_resized(jpegs):
            batch.append(image)
            if len(batch) == BATCH:
                stacked, ticket = buffers.allocate((BATCH, *image.shape), torch.uint8)
                np.stack(batch, out=stacked.numpy())
                buffers.give_back({TICKET: ticket})
                batch = []

    return run


def open_clip_transform(jpegs: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        for data in jpegs:
            TRANSFORM(Image.open(io.BytesIO(data)).convert("RGB"))

    return run


def open_clip_loader(shards: list[Path], images: int) -> Callable[[], None] | None:
    """open_clip's own webdataset pipeline, or None without open_clip_train or webdataset 0.2.86 (its data.py
    does not run on webdataset 1.x; `make install` puts 0.2.86 in .venv/wds-0.2.86). Imported where it runs,
    in the worker, so that this process keeps the webdataset it has."""
    if importlib.util.find_spec("open_clip_train") is None or not WDS_OLD.exists():
        return None
    args = Namespace(
        train_data="::".join(str(s) for s in shards), train_num_samples=images, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=BATCH, workers=0, world_size=1,
    )  # fmt: skip

    def run() -> None:
        if str(WDS_OLD) not in sys.path:
            sys.path.insert(0, str(WDS_OLD))
        from open_clip_train.data import get_wds_dataset

        info = get_wds_dataset(args, TRANSFORM, is_train=True, tokenizer=TOKENIZER)
        batches = 0
        for batch in info.dataloader:
            hand_over(batch)
            batches += 1
        assert batches * BATCH == images, (batches, images)

    return run


def mmcl_stream(
    shards: Path, images: int, spec: DeviceImageSpec | None, give_back: bool = True
) -> Callable[[], None]:
    cfg = DataConfig(sources=[{"urls": str(shards)}], batch_size=BATCH, workers=1)

    def run() -> None:
        stream = build_train_stream(cfg, modality="image", media_transform=TRANSFORM, tokenizer=TOKENIZER,
                                    device_images=spec)  # fmt: skip
        drain(stream, images // BATCH, give_back)

    return run


def tar_reading_mmcl(shards: list[Path]) -> Callable[[], None]:
    def run() -> None:
        for shard in shards:
            for _ in iter_samples(str(shard), handler=lambda err: False):
                pass

    return run


def tar_reading_tarfile(shards: list[Path]) -> Callable[[], None]:
    """Every member read as webdataset's tar_file_iterator reads it: tarfile in stream mode,
    extractfile().read()."""

    def run() -> None:
        for shard in shards:
            with open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
                for info in tar:
                    tar.extractfile(info).read()
                    tar.members = []

    return run


def device_half(batches: list[dict]) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            crops_to_model_input(batch["media"], batch["media_boxes"], batch["media_sizes"], SPEC)

    return run


def device_path_batches(shards: Path, images: int) -> list[dict]:
    """The hand-over batches of the device path (built in this process, outside any timing)."""
    cfg = DataConfig(sources=[{"urls": str(shards)}], batch_size=BATCH, workers=0)
    stream = iter(
        build_train_stream(cfg, modality="image", media_transform=TRANSFORM, tokenizer=TOKENIZER,
                           device_images=SPEC)
    )  # fmt: skip
    return [next(stream) for _ in range(images // BATCH)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=400, help="images in the shards (streams time whole batches of 64)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds")
    parser.add_argument("--quick", action="store_true", help="128 images, 1 round: a check that it runs")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out" / "image_loader")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeat = 128, 1
    torch.set_num_threads(1)
    folder = args.work_dir / f"shards-{args.images}"
    jpegs = build_shards(folder, args.images)
    shards = sorted(folder.glob("shard-*.tar"))
    streamed = args.images // BATCH * BATCH
    handed_over = device_path_batches(folder, streamed)
    sides: dict[str, tuple[Callable[[], None] | None, int]] = {
        "decode": (decode(jpegs), len(jpegs)),
        "decode + crop/resize uint8": (decode_crop_resize(jpegs), len(jpegs)),
        "decode + crop/resize, handed over": (decode_crop_resize_handed_over(jpegs), len(jpegs)),
        "open_clip transform": (open_clip_transform(jpegs), len(jpegs)),
        "open_clip loader": (open_clip_loader(shards, streamed), streamed),
        "mmcl CPU path": (mmcl_stream(folder, streamed, replace(SPEC, resize_on_device=False)), streamed),
        "mmcl whole transform": (mmcl_stream(folder, streamed, None), streamed),
        "mmcl device path, worker": (mmcl_stream(folder, streamed, SPEC), streamed),
        "mmcl device path, not given back": (mmcl_stream(folder, streamed, SPEC, give_back=False), streamed),
        "device half on CPU": (device_half(handed_over), streamed),
        "tar reading, mmcl": (tar_reading_mmcl(shards), len(jpegs)),
        "tar reading, tarfile": (tar_reading_tarfile(shards), len(jpegs)),
    }
    timings = in_worker({name: side for name, side in sides.items() if side[0] is not None}, args.repeat)
    results = {name: timings.get(name) for name in sides}
    padded = sum(b["media"].numel() for b in handed_over) / streamed
    print(
        f"{args.images} JPEGs of {LONG}x{SHORT} at 224 px, one core: images/s, median of {args.repeat} (best)"
    )
    floor = results["decode"]["median"]
    for name, r in results.items():
        if r is None:
            print(f"  {name:<34} (needs open_clip_train and .venv/wds-0.2.86: make install)")
            continue
        share = 100 * r["median"] / floor
        print(f"  {name:<34} {r['median']:8.1f} ({r['best']:.1f})  {share:5.1f} % of decode's rate")
    headline = {
        "CPU path / bare limit": ("mmcl CPU path", "decode + crop/resize uint8"),
        "CPU path / bare limit handed over": ("mmcl CPU path", "decode + crop/resize, handed over"),
    }
    if results["open_clip loader"] is not None:
        headline["CPU path / open_clip's loader"] = ("mmcl CPU path", "open_clip loader")
        headline["device path worker / open_clip's loader"] = ("mmcl device path, worker", "open_clip loader")
    ratios = {}
    for label, (side, base) in headline.items():
        paired = [a / b for a, b in zip(results[side]["runs"], results[base]["runs"], strict=True)]
        ratios[label] = {"of_medians": results[side]["median"] / results[base]["median"],
                         "median_of_rounds": statistics.median(paired), "rounds": paired}  # fmt: skip
        print(
            f"  {label}: {ratios[label]['of_medians']:.3f} (ratio of the medians), "
            f"{ratios[label]['median_of_rounds']:.3f} (median of the rounds' ratios, {min(paired):.2f}-"
            f"{max(paired):.2f})"
        )
    mmcl_tar, tarfile_tar = (1e6 / results[f"tar reading, {n}"]["median"] for n in ("mmcl", "tarfile"))
    print(f"  tar reading, microseconds a sample: mmcl {mmcl_tar:.1f}, tarfile {tarfile_tar:.1f}")
    print(
        f"  device path hand-over: {padded / 1024:.0f} KiB uint8 per image, padded "
        f"(the CPU path's: {3 * 224 * 224 // 1024} KiB uint8; the whole transform's: "
        f"{3 * 224 * 224 * 4 // 1024} KiB float32)"
    )
    out = {"images": args.images, "repeat": args.repeat, "batch_size": BATCH, "host": host_facts(),
           "handover_bytes_per_image": padded, "results": results, "ratios": ratios}  # fmt: skip
    name = "results-quick.json" if args.quick else "results.json"
    (args.work_dir / name).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
