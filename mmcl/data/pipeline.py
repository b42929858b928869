"""The training stream: shards -> samples -> mixed and shuffled -> decoded -> batches, resumable exactly.

Every DataLoader worker (a "reader"; rank r of the job has readers r*W .. r*W+W-1 for W workers)
runs the stages below as a chain of small module-level generators and batches its own samples, so
the DataLoader only forwards finished batches (batch_size=None).

Determinism. What a reader reads, in which order (shard order, source interleaving, shuffle buffer)
is a pure function of (seed, epoch, rank, worker); every random choice made on one sample (which
caption, which audio window, the image augmentation) is a pure function of (seed, epoch, sample key).
Nothing depends on wall time, process ids or how far another process has got.

Epochs. The stream never ends: each reader runs epochs 0, 1, 2, ..., and epoch e permutes the shards
anew. An epoch ends once every source has been read through once; a source that runs out earlier
(a small or heavily weighted one) starts another pass with a fresh shard order, so the mixing
weights hold for the whole epoch. Batches run across epoch boundaries.

Resume (mmcl.data.progress). Every batch carries "worker", "epoch" and "position": the raw samples of
that epoch the worker has taken from the shuffle stage (bad ones included) up to and including this
batch, "skipped", the bad samples it has dropped so far, and "consumed": where each raw sample it
accounts for lies, (epoch, source, pass, shard, index). `build_loader(resume=DataProgress state)`:

- with the same world size and data.workers, worker w starts at its epoch e and drops the first p raw
  samples *before decoding*, and the DataLoader's round robin is rotated so that the worker that was due
  next yields first: the resumed loader yields exactly the batches an uninterrupted one would have
  yielded next. The skipped part of each worker's current epoch is read again as raw tar bytes (the
  shard order, the mixing and the shuffle buffer are replayed to reach the same state).
- with any other layout, the epochs the ledger holds are shared out anew: for each source and pass, the
  shards with samples left are dealt, in the epoch's shard order, to the reader with the least work so
  far, and each reader reads its shards skipping the consumed samples as raw bytes; fully consumed shards
  are not opened. The readers' mixing and shuffling are seeded afresh (with the checkpoint's step). Every
  sample of those epochs not yet consumed is read exactly once, then the stream goes on with fresh epochs
  as a run of the new layout would. With data.resampled there is nothing to share out: the readers draw
  afresh from the epoch they were in.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcl.data.audio import audio_media
from mmcl.data.batch_buffers import TICKET, BatchBuffers
from mmcl.data.common import BadSample, derive_seed, log_and_continue, logger
from mmcl.data.config import DataConfig
from mmcl.data.device_transform import DeviceImageSpec, pad_crops
from mmcl.data.image import image_crop, image_media, image_resized
from mmcl.data.progress import DataProgress, ElasticResume, StreamState, skip_consumed
from mmcl.data.sources import Source, resolve_sources
from mmcl.data.text import choose_caption, read_meta
from mmcl.errors import RunFailed, UsageError
from mmcl.host_memory import keep_freed_memory
from shards_tools.scores import shard_scores
from shards_tools.shard_format import MEDIA_EXTENSIONS, META_EXTENSIONS, sample_label
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS, ReadOptions, iter_samples

Modality = Literal["image", "audio"]
Handler = Callable[[Exception], bool]
# This many unusable samples in a row means the data does not fit the pipeline (e.g. audio shards
# read for an image model): stop with a message rather than spin forever.
MAX_BAD_RUN = 1000


@dataclass
class ReaderState:
    """Where one reader is; the stages update it as samples pass, the batch stage reports it."""

    worker: int
    epoch: int = 0
    position: int = 0
    skipped: int = 0
    bad_run: int = 0
    # where the bad samples dropped since the reader's last batch lie (the next batch reports them)
    dropped: list[tuple[int, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class ReaderPlan:
    """What identifies one reader's raw stream: the sources, the seed and the reader's place."""

    sources: tuple[Source, ...]
    seed: int
    rank: int
    worker: int
    reader: int  # rank * num_workers + worker
    readers: int  # world_size * num_workers
    shard_shuffle: bool
    resampled: bool
    shuffle_buffer: int
    read_options: ReadOptions
    extensions: tuple[str, ...]  # the members a sample of this modality needs
    elastic: ElasticResume | None = None  # resumed on another layout: the open epochs come from its ledger

    def from_ledger(self, epoch: int) -> bool:
        """Whether this reader's share of `epoch` is what the ledger leaves (an elastic resume)."""
        return self.elastic is not None and epoch <= self.elastic.last_epoch

    def salt(self, epoch: int) -> tuple:
        """Extra seed parts for the mixing, shuffling and resampling of an epoch continued elastically."""
        return ("elastic", self.elastic.salt) if self.from_ledger(epoch) else ()


