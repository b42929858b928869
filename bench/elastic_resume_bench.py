"""Elastic exact resume at scale: the checkpoint's data state (size, time to write) and the resume (time to
parse it, time for a reader of a new layout to find its share), simulated without data or training.

Run from the repository root with the project venv:

    .venv/bin/python bench/elastic_resume_bench.py                        # 10,000 x 1,000 samples, 512 x 8
    .venv/bin/python bench/elastic_resume_bench.py --fractions 0.6        # one checkpoint, 60 % through
    .venv/bin/python bench/elastic_resume_bench.py --buffer-models exact  # the shuffle buffer replayed
    .venv/bin/python bench/elastic_resume_bench.py --smoke                # a tiny layout: it runs

The epoch: one source of --shards shards x --shard-size samples (fake URLs, sizes from a fake index file),
read by --processes x --workers readers, each with a --shuffle-buffer buffer and --batch-size batches. The
checkpoint is taken mid-epoch, as a fresh run would be there: reader r reads `order[r::readers]` of the
epoch's shard permutation (mmcl.data.pipeline.reader_shards), and has read a share f of its samples (f from
--fractions, +- --spread per reader, seeded). Of what it has read, the samples still in its shuffle buffer,
in the --prefetch batches the DataLoader holds and in the batch being filled are not consumed; the rest is.
Which samples the buffer holds (--buffer-models):

  window   the unconsumed ones drawn at random among the reader's last
           (unconsumed + buffer) read samples (~2 x buffer), everything before consumed
  exact    mmcl.data.pipeline.shuffle itself run over the reader's sample positions: consumed are the first
           batches it emits (buffers keep some old samples for long, so the holes spread further back)

Each rank's ledger holds its readers' consumed samples (built directly as one int bitmap per shard; before
the large layout the script checks, on a small one, that this equals `StreamState.update` with every batch's
"consumed" rows and that a resumed layout reads every sample left exactly once). Measured, per scenario
(fraction, model):

  gather    the per-rank payload the trainer gathers at a checkpoint ({"data": StreamState.state_dict(),
            "consumed": ledger rows}): largest and total, JSON and pickle (gather_object pickles)
  record    the main process: `SampleLedger.from_state_dict` of every rank's rows, then
            `DataProgress.record`; then `state_dict()` and `json.dumps` (what goes into state.json)
  size      bytes of the data state in state.json, and of its ledger part ("consumed", base64 bitmaps); the
            ledger's rows (one per shard with consumed samples) and raw bitmap bytes (median and max per
            row), consumed samples per partially consumed shard (median / max)
  resume    `json.loads`, `DataProgress.from_state_dict` (and its tracemalloc peak, run separately),
            `.elastic()`, `bit_count()` of every shard's bitmap (what `share_remaining` spends on the
            ledger); per new layout (--new-layouts), one reader's `share_remaining` and `reader_shards`
            (the shard permutation + the share; every reader computes it at start), the balance of the
            samples left over the new readers (max / mean), and the correctness check: the shares of all
            readers cover exactly the shards with samples left, none twice (every reader's
            `share_remaining` called for layouts of up to --check-all-readers readers; larger ones:
            16 readers compared with one pass of the same dealing)
  skip      `skip_consumed` per sample over one shard of fake sample dicts: no ledger (an untouched shard),
            the median and the fullest partially consumed shard of the ledger (by consumed samples)

Everything runs in this one process (single-threaded Python). Results: a table on stdout and --out (default
bench/out/elastic_resume.json, git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import pickle
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from host import machine_line  # noqa: E402

from mmcl.data.pipeline import ReaderPlan, reader_shards, share_remaining, shuffle  # noqa: E402
from mmcl.data.progress import (  # noqa: E402
    DataProgress,
    ElasticResume,
    SampleLedger,
    StreamState,
    bitmap_bytes,
    skip_consumed,
)
from mmcl.data.sources import Source  # noqa: E402
from shards_tools.tar_stream import DEFAULT_READ_OPTIONS  # noqa: E402

EPOCH, SOURCE, PASS = 0, 0, 0


@dataclass(frozen=True)
class Layout:
    """The epoch and the readers that read it at the checkpoint."""

    shards: int
    shard_size: int
    processes: int
    workers: int
    shuffle_buffer: int
    batch_size: int
    prefetch: int
    seed: int = 0

    @property
    def readers(self) -> int:
        return self.processes * self.workers


@dataclass
class ReaderSim:
    """One old reader at the checkpoint: its shards, how far it has read, what it has consumed."""

    reader: int
    shards: list[int]
    read: int  # raw samples taken from its shards
    consumed: list[int] = field(default_factory=list)  # positions in its read order, in the order trained


def make_source(shards: int, shard_size: int) -> Source:
    """A source with fake URLs (nothing is read) and every shard's size known, as from an index file."""
    urls = tuple(f"s{i:05d}.tar" for i in range(shards))
    return Source(urls, 1.0, shards * shard_size, "fake", {url: shard_size for url in urls})


