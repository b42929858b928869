"""Evaluation data: labelled media for zero-shot classification and captioned shards for retrieval.

Classification layouts (`--format`, detected when "auto"):

* `shards`: mmcl shards (a folder of .tar, one .tar, or a brace pattern) whose samples carry a class index
  (.json "label_index" or .cls); class names from manifest.json "class_names" beside them or `--classes`;
* `class-folder`: ROOT/<class>/<file>, images or audio, classes sorted like torchvision's ImageFolder;
* `cifar10` / `cifar100`: the python pickles (cifar-10-batches-py/test_batch + batches.meta,
  cifar-100-python/test + meta with fine_label_names), test split;
* `esc50`: meta/esc50.csv + audio/ (folds selectable); `urbansound8k`: metadata/UrbanSound8K.csv +
  audio/foldN/ (folds selectable). These two and class folders are listed by shards_tools' own readers,
  so an evaluation and a sharding run of the same folder agree on every class index.

Retrieval data: shards with one or several captions per item (.json "text" list, else .txt).

Memory stays bounded: a dataset holds its listing (paths and labels; for CIFAR the pickled uint8 arrays,
30 MB), never decoded media. Items are decoded one at a time in the DataLoader's workers, so at most
workers x prefetch batches exist decoded at once. Data is read as training reads it (ReadOptions: a cap on
files and tar members, pipe: paths only when allowed), and whatever an item makes a decoder raise is that
item's fault: it is logged, skipped and counted (`decode_item`, the evaluator's one exception boundary).
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmcl.data.audio import load_clip
from mmcl.data.common import BadSample, log_and_continue, logger
from mmcl.data.image import decode_image
from mmcl.data.pipeline import keyed_samples
from mmcl.data.sources import expand_urls, folder_index, shard_counts
from mmcl.data.text import captions_of, read_meta
from mmcl.errors import UsageError
from mmcl.eval.formats import CLASSIFICATION_FORMATS, FOLD_FORMATS, FORMAT_MODALITY
from mmcl.models import DualEncoder
from shards_tools import readers
from shards_tools.config import InputSpec
from shards_tools.readers.detect import LayoutUnknown
from shards_tools.readers.webdataset_input import is_brace_pattern
from shards_tools.shard_format import (
    MEDIA_EXTENSIONS,
    META_EXTENSIONS,
    check_shard_url,
    is_local,
    sample_label,
    url_scheme,
)
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS, ReadOptions

CIFAR = {
    # format: (folder, test file, meta file, label key in the test file, class-name key in the meta file)
    "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", "test", "meta", "fine_labels", "fine_label_names"),
}


def display_name(label: str) -> str:
    """A class label as prompts should say it: folder and CSV labels write spaces as "_"."""
    return label.replace("_", " ")


@dataclass
class MediaDecoder:
    """Stored media (bytes, or a PIL image for CIFAR) -> the model's input tensor, as in training but
    deterministic: open_clip's eval transform for images, the centre window of audio clips."""

    modality: str
    image_transform: Callable[[Image.Image], torch.Tensor] | None = None
    sample_rate: int = 16000
    clip_seconds: float = 10.0
    max_seconds: float | None = None  # long_clips average / fusion: whole clips up to this, NaN-padded
    padding: str = "repeat"  # of a clip shorter than clip_seconds (mmcl.data.audio.fit_length)

    @classmethod
    def for_model(cls, model: DualEncoder, padding: str = "repeat") -> MediaDecoder:
        if model.modality == "image":
            return cls("image", image_transform=model.media_transform(train=False))
        rate = model.audio.sample_rate
        longest = getattr(model, "max_samples", None)
        return cls(
            "audio",
            sample_rate=rate,
            clip_seconds=model.audio.clip_samples / rate,
            max_seconds=longest / rate if longest else None,
            padding=padding,
        )

    def __call__(self, raw: bytes | Image.Image, key: str) -> torch.Tensor:
        if self.modality == "image":
            image = raw if isinstance(raw, Image.Image) else decode_image(raw, key)
            return self.image_transform(image)
        return load_clip(
            raw, key, sample_rate=self.sample_rate, clip_seconds=self.clip_seconds, rng=None,
            max_seconds=self.max_seconds, padding=self.padding,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------- listings
@dataclass(frozen=True)
class FileListing:
    """Media files and their class indices (class folders, ESC-50, UrbanSound8K)."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    max_bytes: int = DEFAULT_READ_OPTIONS.max_member_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, index: int) -> tuple[str, bytes, int]:
        path = self.paths[index]
        try:
            with open(path, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as err:
            raise BadSample(path, f"unreadable file ({err})") from err
        if len(data) > self.max_bytes:
            raise BadSample(path, f"larger than the cap of {self.max_bytes:,} bytes (--max-bytes)")
        return path, data, self.labels[index]


@dataclass(frozen=True)
class ArrayListing:
    """Images held as one uint8 array [N, H, W, 3] (CIFAR) and their class indices."""

    images: np.ndarray
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, index: int) -> tuple[str, Image.Image, int]:
        return f"item-{index:06d}", Image.fromarray(self.images[index]), self.labels[index]


@dataclass(frozen=True)
class ShardListing:
    """Shard URLs in a fixed order and, when manifest.json says, how many samples they hold."""

    urls: tuple[str, ...]
    count: int | None


Listing = FileListing | ArrayListing | ShardListing


# ----------------------------------------------------------------------------------------- torch datasets
def spread_indices(total: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(total) (all of them without a limit): a subset of a
    listing sorted by class keeps every class, unlike its first `limit` items."""
    if limit is None or limit >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(limit - 1, 1)) for i in range(limit)})