def check_shard_counts(sources: list[Source], readers: int, resampled: bool) -> None:
    """Without resampling every reader needs at least one shard of every source."""
    if resampled:
        return
    for i, source in enumerate(sources):
        if len(source.urls) < readers:
            raise UsageError(
                f"data.sources[{i}] ({source.name}): {len(source.urls)} shards for world_size*workers = "
                f"{readers} readers: write more, smaller shards with `mmcl shard --shard-size`, "
                "lower data.workers, or set data.resampled: true"
            )


def reader_shards(plan: ReaderPlan, source_index: int, epoch: int, pass_index: int) -> list[int]:
    """The shards (indices into the source's URLs) one reader reads from one source in one pass of one epoch.

    The permutation depends on (seed, source, epoch, pass) only, so all ranks and workers agree on it
    and take disjoint slices; an epoch continued from a ledger is dealt by `share_remaining` instead.
    Resampled: each reader draws its own shards with replacement, as many as its slice would hold.
    """
    count = len(plan.sources[source_index].urls)
    if plan.resampled:
        rng = random.Random(
            derive_seed(
                plan.seed, "resample", source_index, epoch, pass_index, plan.reader, *plan.salt(epoch)
            )
        )
        return rng.choices(range(count), k=-(-count // plan.readers))
    order = list(range(count))
    if plan.shard_shuffle:
        random.Random(derive_seed(plan.seed, "shards", source_index, epoch, pass_index)).shuffle(order)
    if plan.from_ledger(epoch):
        return share_remaining(plan, source_index, epoch, pass_index, order)
    return order[plan.reader :: plan.readers]


def share_remaining(
    plan: ReaderPlan, source_index: int, epoch: int, pass_index: int, order: list[int]
) -> list[int]:
    """This reader's share of the shards with samples left in the ledger: dealt in the epoch's shard order,
    each to the reader with the fewest samples so far (counts from the index files; a shard no index lists
    counts as an average one), so the readers of the new layout finish the epoch together."""
    assert plan.elastic is not None
    source = plan.sources[source_index]
    counts = [source.shard_counts.get(url) for url in source.urls]
    known = [c for c in counts if c is not None]
    typical = max(1, round(sum(known) / len(known))) if known else 1
    loads = [(0, reader) for reader in range(plan.readers)]
    mine = []
    for shard in order:
        done = plan.elastic.ledger.consumed((epoch, source_index, pass_index, shard)).bit_count()
        left = counts[shard] - done if counts[shard] is not None else max(typical - done, 1)
        if left <= 0:
            continue
        load, reader = heapq.heappop(loads)
        heapq.heappush(loads, (load + left, reader))
        if reader == plan.reader:
            mine.append(shard)
    return mine


def keyed_samples(
    urls: list[str],
    handler: Handler,
    expected: Mapping[str, int] | None = None,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    extensions: Collection[str] | None = None,
) -> Iterator[dict]:
    """Raw samples ({"__key__", "jpg": bytes, "json": bytes, ...}) of the given shards, in tar order.

    Read by shards_tools.tar_stream under `options` (member cap, pipe: permission, http stall limit): a
    sample with a member that must not be read carries "__problem__" and is skipped by `prepare`; a shard
    that cannot be read goes to `handler`. A shard that yields fewer samples than its index file lists
    (`expected`) goes to `handler` as well: a tar cut inside a header may end without an error.
    `extensions`: the members to keep (others are not read into memory); None keeps all.
    """
    for url in urls:
        seen = 0
        for sample in iter_samples(url, handler=handler, options=options, extensions=extensions):
            seen += 1
            yield sample
        listed = (expected or {}).get(url)
        if listed is not None and seen < listed:
            handler(
                TruncatedShardError(
                    f"{url}: read {seen} of the {listed} samples its index file lists; the shard is "
                    "truncated or damaged: `mmcl shard verify FOLDER` names every such shard, re-running "
                    "`mmcl shard` with the same options rewrites it"
                )
            )


class TruncatedShardError(Exception):
    """A shard ended before the samples its manifest.json / sizes.json lists."""


def mix_sources(
    passes: list[Callable[[int], Iterator[dict]]],
    weights: list[float],
    rng: random.Random,
    consumed_passes: list[int] | None = None,
) -> Iterator[dict]:
    """Interleave sources, drawing the source of each next sample by weight; `passes[i](p)` streams
    pass p of source i. A source that runs out starts its next pass; the epoch ends when every
    source has finished its first. A pass with no samples at all drops its source for the epoch, unless
    it is one of the first `consumed_passes[i]` (continued from a ledger: it may have nothing left)."""
    consumed_passes = consumed_passes or [0] * len(passes)
    streams = [make(0) for make in passes]
    pass_index = [0] * len(passes)
    seen_in_pass = [False] * len(passes)
    finished = [False] * len(passes)
    active = list(range(len(passes)))
    while active:
        s = active[0] if len(active) == 1 else rng.choices(active, weights=[weights[i] for i in active])[0]
        sample = next(streams[s], None)
        if sample is not None:
            seen_in_pass[s] = True
            yield sample
            continue
        finished[s] = True
        if all(finished):
            return
        if not seen_in_pass[s] and pass_index[s] >= consumed_passes[s]:
            logger.warning(
                "source %d has no readable samples for this worker: left out for the rest of the epoch", s
            )
            active.remove(s)
            continue
        pass_index[s] += 1
        streams[s] = passes[s](pass_index[s])
        seen_in_pass[s] = False


def shuffle(samples: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Buffer shuffle: hold `bufsize` samples, emit a random one for each new arrival, drain at the end."""
    if bufsize <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        k = rng.randrange(bufsize)
        yield buffer[k]
        buffer[k] = sample
    rng.shuffle(buffer)
    yield from buffer


def source_pass(
    plan: ReaderPlan, source_index: int, epoch: int, handler: Handler, pass_index: int
) -> Iterator[dict]:
    """Raw samples of one pass over one source's shards for this reader, each with its "__where__"
    (source, pass, shard, index in the shard); samples a ledger holds are dropped unread."""
    source = plan.sources[source_index]
    for shard in reader_shards(plan, source_index, epoch, pass_index):
        url = source.urls[shard]
        samples = keyed_samples([url], handler, source.shard_counts, plan.read_options, plan.extensions)
        if source.scores is not None:
            # stream: the same, each with its score from the shard's sidecar (None without a row)
            samples = with_scores(samples, shard_scores(source.scores, url, source.score_field))
        # stream: the same, tagged with where they lie; an elastic resume drops the consumed ones
        tagged = _tagged(samples, source_index, pass_index, shard)
        if plan.from_ledger(epoch):
            tagged = skip_consumed(
                tagged, plan.elastic.ledger.consumed((epoch, source_index, pass_index, shard))
            )
        yield from tagged


def with_scores(samples: Iterator[dict], scores: Mapping[str, float]) -> Iterator[dict]:
    for sample in samples:
        sample["__score__"] = scores.get(sample["__key__"])
        yield sample


def _tagged(samples: Iterator[dict], source_index: int, pass_index: int, shard: int) -> Iterator[dict]:
    for index, sample in enumerate(samples):
        sample["__where__"] = (source_index, pass_index, shard, index)
        yield sample


def epoch_samples(plan: ReaderPlan, epoch: int, handler: Handler) -> Iterator[dict]:
    """One epoch of one reader's raw samples, mixed and shuffled; a pure function of its arguments."""
    salt = plan.salt(epoch)
    # stream: per source, pass number -> that pass's raw samples
    passes = [partial(source_pass, plan, i, epoch, handler) for i in range(len(plan.sources))]
    consumed_passes = None
    if plan.from_ledger(epoch) and not plan.resampled:
        consumed_passes = [max(1, plan.elastic.ledger.passes(epoch, i)) for i in range(len(plan.sources))]
    # stream: raw samples of all sources, interleaved by weight
    mixed = mix_sources(
        passes,
        [s.weight for s in plan.sources],
        random.Random(derive_seed(plan.seed, "mix", epoch, plan.rank, plan.worker, *salt)),
        consumed_passes,
    )
    # stream: the same raw samples, shuffled within a buffer
    return shuffle(
        mixed,
        plan.shuffle_buffer,
        random.Random(derive_seed(plan.seed, "shuffle", epoch, plan.rank, plan.worker, *salt)),
    )


def epochs(plan: ReaderPlan, start: int, handler: Handler) -> Iterator[dict]:
    """Epochs start, start+1, ... back to back; each raw sample is tagged with its "__epoch__". An epoch
    continued from a ledger may leave a reader nothing."""
    for epoch in itertools.count(start):
        empty = True
        for sample in epoch_samples(plan, epoch, handler):
            empty = False
            sample["__epoch__"] = epoch
            yield sample
        if empty and not plan.from_ledger(epoch):
            raise RunFailed(
                f"reader {plan.reader} (rank {plan.rank}, worker {plan.worker}) got no samples in epoch "
                f"{epoch}: its shards are empty or unreadable (see the warnings above)"
            )


def count_and_skip(samples: Iterator[dict], state: ReaderState, skip_epoch: int, skip: int) -> Iterator[dict]:
    """Count raw samples per epoch into `state`, and drop the first `skip` of `skip_epoch` (resume)."""
    for sample in samples:
        epoch = sample["__epoch__"]
        if epoch != state.epoch:
            state.epoch, state.position = epoch, 0
        state.position += 1
        if epoch == skip_epoch and state.position <= skip:
            continue
        yield sample


@dataclass
class SamplePreparer:
    """Raw sample -> {"key", "media", "caption", "noisy", "alignment_score", "label_index"} (picklable).

    With `device_images` the model's transform is not run and an image's "media" is uint8: resized to the
    model's size (mmcl.data.image.image_resized), or with `device_images.resize_on_device` its crop, not yet
    resized (uint8 [h, w, 3]), and the item also has its "media_box" (mmcl.data.image.image_crop).
    """

    modality: Modality
    media_transform: Callable[[Any], torch.Tensor] | None
    tokenizer: Callable[[list[str]], torch.Tensor]
    seed: int
    sample_rate: int
    clip_seconds: float
    random_crop: bool
    image_size: int | None
    max_seconds: float | None = None
    device_images: DeviceImageSpec | None = None

    def __call__(self, sample: dict) -> dict:
        key, epoch = sample["__key__"], sample["__epoch__"]
        if "__problem__" in sample:
            raise BadSample(key, sample["__problem__"])
        meta = read_meta(sample)
        caption = choose_caption(sample, meta, lambda: derive_seed(self.seed, epoch, key, "text"))
        media_seed = derive_seed(self.seed, epoch, key, "media")
        extra = {}
        spec = self.device_images
        if self.modality == "image" and spec is not None and spec.resize_on_device:
            media, extra["media_box"] = image_crop(sample, spec, media_seed)
        elif self.modality == "image" and spec is not None:
            media = image_resized(sample, spec, media_seed, self.image_size)
        elif self.modality == "image":
            media = image_media(sample, self.media_transform, media_seed, self.image_size)
        else:
            media = audio_media(
                sample,
                self.media_transform,
                media_seed,
                sample_rate=self.sample_rate,
                clip_seconds=self.clip_seconds,
                random_crop=self.random_crop,
                max_seconds=self.max_seconds,
            )
        return {
            "key": key,
            "where": (epoch, *sample["__where__"]),
            "media": media,
            "caption": caption,
            "noisy": meta["noisy"] if isinstance(meta.get("noisy"), bool) else None,
            "alignment_score": sample["__score__"]
            if "__score__" in sample
            else _number(meta.get("alignment_score")),
            "label_index": sample_label(meta, sample.get("cls")),
            **extra,
        }


def _number(value: object) -> float | None:
    """A finite number from JSON: a number, or a string holding one (CSV manifest columns are strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 64:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def prepare(
    samples: Iterator[dict], preparer: SamplePreparer, state: ReaderState, handler: Handler
) -> Iterator[dict]:
    """Decode, transform and tokenize; a bad sample goes to `handler` as a BadSample (True: skip and count
    it).

    This is the loader's one exception boundary: whatever a sample's bytes make a decoder raise (Pillow's
    plugins raise a dozen types on hostile files, the resampler RuntimeError, a parser MemoryError) is that
    sample's fault, skipped and counted with its reason, never a dead run that dies again on resume.
    """
    for sample in samples:
        try:
            try:
                item = preparer(sample)
            except BadSample:
                raise
            except Exception as exc:
                raise BadSample(sample["__key__"], f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        except BadSample as err:
            if not handler(err):
                raise
            state.dropped.append((sample["__epoch__"], *sample["__where__"]))
            state.skipped += 1
            state.bad_run += 1
            if state.bad_run >= MAX_BAD_RUN:
                raise RunFailed(
                    f"{MAX_BAD_RUN} samples in a row could not be used (last: {err}); "
                    "do data.sources hold the modality being trained?"
                ) from err
            continue
        state.bad_run = 0
        yield item


def _optional(items: list[dict], name: str, dtype: torch.dtype, missing: object) -> torch.Tensor | None:
    values = [item[name] for item in items]
    if all(v is None for v in values):
        return None
    return torch.tensor([missing if v is None else v for v in values], dtype=dtype)


def collate(
    items: list[dict], tokenizer: Callable[[list[str]], torch.Tensor], buffers: BatchBuffers
) -> dict[str, Any]:
    """Prepared samples -> the batch's tensors, the captions tokenized in one call (every tokenizer mmcl
    builds pads to its context length, so a batch's tokens equal its samples' one by one). Optional fields
    are None when no sample has them;
    otherwise samples without them read noisy=False, alignment_score=NaN, label_index=-1. uint8 images
    stack into uint8 "media" [B, H, W, 3]; crops to resize on the device become "media" (padded uint8),
    "media_boxes" and "media_sizes" (mmcl.data.device_transform). The media are stacked into `buffers`
    (in a loader worker, shared memory that sending does not copy and the trainer gives back to reuse),
    and the batch's TICKET names its buffer."""
    if "media_box" in items[0]:
        media, ticket = pad_crops(
            [item["media"] for item in items], [item["media_box"] for item in items], buffers
        )
    elif isinstance(items[0]["media"], np.ndarray):
        stacked, ticket = buffers.allocate((len(items), *items[0]["media"].shape), torch.uint8)
        np.stack([item["media"] for item in items], out=stacked.numpy())
        media = {"media": stacked}
    else:
        first = items[0]["media"]
        stacked, ticket = buffers.allocate((len(items), *first.shape), first.dtype)
        media = {"media": torch.stack([item["media"] for item in items], out=stacked)}
    return {
        **media,
        "text": tokenizer([item["caption"] for item in items]).long(),
        "keys": [item["key"] for item in items],
        "noisy": _optional(items, "noisy", torch.bool, False),
        "alignment_score": _optional(items, "alignment_score", torch.float32, float("nan")),
        "label_index": _optional(items, "label_index", torch.long, -1),
        TICKET: ticket,
    }


def batched(
    items: Iterator[dict],
    batch_size: int,
    state: ReaderState,
    tokenizer: Callable[[list[str]], torch.Tensor],
    buffers: BatchBuffers,
) -> Iterator[dict[str, Any]]:
    """Full batches only (`collate`), each stamped with the reader's position after its last sample and
    "consumed": where the raw samples it accounts for lie (its own and the bad ones dropped since the
    reader's previous batch), [n, 5] rows of (epoch, source, pass, shard, index)."""
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            consumed = torch.tensor([item["where"] for item in batch] + state.dropped, dtype=torch.long)
            state.dropped = []
            yield {
                **collate(batch, tokenizer, buffers),
                "worker": state.worker,
                "epoch": state.epoch,
                "position": state.position,
                "skipped": state.skipped,
                "consumed": consumed,
            }
            batch = []


class TrainStream(IterableDataset):
    """An endless stream of training batches (dicts, see `collate` and `batched`) for one rank.

    Built by `build_train_stream`; iterate it through `build_loader`'s DataLoader (or directly when
    data.workers is 0).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        modality: Modality,
        media_transform: Callable[[Any], torch.Tensor] | None,
        tokenizer: Callable[[list[str]], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        resume: Mapping[str, Any] | DataProgress | None = None,
        handler: Handler = log_and_continue,
        sources: list[Source] | None = None,
        device_images: DeviceImageSpec | None = None,
    ) -> None:
        super().__init__()
        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
        if modality == "image" and media_transform is None:
            raise ValueError(
                "images need a media_transform: pass the model's, e.g. model.media_transform(train=True)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(cfg.workers, 1)
        self.handler = handler
        if sources is None:
            sources = resolve_sources(cfg, modality)
            check_shard_counts(sources, world_size * self.num_workers, cfg.resampled)
        self.sources = sources
        self.resume_state = self.new_state()
        self.progress = DataProgress(world_size, self.num_workers, cfg.resampled)
        self.elastic: ElasticResume | None = None
        if resume:
            saved = resume if isinstance(resume, DataProgress) else DataProgress.from_state_dict(resume)
            self.progress.ledger, self.progress.step = saved.ledger, saved.step
            self.progress.elastic_until = saved.elastic_until
            if saved.can_replay(world_size, self.num_workers) and saved.resampled == cfg.resampled:
                self.resume_state.load_state_dict(saved.ranks[rank])
            else:
                self.elastic = saved.elastic()
                self.progress.elastic_until = self.elastic.last_epoch
                self.resume_state.start_epoch = self.elastic.start_epoch
                if rank == 0:  # the old readers' bad-sample count carries on in one reader
                    skipped = self.elastic.carried_skipped
                    self.resume_state.workers[0] = {
                        "epoch": self.elastic.start_epoch,
                        "position": 0,
                        "skipped": skipped,
                    }
        self.preparer = SamplePreparer(
            modality=modality,
            media_transform=media_transform,
            tokenizer=tokenizer,
            seed=cfg.seed,
            sample_rate=cfg.sample_rate,
            clip_seconds=cfg.clip_seconds,
            random_crop=cfg.random_crop,
            image_size=cfg.image_size,
            max_seconds=cfg.max_seconds,
            device_images=device_images if modality == "image" else None,
        )
        self.buffers = BatchBuffers(cfg.workers)

    def give_back(self, batches: list[dict[str, Any]]) -> None:
        """The consumer is done with `batches` (nothing reads their media any more): the workers may fill
        their memory with later batches (mmcl.data.batch_buffers). A consumer that never calls it loses
        nothing but that reuse."""
        for batch in batches:
            self.buffers.give_back(batch)

    def new_state(self) -> StreamState:
        """An empty StreamState for this stream's layout."""
        return StreamState(
            num_workers=self.num_workers,
            rank=self.rank,
            world_size=self.world_size,
            track_consumed=not self.cfg.resampled,
        )

    def initial_state(self) -> StreamState:
        """The StreamState this stream starts from (what a trainer updates with each batch it trains on)."""
        state = self.new_state()
        state.load_state_dict(self.resume_state.state_dict())
        return state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        dataloader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(
                f"this stream was built for {self.num_workers} worker(s) (data.workers) but runs in a "
                f"DataLoader with {num_workers}; use build_loader"
            )
        # Rotate ids so that the worker that is due next after a resume is the DataLoader's first.
        worker = (dataloader_worker + self.resume_state.next_worker) % num_workers
        start = self.resume_state.workers.get(
            worker, {"epoch": self.resume_state.start_epoch, "position": 0, "skipped": 0}
        )
        plan = ReaderPlan(
            sources=tuple(self.sources),
            seed=self.cfg.seed,
            rank=self.rank,
            worker=worker,
            reader=self.rank * num_workers + worker,
            readers=self.world_size * num_workers,
            shard_shuffle=self.cfg.shard_shuffle,
            resampled=self.cfg.resampled,
            shuffle_buffer=self.cfg.shuffle_buffer,
            read_options=read_options(self.cfg),
            extensions=(*MEDIA_EXTENSIONS[self.preparer.modality], *META_EXTENSIONS),
            elastic=self.elastic,
        )
        state = ReaderState(worker=worker, epoch=start["epoch"], skipped=start["skipped"])
        # stream: raw samples (tar bytes per key) of epochs start, start+1, ..., mixed and shuffled
        raw = epochs(plan, start["epoch"], self.handler)
        # stream: the same, counted into state.position; on resume the first ones are dropped undecoded
        fresh = count_and_skip(raw, state, start["epoch"], start["position"])
        # stream: decoded, transformed, tokenized samples; bad ones skipped and counted
        items = prepare(fresh, self.preparer, state, self.handler)
        # stream: batches with the reader's metadata
        return batched(items, self.cfg.batch_size, state, self.preparer.tokenizer, self.buffers)


def read_options(cfg: DataConfig) -> ReadOptions:
    """How the data section lets shards be read: member cap, pipe: permission, http stall limit."""
    return ReadOptions(
        max_member_bytes=cfg.max_member_bytes, allow_pipe=cfg.allow_pipe, http_timeout=cfg.http_timeout
    )


def build_train_stream(
    cfg: DataConfig,
    *,
    modality: Modality,
    media_transform: Callable[[Any], torch.Tensor] | None,
    tokenizer: Callable[[list[str]], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
    resume: Mapping[str, Any] | DataProgress | None = None,
    handler: Handler = log_and_continue,
    sources: list[Source] | None = None,
    device_images: DeviceImageSpec | None = None,
) -> TrainStream:
    """The endless batch stream for one rank (checks sources, shard counts and `resume` up front).

    `media_transform`: the model's per-sample transform (PIL image -> [3, H, W]; for audio an optional
    waveform -> waveform step after the crop). `tokenizer`: list[str] -> LongTensor [N, context].
    `rank`/`world_size` are explicit (no environment lookups). `resume`: a DataProgress (or its state_dict())
    saved by any layout (mmcl.data.progress: the same layout replays exactly, another continues from the
    ledger).
    `handler` gets every bad sample and unreadable shard; returning True skips it. `sources`: cfg's sources
    as `resolve_sources` gives them, already checked against `check_shard_counts` for this world size (what
    the trainer's preflight did); None resolves and checks them here. `device_images`: images are handed
    over as uint8, resized in the workers or on the device (mmcl.data.device_transform.choose_image_path;
    the batches then need `batch_to_model_input` on the training device); None runs `media_transform`
    whole in the workers.
    """
    return TrainStream(
        cfg,
        modality=modality,
        media_transform=media_transform,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world_size,
        resume=resume,
        handler=handler,
        sources=sources,
        device_images=device_images,
    )


def build_loader(
    cfg: DataConfig,
    *,
    modality: Modality,
    media_transform: Callable[[Any], torch.Tensor] | None,
    tokenizer: Callable[[list[str]], torch.Tensor],
    rank: int = 0,
    world_size: int = 1,
    resume: Mapping[str, Any] | DataProgress | None = None,
    handler: Handler = log_and_continue,
    pin_memory: bool = False,
    sources: list[Source] | None = None,
    device_images: DeviceImageSpec | None = None,
) -> DataLoader:
    """A DataLoader over `build_train_stream(...)` with data.workers processes and batch_size=None
    (the workers batch). Keep it out of `accelerator.prepare`: the stream is already split by rank."""
    stream = build_train_stream(
        cfg,
        modality=modality,
        media_transform=media_transform,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world_size,
        resume=resume,
        handler=handler,
        sources=sources,
        device_images=device_images,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        worker_init_fn=init_loader_worker,
    )


def init_loader_worker(worker_id: int) -> None:
    """Each loader worker keeps the memory a batch frees for the next (mmcl.host_memory), on any training
    device: otherwise every batch and shuffle buffer faults in fresh pages, ~15 page faults an image at
    224 px (2-3 % of a worker's time an image; docs/BENCHMARKS.md, "Image loader")."""
    keep_freed_memory()