def make_plan(
    source: Source, layout: Layout, reader: int, elastic: ElasticResume | None = None
) -> ReaderPlan:
    """The ReaderPlan of one reader (rank, worker from its number)."""
    return ReaderPlan(
        sources=(source,),
        seed=layout.seed,
        rank=reader // layout.workers,
        worker=reader % layout.workers,
        reader=reader,
        readers=layout.readers,
        shard_shuffle=True,
        resampled=False,
        shuffle_buffer=layout.shuffle_buffer,
        read_options=DEFAULT_READ_OPTIONS,
        extensions=(),
        elastic=elastic,
    )


def epoch_order(source: Source, layout: Layout) -> list[int]:
    """The epoch's shard permutation, from reader_shards itself (one reader of one reads all of it)."""
    whole = replace(layout, processes=1, workers=1)
    order = reader_shards(make_plan(source, whole, 0), SOURCE, EPOCH, PASS)
    for r in {0, layout.readers // 2, layout.readers - 1}:  # the fresh run's slices are slices of it
        assert reader_shards(make_plan(source, layout, r), SOURCE, EPOCH, PASS) == order[r :: layout.readers]
    return order


def simulate_readers(
    order: list[int], layout: Layout, fraction: float, spread: float, model: str
) -> list[ReaderSim]:
    """Every old reader's progress at the checkpoint (seeded: the same arguments give the same readers)."""
    rng = random.Random(f"{layout.seed}/{fraction}/{model}")
    size, buffer, batch = layout.shard_size, layout.shuffle_buffer, layout.batch_size
    sims = []
    for r in range(layout.readers):
        shards = order[r :: layout.readers]
        total = len(shards) * size
        f = min(max(fraction + rng.uniform(-spread, spread), 0.0), 0.999)
        read = round(f * total)
        emitted = max(0, read - buffer)  # the buffer fills first, then emits one per sample read
        trained = max(0, (emitted - layout.prefetch * batch) // batch * batch)
        if model == "window":
            # the unconsumed ones at random among the last (unconsumed + buffer) read, all before consumed
            left = read - trained
            window = min(read, left + buffer)
            holes = set(rng.sample(range(read - window, read), left))
            consumed = [p for p in range(read) if p not in holes]
            rng.shuffle(
                consumed
            )  # the order they were trained in is unknown: any order gives the same ledger
        else:  # exact: the pipeline's buffer shuffle over the positions, the first `trained` it emits
            consumed = list(itertools.islice(shuffle(iter(range(total)), buffer, rng), trained))
        sims.append(ReaderSim(r, shards, read, consumed))
    return sims


def reader_bitmaps(sim: ReaderSim, shard_size: int) -> dict[tuple[int, int, int, int], int]:
    """A reader's consumed samples as ledger bitmaps (bit i: sample i of the shard), built directly through
    a bytearray per shard (what `SampleLedger.mark` gives, without an int operation per sample)."""
    per_slot: dict[int, bytearray] = {}
    for p in sim.consumed:
        slot, i = divmod(p, shard_size)
        buf = per_slot.get(slot)
        if buf is None:
            buf = per_slot[slot] = bytearray((shard_size + 7) // 8)
        buf[i >> 3] |= 1 << (i & 7)
    return {
        (EPOCH, SOURCE, PASS, sim.shards[slot]): int.from_bytes(buf, "little")
        for slot, buf in per_slot.items()
    }


def rank_states(sims: list[ReaderSim], layout: Layout) -> tuple[list[dict[str, Any]], list[SampleLedger]]:
    """Per rank: the StreamState.state_dict() the trainer would hold, and its ledger since the epoch began."""
    rng = random.Random(f"{layout.seed}/next-worker")
    states, ledgers = [], []
    for rank in range(layout.processes):
        ledger = SampleLedger()
        workers = {}
        for w in range(layout.workers):
            sim = sims[rank * layout.workers + w]
            ledger.merge(SampleLedger(reader_bitmaps(sim, layout.shard_size)))
            if sim.consumed:  # a worker none of whose batches was trained on is not in the state yet
                workers[str(w)] = {"epoch": EPOCH, "position": len(sim.consumed), "skipped": 0}
        states.append(
            {
                "num_workers": layout.workers,
                "rank": rank,
                "world_size": layout.processes,
                "next_worker": rng.randrange(layout.workers),
                "start_epoch": EPOCH,
                "workers": workers,
            }
        )
        ledgers.append(ledger)
    return states, ledgers


class Rows:
    """A batch's "consumed" tensor, as far as StreamState.update looks at it."""

    def __init__(self, rows: list[tuple[int, ...]]) -> None:
        self.rows = rows

    def tolist(self) -> list[tuple[int, ...]]:
        return self.rows


def deal_all(
    ledger: SampleLedger, order: list[int], counts: list[int], readers: int
) -> tuple[list[int], list[int]]:
    """Every new reader's share in one pass (share_remaining's dealing, done once for all readers): the owner
    of each shard with samples left (-1: none left) and every reader's load."""
    owner = [-1] * len(counts)
    loads = [(0, reader) for reader in range(readers)]
    for shard in order:
        left = counts[shard] - ledger.consumed((EPOCH, SOURCE, PASS, shard)).bit_count()
        if left <= 0:
            continue
        load, reader = heapq.heappop(loads)
        heapq.heappush(loads, (load + left, reader))
        owner[shard] = reader
    final = [0] * readers
    for load, reader in loads:
        final[reader] = load
    return owner, final


def timed(fn: Callable[..., Any], *args: Any, repeat: int = 1) -> tuple[float, Any]:
    """(best seconds over `repeat` calls of fn(*args), the last result); the garbage collector runs as in the
    trainer."""
    best, result = float("inf"), None
    gc.collect()
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, result


def skip_all(samples: list[dict], bits: int) -> int:
    """Run skip_consumed over one shard's samples; how many it keeps."""
    n = 0
    for _ in skip_consumed(iter(samples), bits):
        n += 1
    return n


def parse_ledgers(rows: list[list[list]]) -> list[SampleLedger]:
    """The main process's side of the gather: every rank's ledger rows -> SampleLedger."""
    return [SampleLedger.from_state_dict(r) for r in rows]


def bit_count_all(ledger: SampleLedger, order: list[int]) -> list[int]:
    """The consumed samples of every shard (bit_count of its bitmap), as share_remaining computes them."""
    return [ledger.consumed((EPOCH, SOURCE, PASS, s)).bit_count() for s in order]


# ----------------------------------------------------------------------------- the small layout's checks
def check_small(model: str, spread: float) -> dict[str, Any]:
    """On a small layout: the direct ledgers equal StreamState.update's, and after a resume on other layouts
    every sample left is read exactly once (reader_shards + skip_consumed over fake samples)."""
    layout = Layout(
        shards=96, shard_size=50, processes=4, workers=3, shuffle_buffer=30, batch_size=8, prefetch=2
    )
    source = make_source(layout.shards, layout.shard_size)
    order = epoch_order(source, layout)
    sims = simulate_readers(order, layout, 0.7, spread, model)
    states, ledgers = rank_states(sims, layout)
    for rank in range(layout.processes):
        stream = StreamState(num_workers=layout.workers, rank=rank, world_size=layout.processes)
        for step in range(max(len(s.consumed) for s in sims) // layout.batch_size):
            for w in range(layout.workers):
                sim = sims[rank * layout.workers + w]
                rows = [
                    (EPOCH, SOURCE, PASS, sim.shards[p // layout.shard_size], p % layout.shard_size)
                    for p in sim.consumed[step * layout.batch_size : (step + 1) * layout.batch_size]
                ]
                if rows:
                    stream.update(
                        {
                            "worker": w,
                            "epoch": EPOCH,
                            "position": (step + 1) * layout.batch_size,
                            "skipped": 0,
                        }
                        | {"consumed": Rows(rows)}
                    )
        assert stream.take_consumed().shards == ledgers[rank].shards, f"rank {rank}: direct ledger != mark()"
        got = stream.state_dict()
        assert got["workers"] == states[rank]["workers"], f"rank {rank}: positions differ"
    progress = DataProgress(layout.processes, layout.workers, False)
    progress.record(1, states, ledgers)
    saved = DataProgress.from_state_dict(json.loads(json.dumps(progress.state_dict())))
    assert saved.ledger.shards == progress.ledger.shards
    elastic = saved.elastic()
    everything = {(s, i) for s in range(layout.shards) for i in range(layout.shard_size)}
    done = {
        (k[3], i)
        for k, bits in saved.ledger.shards.items()
        for i in range(layout.shard_size)
        if bits >> i & 1
    }
    assert len(done) == saved.ledger.samples() == sum(len(s.consumed) for s in sims)
    for new in (replace(layout, processes=2), replace(layout, processes=8, workers=4)):
        read: list[tuple[int, int]] = []
        for r in range(new.readers):
            plan = make_plan(source, new, r, elastic)
            for shard in reader_shards(plan, SOURCE, EPOCH, PASS):
                fake = ({"__where__": (SOURCE, PASS, shard, i)} for i in range(layout.shard_size))
                bits = elastic.ledger.consumed((EPOCH, SOURCE, PASS, shard))
                read.extend((shard, s["__where__"][3]) for s in skip_consumed(fake, bits))
        assert len(read) == len(set(read)), "a sample read twice after the resume"
        assert set(read) | done == everything and not set(read) & done, "samples lost or consumed twice"
    return {"model": model, "consumed": len(done), "samples": len(everything), "ok": True}


# ----------------------------------------------------------------------------- one scenario at full size
def run_scenario(
    layout: Layout, fraction: float, model: str, args: argparse.Namespace, source: Source, order: list[int]
) -> dict[str, Any]:
    """Build the checkpoint of one scenario and measure writing it and resuming from it."""
    res: dict[str, Any] = {"fraction": fraction, "model": model}
    t0 = time.perf_counter()
    sims = simulate_readers(order, layout, fraction, args.spread, model)
    states, ledgers = rank_states(sims, layout)
    res["build_s"] = time.perf_counter() - t0
    samples = layout.shards * layout.shard_size
    consumed = sum(len(s.consumed) for s in sims)
    res["consumed_share"] = consumed / samples
    res["read_share"] = sum(s.read for s in sims) / samples
    res["in_flight_share"] = res["read_share"] - res["consumed_share"]
    del sims

    # gather: what every rank sends (rows as take_consumed().state_dict() gives them)
    payloads = [{"data": s, "consumed": g.state_dict()} for s, g in zip(states, ledgers, strict=True)]
    del ledgers
    json_sizes = [len(json.dumps(p)) for p in payloads]
    pickle_sizes = [len(pickle.dumps(p)) for p in payloads]
    res["gather_json_max_b"], res["gather_json_total_b"] = max(json_sizes), sum(json_sizes)
    res["gather_pickle_max_b"], res["gather_pickle_total_b"] = max(pickle_sizes), sum(pickle_sizes)

    # record on the main process
    progress = DataProgress(layout.processes, layout.workers, False)
    res["parse_rank_ledgers_s"], rank_ledgers = timed(parse_ledgers, [p["consumed"] for p in payloads])
    rank_data = [p["data"] for p in payloads]
    res["record_s"], _ = timed(progress.record, 1000, rank_data, rank_ledgers)
    del rank_ledgers, payloads
    progress.global_batch = layout.batch_size * layout.processes
    res["record_again_s"], _ = timed(progress.record, 1001, states, [SampleLedger()] * layout.processes)
    res["state_dict_s"], state = timed(progress.state_dict)
    res["dumps_s"], text = timed(json.dumps, state)
    res["state_b"] = len(text)
    res["ledger_b"] = len(json.dumps(state["consumed"]))
    res["ranks_b"] = len(json.dumps(state["ranks"]))
    bitmaps = progress.ledger.shards.values()
    res["ledger_rows"] = len(progress.ledger.shards)
    res["ledger_samples"] = progress.ledger.samples()
    assert res["ledger_samples"] == consumed, "the ledger does not hold every consumed sample once"
    bytes_per_row = sorted(len(bitmap_bytes(b)) for b in bitmaps) or [0]
    res["bitmap_b"] = sum(bytes_per_row)
    res["bitmap_b_per_row_median"], res["bitmap_b_per_row_max"] = (
        statistics.median(bytes_per_row),
        bytes_per_row[-1],
    )
    full_bits = (1 << layout.shard_size) - 1
    res["ledger_full_shards"] = sum(1 for b in bitmaps if b == full_bits)
    per_partial = sorted(b.bit_count() for b in bitmaps if b != full_bits) or [0]
    res["consumed_per_partial_median"], res["consumed_per_partial_max"] = (
        statistics.median(per_partial),
        per_partial[-1],
    )
    del state, progress, bitmaps

    # resume
    res["loads_s"], parsed = timed(json.loads, text)
    res["from_state_dict_s"], saved = timed(DataProgress.from_state_dict, parsed)
    del saved
    gc.collect()
    tracemalloc.start()
    saved = DataProgress.from_state_dict(parsed)
    res["from_state_dict_retained_b"], res["from_state_dict_peak_b"] = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del parsed, text
    res["elastic_s"], elastic = timed(saved.elastic)
    counts = [layout.shard_size] * layout.shards
    done = [elastic.ledger.consumed((EPOCH, 0, 0, s)).bit_count() for s in range(layout.shards)]
    left = {s for s in range(layout.shards) if counts[s] > done[s]}
    res["shards_left"], res["samples_left"] = len(left), samples - elastic.ledger.samples()
    assert res["samples_left"] == samples - consumed
    # what share_remaining spends on the ledger alone: bit_count() of every shard's bitmap, in every reader
    res["bit_count_all_s"], _ = timed(bit_count_all, elastic.ledger, order, repeat=3)
    res["new_layouts"] = []
    for processes, workers in args.new_layouts:
        new = replace(layout, processes=processes, workers=workers)
        out: dict[str, Any] = {"layout": f"{processes}x{workers}", "readers": new.readers}
        mid = new.readers // 2
        plan = make_plan(source, new, mid, elastic)
        out["share_one_s"], mine = timed(share_remaining, plan, SOURCE, EPOCH, PASS, order, repeat=3)
        out["reader_shards_one_s"], _ = timed(reader_shards, plan, SOURCE, EPOCH, PASS, repeat=3)
        t0 = time.perf_counter()
        owner, loads = deal_all(elastic.ledger, order, counts, new.readers)
        out["deal_all_s"] = time.perf_counter() - t0
        assert mine == [s for s in order if owner[s] == mid]
        t0 = time.perf_counter()
        if new.readers <= args.check_all_readers:
            shares = [
                share_remaining(make_plan(source, new, r, elastic), SOURCE, EPOCH, PASS, order)
                for r in range(new.readers)
            ]
            out["checked"] = "every reader's share_remaining"
        else:
            picked = sorted({round(i * (new.readers - 1) / 15) for i in range(16)})
            for r in picked:
                got = share_remaining(make_plan(source, new, r, elastic), SOURCE, EPOCH, PASS, order)
                assert got == [s for s in order if owner[s] == r], f"reader {r}: share differs"
            shares = [[] for _ in range(new.readers)]
            for s in order:
                if owner[s] >= 0:
                    shares[owner[s]].append(s)
            out["checked"] = f"{len(picked)} readers' share_remaining = one pass of the dealing"
        out["check_s"] = time.perf_counter() - t0
        dealt = [s for share in shares for s in share]
        assert len(dealt) == len(set(dealt)), "a shard dealt twice"
        assert set(dealt) == left, "the shares do not cover the shards with samples left"
        share_loads = [sum(counts[s] - done[s] for s in share) for share in shares]
        assert share_loads == loads
        mean = sum(loads) / len(loads)
        out["left_per_reader_mean"], out["left_per_reader_max"] = mean, max(loads)
        out["left_per_reader_min"] = min(loads)
        out["balance_max_over_mean"] = max(loads) / mean if mean else float("nan")
        out["shards_per_reader_max"] = max(len(s) for s in shares)
        res["new_layouts"].append(out)

    # skip cost over one shard
    def per_sample(bits: int) -> float:
        fake = [{"__key__": f"{i:06d}", "__where__": (0, 0, 0, i)} for i in range(layout.shard_size)]
        best, kept = timed(skip_all, fake, bits, repeat=args.skip_repeat)
        assert kept == layout.shard_size - bits.bit_count()
        return best / layout.shard_size

    partial = sorted((b.bit_count(), k) for k, b in elastic.ledger.shards.items() if b != full_bits)
    res["skip_untouched_ns"] = per_sample(0) * 1e9
    if partial:
        median = elastic.ledger.consumed(partial[len(partial) // 2][1])
        fullest = elastic.ledger.consumed(partial[-1][1])
        res["skip_median_shard_consumed"] = median.bit_count()
        res["skip_fullest_shard_consumed"] = fullest.bit_count()
        res["skip_median_shard_ns"] = per_sample(median) * 1e9
        res["skip_fullest_shard_ns"] = per_sample(fullest) * 1e9
    return res


# ----------------------------------------------------------------------------- report
def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def table(results: list[dict[str, Any]]) -> str:
    """Rows of metrics, one column per scenario."""
    rows: list[tuple[str, Callable[[dict], str]]] = [
        (
            "read / consumed / in flight",
            lambda r: f"{r['read_share']:.1%} / {r['consumed_share']:.1%} / {r['in_flight_share']:.1%}",
        ),
        (
            "gather per rank: max (JSON / pickle)",
            lambda r: f"{fmt_bytes(r['gather_json_max_b'])} / {fmt_bytes(r['gather_pickle_max_b'])}",
        ),
        (
            "gather all ranks (JSON / pickle)",
            lambda r: f"{fmt_bytes(r['gather_json_total_b'])} / {fmt_bytes(r['gather_pickle_total_b'])}",
        ),
        ("record: parse rank ledgers", lambda r: fmt_s(r["parse_rank_ledgers_s"])),
        ("record: DataProgress.record", lambda r: fmt_s(r["record_s"])),
        ("record again, nothing new", lambda r: fmt_s(r["record_again_s"])),
        ("state_dict() / json.dumps", lambda r: f"{fmt_s(r['state_dict_s'])} / {fmt_s(r['dumps_s'])}"),
        ("data state in state.json", lambda r: fmt_bytes(r["state_b"])),
        (
            "  of it the ledger / the ranks",
            lambda r: f"{fmt_bytes(r['ledger_b'])} / {fmt_bytes(r['ranks_b'])}",
        ),
        ("ledger rows / bitmap bytes", lambda r: f"{r['ledger_rows']:,} / {fmt_bytes(r['bitmap_b'])}"),
        (
            "bitmap bytes per row: median / max",
            lambda r: f"{r['bitmap_b_per_row_median']:g} / {r['bitmap_b_per_row_max']}",
        ),
        (
            "consumed per partial shard: median / max",
            lambda r: f"{r['consumed_per_partial_median']:g} / {r['consumed_per_partial_max']}",
        ),
        ("shards fully consumed / left", lambda r: f"{r['ledger_full_shards']:,} / {r['shards_left']:,}"),
        ("resume: json.loads", lambda r: fmt_s(r["loads_s"])),
        ("resume: DataProgress.from_state_dict", lambda r: fmt_s(r["from_state_dict_s"])),
        (
            "  tracemalloc peak / retained",
            lambda r: (
                f"{fmt_bytes(r['from_state_dict_peak_b'])} / {fmt_bytes(r['from_state_dict_retained_b'])}"
            ),
        ),
        ("resume: .elastic()", lambda r: fmt_s(r["elastic_s"])),
        ("bit_count() of every shard (in each share)", lambda r: fmt_s(r["bit_count_all_s"])),
    ]
    for i, new in enumerate(results[0]["new_layouts"]):
        name = new["layout"]
        rows += [
            (f"{name}: share_remaining, 1 reader", lambda r, i=i: fmt_s(r["new_layouts"][i]["share_one_s"])),
            (
                f"{name}: reader_shards, 1 reader",
                lambda r, i=i: fmt_s(r["new_layouts"][i]["reader_shards_one_s"]),
            ),
            (f"{name}: check of all shares", lambda r, i=i: fmt_s(r["new_layouts"][i]["check_s"])),
            (
                f"{name}: left per reader max/mean",
                lambda r, i=i: "{:,.0f} / {:,.0f} = {:.2f}".format(
                    r["new_layouts"][i]["left_per_reader_max"],
                    r["new_layouts"][i]["left_per_reader_mean"],
                    r["new_layouts"][i]["balance_max_over_mean"],
                ),
            ),
        ]
    rows += [
        ("skip_consumed ns/sample: no ledger", lambda r: f"{r['skip_untouched_ns']:.0f}"),
        (
            "  median partial shard (consumed)",
            lambda r: (
                f"{r['skip_median_shard_ns']:.0f} ({r['skip_median_shard_consumed']})"
                if "skip_median_shard_ns" in r
                else "-"
            ),
        ),
        (
            "  fullest partial shard (consumed)",
            lambda r: (
                f"{r['skip_fullest_shard_ns']:.0f} ({r['skip_fullest_shard_consumed']})"
                if "skip_fullest_shard_ns" in r
                else "-"
            ),
        ),
    ]
    heads = [f"f={r['fraction']:g}, {r['model']}" for r in results]
    cells = [[fn(r) for r in results] for _, fn in rows]
    w0 = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(heads)]
    lines = ["  ".join([" " * w0, *(h.rjust(w) for h, w in zip(heads, widths, strict=True))])]
    for (name, _), cell in zip(rows, cells, strict=True):
        lines.append("  ".join([name.ljust(w0), *(c.rjust(w) for c, w in zip(cell, widths, strict=True))]))
    return "\n".join(lines)


def layout_arg(text: str) -> tuple[int, int]:
    processes, _, workers = text.partition("x")
    return int(processes), int(workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=1_000, help="samples per shard")
    parser.add_argument("--processes", type=int, default=512, help="world size at the checkpoint")
    parser.add_argument("--workers", type=int, default=8, help="loader workers per process")
    parser.add_argument("--shuffle-buffer", type=int, default=1_000, help="per reader")
    parser.add_argument("--batch-size", type=int, default=256, help="per reader's batch")
    parser.add_argument("--prefetch", type=int, default=2, help="batches per reader the DataLoader holds")
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.45, 0.9],
        help="share of its samples each reader has read at the checkpoint (one scenario each)",
    )
    parser.add_argument("--spread", type=float, default=0.03, help="+- per reader around the fraction")
    parser.add_argument(
        "--buffer-models", nargs="+", choices=["window", "exact"], default=["window", "exact"]
    )
    parser.add_argument(
        "--new-layouts",
        type=layout_arg,
        nargs="+",
        default=[(256, 8), (1024, 8)],
        metavar="PxW",
        help="layouts to resume on",
    )
    parser.add_argument(
        "--check-all-readers",
        type=int,
        default=256,
        help="call share_remaining for every reader of new layouts up to this many readers",
    )
    parser.add_argument("--skip-repeat", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a tiny layout (160 x 100, 8 x 2): it runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench/out/elastic_resume.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shards, args.shard_size, args.processes, args.workers = 160, 100, 8, 2
        args.shuffle_buffer, args.batch_size, args.new_layouts = 40, 8, [(4, 2), (16, 2)]
    layout = Layout(
        args.shards,
        args.shard_size,
        args.processes,
        args.workers,
        args.shuffle_buffer,
        args.batch_size,
        args.prefetch,
        args.seed,
    )

    print(machine_line(), flush=True)
    started = time.perf_counter()
    checks = []
    for model in args.buffer_models:
        t0 = time.perf_counter()
        checks.append(check_small(model, args.spread) | {"s": time.perf_counter() - t0})
        print(
            f"small-layout check ({model}): direct ledgers == StreamState.update, every sample left read "
            f"once after a resume on 2 layouts [{checks[-1]['s']:.1f} s]",
            flush=True,
        )

    source = make_source(layout.shards, layout.shard_size)
    order = epoch_order(source, layout)
    per_reader = layout.shards * layout.shard_size / layout.readers
    print(
        f"epoch: {layout.shards:,} shards x {layout.shard_size:,} = {layout.shards * layout.shard_size:,} "
        f"samples; {layout.processes} x {layout.workers} = {layout.readers:,} readers, ~{per_reader:,.0f} "
        f"samples each; buffer {layout.shuffle_buffer:,} + {layout.prefetch} x {layout.batch_size} "
        "prefetched per reader",
        flush=True,
    )
    results = []
    for model in args.buffer_models:
        for fraction in args.fractions:
            t0 = time.perf_counter()
            results.append(run_scenario(layout, fraction, model, args, source, order))
            results[-1]["scenario_s"] = time.perf_counter() - t0
            print(
                f"scenario f={fraction:g} {model}: {results[-1]['scenario_s']:.1f} s "
                f"(building it {results[-1]['build_s']:.1f} s)",
                flush=True,
            )
            gc.collect()
    print()
    print(table(results))
    for new in results[0]["new_layouts"]:
        print(
            f"{new['layout']}: checked {new['checked']}; all shares together: every shard with samples "
            "left, once"
        )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": machine_line(),
        "layout": vars(layout) | {"readers": layout.readers},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "small_checks": checks,
        "scenarios": results,
        "total_s": total,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
