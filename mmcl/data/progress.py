"""Where the training stream is, in the two forms a resume can use.

Positions (exact replay). Each reader (rank r, loader worker w) reports with every batch its epoch and how
many raw samples of that epoch it has taken ("position"). `StreamState` keeps the latest per reader of one
rank. Resumed with the same world size and data.workers, every reader rebuilds its stream and drops the
first `position` raw samples undecoded: the run continues with exactly the batches it would have trained.

The ledger (elastic). Every raw sample of an epoch is identified by where it lies, independently of which
reader read it: (epoch, source, pass, shard index in the source's list, sample index in the shard). Every
batch lists the samples it accounts for (its own and the bad ones dropped since the reader's previous batch)
and the trainer marks them in a `SampleLedger`: a bitmap of consumed samples per shard. Samples that were
read but not trained on (in a shuffle buffer, in a batch prefetched by the DataLoader) are not marked, so they
go back to the pool. Resumed with any other layout, the readers of the new layout share out what the ledger
does not hold (`ElasticResume`) and read on from there, skipping consumed samples as raw tar bytes. An epoch
leaves the ledger once every reader has gone past it, so the ledger holds one or two epochs at most: its size
is bounded by the number of shards, not by the number of processes.

`DataProgress` is the saved form (TrainState.data), written by the trainer's main process from every rank's
`StreamState` and ledger; `build_loader(resume=...)` reads it on every rank and picks replay or elastic.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmcl.errors import UsageError

ShardKey = tuple[int, int, int, int]  # (epoch, source, pass, shard index)
MAX_SHARD_BITS = 1 << 24  # sample indices a shard's bitmap may hold (a damaged state must not allocate more)


def bitmap_bytes(bits: int) -> bytes:
    return bits.to_bytes((bits.bit_length() + 7) // 8, "little")


@dataclass
class SampleLedger:
    """Which raw samples of each open epoch have been consumed (trained on, or dropped as bad): a bitmap of
    sample indices per (epoch, source, pass, shard), held as a Python int (bit i: sample i). Merging ledgers
    is a bitwise or, so the order in which ranks report does not matter; a 1,000-sample shard costs 125
    bytes however its consumed samples are scattered by the shuffle buffer."""

    shards: dict[ShardKey, int] = field(default_factory=dict)

    def mark(self, rows: Iterable[Sequence[int]]) -> None:
        """Mark samples given as (epoch, source, pass, shard, index) rows (a batch's "consumed")."""
        for epoch, source, pass_index, shard, index in rows:
            key = (int(epoch), int(source), int(pass_index), int(shard))
            self.shards[key] = self.shards.get(key, 0) | (1 << int(index))

    def merge(self, other: SampleLedger) -> None:
        for key, bits in other.shards.items():
            self.shards[key] = self.shards.get(key, 0) | bits

    def consumed(self, key: ShardKey) -> int:
        """The shard's bitmap (0: nothing consumed)."""
        return self.shards.get(key, 0)

    def epochs(self) -> list[int]:
        return sorted({key[0] for key in self.shards})

    def passes(self, epoch: int, source: int) -> int:
        """How many passes of `source` in `epoch` have consumed samples (1 + the highest one; 0: none)."""
        return 1 + max((k[2] for k in self.shards if k[0] == epoch and k[1] == source), default=-1)

    def drop_before(self, epoch: int) -> None:
        """Forget epochs every reader has finished."""
        self.shards = {k: v for k, v in self.shards.items() if k[0] >= epoch}

    def samples(self) -> int:
        return sum(bits.bit_count() for bits in self.shards.values())

    def __bool__(self) -> bool:
        return bool(self.shards)

    def state_dict(self) -> list[list]:
        """JSON-able: one row per shard, [epoch, source, pass, shard, base64 of the little-endian bitmap]."""
        return [
            [*key, base64.b64encode(bitmap_bytes(bits)).decode("ascii")]
            for key, bits in sorted(self.shards.items())
        ]

    @classmethod
    def from_state_dict(cls, rows: Iterable[Sequence]) -> SampleLedger:
        shards: dict[ShardKey, int] = {}
        for row in rows:
            ok = isinstance(row, (list, tuple)) and len(row) == 5 and isinstance(row[4], str)
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[:4])
            ok = ok and len(row[4]) <= 4 * MAX_SHARD_BITS // 24 + 4
            try:
                bits = int.from_bytes(base64.b64decode(row[4], validate=True), "little") if ok else 0
            except ValueError:
                ok = False
            if not ok:
                raise UsageError(
                    f"the data state's ledger has a malformed row {str(row)[:80]}: a damaged state.json"
                )
            key = (row[0], row[1], row[2], row[3])
            shards[key] = shards.get(key, 0) | bits
        return cls(shards)


def skip_consumed(samples: Iterator[dict], bits: int) -> Iterator[dict]:
    """Drop the samples whose "__where__" index is set in `bits` (raw bytes, nothing decoded)."""
    if not bits:
        yield from samples
        return
    for sample in samples:
        if not (bits >> sample["__where__"][3]) & 1:
            yield sample