class ListedItems(Dataset):
    """Map-style items of a FileListing or ArrayListing: {"media", "target"}, or None if undecodable."""

    def __init__(
        self, listing: FileListing | ArrayListing, decoder: MediaDecoder, indices: Sequence[int]
    ) -> None:
        self.listing = listing
        self.decoder = decoder
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        index = self.indices[i]
        return decode_item(f"item {index}", lambda: self._item(index))

    def _item(self, index: int) -> dict[str, Any]:
        key, raw, target = self.listing.raw(index)
        return {"media": self.decoder(raw, key), "target": target}


def decode_item(key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """`make()`, or None (logged) when the item cannot be used: the evaluator's one exception boundary, so
    whatever an item's bytes make a decoder raise is a skipped, counted item, never a dead evaluation."""
    try:
        return make()
    except BadSample as err:
        logger.warning("skipped: %s", err)
    except Exception as err:
        logger.warning("skipped: %s: %s: %s", key, type(err).__name__, str(err)[:300])
    return None


class ShardItems(IterableDataset):
    """Streamed shard samples: {"media", "target"} with target the class index ("label") or the list of
    captions ("captions"), or None for a sample that cannot be used. Each DataLoader worker reads its own
    shards; with `fraction` < 1 each keeps that fraction of its samples, evenly spaced in its stream."""

    def __init__(
        self,
        urls: Sequence[str],
        decoder: MediaDecoder,
        target: Literal["label", "captions"],
        fraction: float = 1.0,
        num_classes: int | None = None,
        read_options: ReadOptions = DEFAULT_READ_OPTIONS,
    ) -> None:
        self.urls = list(urls)
        self.decoder = decoder
        self.target = target
        self.fraction = fraction
        self.num_classes = num_classes
        self.read_options = read_options
        self.extensions = MEDIA_EXTENSIONS[decoder.modality]

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        extensions = (*self.extensions, *META_EXTENSIONS)
        samples = keyed_samples(urls, log_and_continue, options=self.read_options, extensions=extensions)
        for position, sample in enumerate(samples):
            if math.floor((position + 1) * self.fraction) > math.floor(position * self.fraction):
                yield decode_item(sample["__key__"], lambda sample=sample: self._prepare(sample))

    def _prepare(self, sample: dict) -> dict[str, Any]:
        key = sample["__key__"]
        ext = media_member(sample, self.extensions, self.decoder.modality)
        meta = read_meta(sample)
        if self.target == "label":
            target = sample_label(meta, sample.get("cls"))
            if target is None:
                raise BadSample(key, "no class index (.cls or json label_index)")
            if self.num_classes is not None and target >= self.num_classes:
                raise BadSample(key, f"class index {target} is outside the {self.num_classes} class names")
        else:
            target = captions_of(sample, meta)
            if not target:
                raise BadSample(key, "no caption")
        return {"media": self.decoder(sample[ext], key), "target": target}


def media_member(sample: dict, extensions: Sequence[str], modality: str) -> str:
    """The extension of a raw shard sample's media member; BadSample when the tar reader refused one of its
    members or it has no media of `modality`."""
    if "__problem__" in sample:
        raise BadSample(sample["__key__"], sample["__problem__"])
    ext = next((e for e in extensions if e in sample), None)
    if ext is None:
        raise BadSample(sample["__key__"], f"no {modality} file (.{', .'.join(extensions)})")
    return ext


def collate_items(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Usable items -> {"media": [B, ...] or None, "targets": list, "skipped": count of unusable ones}."""
    good = [item for item in items if item is not None]
    return {
        "media": torch.stack([item["media"] for item in good]) if good else None,
        "targets": [item["target"] for item in good],
        "skipped": len(items) - len(good),
    }


# ----------------------------------------------------------------------------------------- opened data
@dataclass(frozen=True)
class EvalData:
    """An evaluation set, opened and checked but not yet decoded."""

    name: str  # for reports, e.g. "cifar10" or the folder name
    format: str
    modality: str
    listing: Listing
    class_names: tuple[str, ...] | None  # classification only; index = class index
    read_options: ReadOptions = DEFAULT_READ_OPTIONS  # how shards and files are read (caps, pipe: permission)

    @property
    def task(self) -> str:
        return "zeroshot_classification" if self.class_names is not None else "zeroshot_retrieval"

    def size(self, max_samples: int | None = None) -> int | None:
        """Items that a loader will offer (None when the shards have no manifest)."""
        total = self.listing.count if isinstance(self.listing, ShardListing) else len(self.listing)
        if total is None or max_samples is None:
            return total
        return min(total, max_samples)

    def dataset(self, decoder: MediaDecoder, max_samples: int | None = None) -> Dataset:
        """The items, decoded one by one; with `max_samples`, an even subset: spread indices of a listing,
        evenly spaced samples of shards whose count is known (else the consumer stops after `max_samples`)."""
        if isinstance(self.listing, ShardListing):
            count = self.listing.count
            fraction = max_samples / count if count and max_samples and count > max_samples else 1.0
            target = "label" if self.class_names is not None else "captions"
            num_classes = len(self.class_names) if self.class_names is not None else None
            return ShardItems(self.listing.urls, decoder, target, fraction, num_classes, self.read_options)
        return ListedItems(self.listing, decoder, spread_indices(len(self.listing), max_samples))

    def loader(
        self, decoder: MediaDecoder, batch_size: int, workers: int, max_samples: int | None = None
    ) -> DataLoader:
        """Batches in a fixed order (see `collate_items`); consumers stop after `max_samples` items."""
        if isinstance(self.listing, ShardListing):
            workers = min(workers, len(self.listing.urls))  # a worker without shards would idle
        return DataLoader(
            self.dataset(decoder, max_samples),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_items,
        )


CLI_PIPE_HINT = "pass --allow-pipe"


def _data_path(path: str | Path, options: ReadOptions, where: str, allow_hint: str) -> str:
    """The data path as text, after the one scheme check every shard path passes (a pipe: path runs a
    shell command: refused unless `options.allow_pipe`); a local path must exist."""
    text = os.path.expanduser(str(path))
    check_shard_url(text, allow_pipe=options.allow_pipe, where=where, allow_hint=allow_hint)
    if is_local(text) and not is_brace_pattern(text) and not os.path.exists(text):
        raise UsageError(f"{where} {text} does not exist")
    return text


def detect_format(path: str | Path, modality: str) -> str:
    """The classification layout of `path` for a `modality` model (see the module docstring), or UsageError
    naming --format. CIFAR pickles are the evaluator's own; every other layout is told apart exactly as
    `mmcl shard` tells it (shards_tools.readers.detect_format), so both read the same folder the same way.
    A URL (http(s), or an allowed pipe:) can only be shards."""
    text = os.path.expanduser(str(path))
    if not is_local(text) or is_brace_pattern(text):
        return "shards"
    if not os.path.exists(text):
        raise UsageError(f"--data {text} does not exist")
    folder = Path(text)
    for fmt, (subfolder, test, meta, _, _) in CIFAR.items():
        if (folder / subfolder / test).is_file() or ((folder / test).is_file() and (folder / meta).is_file()):
            return fmt
    try:
        found = readers.detect_format(folder, modality)
    except LayoutUnknown as err:
        found, reason = None, err.reason
    else:
        reason = f"it looks like {found} input for `mmcl shard`, not labelled data"
    fmt = "shards" if found == "webdataset" else found
    if fmt in CLASSIFICATION_FORMATS:
        return fmt
    raise UsageError(
        f"cannot tell the layout of --data {text}: {reason}; pass --format, one of: "
        f"{', '.join(CLASSIFICATION_FORMATS)}"
    )


def read_class_file(path: Path) -> list[str]:
    """Class names, one per line in class-index order (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--classes {path} does not exist (expected one class name per line)")
    names = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not names:
        raise UsageError(f"--classes {path} is empty (expected one class name per line)")
    return names


def open_classification(
    path: str | Path,
    modality: str,
    *,
    format: str = "auto",
    classes_file: Path | None = None,
    folds: Sequence[int] | None = None,
    name: str | None = None,
    read_options: ReadOptions = DEFAULT_READ_OPTIONS,
    where: str = "--data",
    allow_hint: str = CLI_PIPE_HINT,
) -> EvalData:
    """Open a classification set for a `modality` model: check the layout, list items, find class names.

    `classes_file` replaces the layout's class names (e.g. ImageNet wnid folders -> readable names);
    it must list as many classes as the layout has. `folds` selects ESC-50 / UrbanSound8K folds.
    `read_options` says how its shards and files are read; `where` and `allow_hint` name the data path and
    how to allow pipe: paths in messages.
    """
    text = _data_path(path, read_options, where, allow_hint)
    fmt = detect_format(text, modality) if format == "auto" else format
    if fmt not in CLASSIFICATION_FORMATS:
        raise UsageError(
            f"--format {fmt!r} is not a classification layout; use one of {', '.join(CLASSIFICATION_FORMATS)}"
        )
    if FORMAT_MODALITY.get(fmt, modality) != modality:
        raise UsageError(
            f"{fmt} holds {FORMAT_MODALITY[fmt]} data, but the model is an {modality}-text model"
        )
    if folds and fmt not in FOLD_FORMATS:
        raise UsageError(f"--folds selects folds of {' and '.join(FOLD_FORMATS)}; {fmt} has none")
    given = read_class_file(classes_file) if classes_file is not None else None
    if fmt == "shards":
        listing, found = _open_shards(text, modality)
        if given is None and found is None:
            raise UsageError(
                f'no class names for {text}: manifest.json beside the shards has no "class_names"; '
                "pass --classes FILE (one name per line, in class-index order)"
            )
    elif fmt in CIFAR:
        listing, found = _open_cifar(Path(text), fmt)
    else:
        listing, found = _open_with_reader(Path(text), modality, fmt, folds, read_options.max_member_bytes)
    if given is not None and found is not None and len(given) != len(found):
        raise UsageError(f"--classes {classes_file} lists {len(given)} classes, but {text} has {len(found)}")
    class_names = tuple(given) if given is not None else tuple(display_name(c) for c in found)
    default_name = fmt if fmt in CIFAR or fmt in FOLD_FORMATS else _folder_name(text)
    if folds:
        default_name += "-fold" + "+".join(map(str, sorted(folds)))
    return EvalData(name or default_name, fmt, modality, listing, class_names, read_options)


def open_retrieval(
    path: str | Path,
    modality: str,
    name: str | None = None,
    read_options: ReadOptions = DEFAULT_READ_OPTIONS,
    where: str = "--data",
    allow_hint: str = CLI_PIPE_HINT,
) -> EvalData:
    """Open captioned shards for retrieval by a `modality` model (the other arguments as for
    `open_classification`)."""
    text = _data_path(path, read_options, where, allow_hint)
    listing, _ = _open_shards(text, modality)
    return EvalData(name or _folder_name(text), "shards", modality, listing, None, read_options)


def _folder_name(text: str) -> str:
    """A default dataset name: the folder's name, or for shard files and patterns their folder's."""
    path = Path(text.split("{")[0])
    return path.parent.name if "{" in text or text.endswith(".tar") else path.name


def _open_shards(text: str, modality: str) -> tuple[ShardListing, list[str] | None]:
    """The shard URLs, their sample count and the class names, as the index files beside them say (read as
    training reads them; None where they do not say)."""
    urls = expand_urls([text], "--data")
    counts = shard_counts(urls, modality, "--data")
    count = sum(counts[url] for url in urls) if all(url in counts for url in urls) else None
    folder = urls[0].rpartition("/")[0] or "."
    class_names = folder_index(folder).class_names if url_scheme(urls[0]) != "pipe" else None
    return ShardListing(tuple(urls), count), list(class_names) if class_names is not None else None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings, nothing else: a pickle can name any callable,
    so a downloaded dataset file must not be able to run code while it loads."""

    SAFE = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.SAFE[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file") from None


def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (the originals were written by Python 2)."""
    try:
        with open(path, "rb") as handle:
            obj = _ArrayUnpickler(handle, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UsageError(f"cannot read {path} as a CIFAR python pickle: {err}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _open_cifar(path: Path, fmt: str) -> tuple[ArrayListing, list[str]]:
    subfolder, test, meta, label_key, names_key = CIFAR[fmt]
    root = path / subfolder if (path / subfolder).is_dir() else path
    for file in (test, meta):
        if not (root / file).is_file():
            raise UsageError(
                f"{fmt}: {root / file} not found (expected {subfolder}/{test} and {subfolder}/{meta})"
            )
    batch, names = _load_pickle(root / test), _load_pickle(root / meta).get(names_key)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None:
        raise UsageError(f"{root / test} lacks CIFAR's 'data' [N, 3072] uint8 array or '{label_key}' list")
    if not isinstance(names, list) or not names:
        raise UsageError(f"{root / meta} lacks the '{names_key}' list of class names")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ArrayListing(images, tuple(int(label) for label in labels)), names


def _open_with_reader(
    path: Path, modality: str, fmt: str, folds: Sequence[int] | None, max_bytes: int
) -> tuple[FileListing, list[str]]:
    """Class folders, ESC-50 and UrbanSound8K through shards_tools' readers (same classes, same order)."""
    spec = InputSpec(modality=modality, path=path, format=fmt, folds=list(folds) if folds else None)
    class_names = readers.class_names(spec)
    paths, labels = [], []
    for item in readers.read_items(spec):
        if item.problem is not None:
            logger.warning("skipped %s: %s", item.source, item.problem)
            continue
        paths.append(item.source)
        labels.append(item.meta["label_index"])
    if not paths:
        what = f"fold(s) {', '.join(map(str, folds))} of " if folds else ""
        raise UsageError(f"no {modality} files in {what}{path} ({fmt})")
    return FileListing(tuple(paths), tuple(labels), max_bytes), class_names