@dataclass
class StreamState:
    """One rank's data state, updated by the trainer with every batch it trains on (`update`).

    `state_dict()` holds the rank's readers' positions (exact replay); `take_consumed()` hands over, and
    clears, the samples consumed since the last call (the trainer merges every rank's into the ledger)."""

    num_workers: int
    rank: int = 0
    world_size: int = 1
    next_worker: int = 0
    start_epoch: int = 0
    workers: dict[int, dict[str, int]] = field(default_factory=dict)
    consumed: SampleLedger = field(default_factory=SampleLedger)
    track_consumed: bool = True

    def update(self, batch: Mapping[str, Any]) -> None:
        worker = int(batch["worker"])
        self.workers[worker] = {k: int(batch[k]) for k in ("epoch", "position", "skipped")}
        self.next_worker = (worker + 1) % self.num_workers
        if self.track_consumed and batch.get("consumed") is not None:
            self.consumed.mark(batch["consumed"].tolist())

    def take_consumed(self) -> SampleLedger:
        taken, self.consumed = self.consumed, SampleLedger()
        return taken

    def reader_epochs(self) -> list[int]:
        """The epoch every reader of this rank is in (a reader that has not yielded yet: its start epoch)."""
        return [self.workers.get(w, {}).get("epoch", self.start_epoch) for w in range(self.num_workers)]

    def skipped(self) -> int:
        return sum(w["skipped"] for w in self.workers.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "next_worker": self.next_worker,
            "start_epoch": self.start_epoch,
            "workers": {str(w): dict(v) for w, v in sorted(self.workers.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a saved state (raises UsageError if it was saved for another layout of readers)."""
        for name in ("num_workers", "rank", "world_size"):
            saved = state.get(name)
            if saved is not None and saved != getattr(self, name):
                raise UsageError(
                    f"the data state was saved with {name}={saved}, this run has {getattr(self, name)}: "
                    "replay needs the same world size and data.workers (DataProgress resumes any layout)"
                )
        workers = {
            int(w): {k: int(v.get(k, 0)) for k in ("epoch", "position", "skipped")}
            for w, v in state.get("workers", {}).items()
        }
        unknown = sorted(w for w in workers if not 0 <= w < self.num_workers)
        if unknown:
            raise UsageError(f"the data state names workers {unknown}, but there are {self.num_workers}")
        self.workers = workers
        self.next_worker = int(state.get("next_worker", 0)) % self.num_workers
        self.start_epoch = int(state.get("start_epoch", 0))


@dataclass(frozen=True)
class ElasticResume:
    """What the readers of a new layout continue from: the consumed samples of the open epochs, the first
    epoch any old reader had not finished, and a salt for the new readers' mixing and shuffling (the step)."""

    ledger: SampleLedger
    start_epoch: int
    salt: int
    carried_skipped: int = 0

    @property
    def last_epoch(self) -> int:
        """The last epoch read from the ledger; later epochs start fresh."""
        return max([self.start_epoch, *self.ledger.epochs()])


@dataclass
class DataProgress:
    """The data section of a checkpoint (TrainState.data), the same on every rank: the layout it was saved
    with, every rank's `StreamState`, the ledger, and `elastic_until`: the last epoch the current readers
    read from a ledger (after an elastic resume; -1 if never), which replay cannot rebuild.

    JSON form: {"world_size", "num_workers", "resampled", "step", "elastic_until", "global_batch",
    "ranks": {"0": StreamState.state_dict(), ...}, "consumed": SampleLedger.state_dict()}."""

    world_size: int
    num_workers: int
    resampled: bool
    step: int = 0
    elastic_until: int = -1
    global_batch: int | None = None
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    ledger: SampleLedger = field(default_factory=SampleLedger)

    def record(
        self, step: int, rank_states: Sequence[dict[str, Any]], consumed: Iterable[SampleLedger]
    ) -> None:
        """Take every rank's StreamState.state_dict() and the samples they consumed since the last record,
        then forget the epochs every reader has finished."""
        self.step = step
        self.ranks = {rank: dict(state) for rank, state in enumerate(rank_states)}
        for ledger in consumed:
            self.ledger.merge(ledger)
        self.ledger.drop_before(self.oldest_open_epoch())

    def oldest_open_epoch(self) -> int:
        epochs = [
            state["workers"].get(str(w), {}).get("epoch", state.get("start_epoch", 0))
            for state in self.ranks.values()
            for w in range(state["num_workers"])
        ]
        return min(epochs, default=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "resampled": self.resampled,
            "step": self.step,
            "elastic_until": self.elastic_until,
            "global_batch": self.global_batch,
            "ranks": {str(r): s for r, s in sorted(self.ranks.items())},
            "consumed": self.ledger.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DataProgress:
        if state and all(str(k).isdigit() and isinstance(v, dict) for k, v in state.items()):
            # per-rank positions only, as checkpoints held them before the ledger
            first = next(iter(state.values()))
            state = {"world_size": len(state), "num_workers": first.get("num_workers", 1), "ranks": state}
        try:
            return cls(
                world_size=int(state["world_size"]),
                num_workers=int(state["num_workers"]),
                resampled=bool(state.get("resampled", False)),
                step=int(state.get("step", 0)),
                elastic_until=int(state.get("elastic_until", -1)),
                global_batch=state.get("global_batch"),
                ranks={int(r): dict(s) for r, s in state.get("ranks", {}).items()},
                ledger=SampleLedger.from_state_dict(state.get("consumed", [])),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise UsageError(
                f"the checkpoint's data state is malformed ({err!r}): a damaged state.json"
            ) from None

    def can_replay(self, world_size: int, num_workers: int) -> bool:
        """Same layout, and every reader is past the epochs it read from a ledger: positions rebuild it."""
        return (
            world_size == self.world_size
            and num_workers == self.num_workers
            and len(self.ranks) == self.world_size
            and self.oldest_open_epoch() > self.elastic_until
        )

    def elastic(self) -> ElasticResume:
        """The resume state for readers of another layout."""
        skipped = sum(w.get("skipped", 0) for s in self.ranks.values() for w in s.get("workers", {}).values())
        # a copy: the readers must share out the ledger as it was, while the trainer records into its own
        return ElasticResume(
            SampleLedger(dict(self.ledger.shards)), self.oldest_open_epoch(), self.step, skipped
        )
