"""Timing loader work as a loader worker runs it: inside one forked DataLoader worker (one core, torch at 1
thread, torch's worker info set, glibc keeping freed memory as mmcl's loader workers do), the sides taking
turns in each round; and a batch handed over as a worker sends it to the training process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, IterableDataset

from mmcl.data.pipeline import init_loader_worker


def hand_over(batch: dict | list | tuple) -> None:
    """What a loader worker does to send a batch to the training process: every tensor goes into shared
    memory (torch's reduce_storage when the batch is pickled onto the result queue), copied there unless it
    was built there."""
    for value in batch.values() if isinstance(batch, dict) else batch:
        if isinstance(value, torch.Tensor):
            value.share_memory_()


def drain(stream, batches: int, give_back: bool) -> None:
    """`batches` batches of an mmcl training stream (build_train_stream), each handed over as a worker
    sends it and, with `give_back`, given back as the trainer gives each back after its step."""
    iterator = iter(stream)
    for _ in range(batches):
        batch = next(iterator)
        hand_over(batch)
        if give_back:
            stream.give_back([batch])


def timed_interleaved(sides: dict[str, tuple[Callable[[], None], int]], repeat: int) -> dict[str, dict]:
    """Items/s of each side per round (after one warm-up run each), the median and the best. The sides
    take turns within each round, so the machine's drift over the minutes of a run is shared among them."""
    for run, _ in sides.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeat):
        for name, (run, images) in sides.items():
            start = time.perf_counter()
            run()
            rates[name].append(images / (time.perf_counter() - start))
    return {name: {"median": statistics.median(r), "best": max(r), "runs": r} for name, r in rates.items()}


class _TimedInWorker(IterableDataset):
    """Yields `timed_interleaved`'s result, measured inside the DataLoader worker that iterates it."""

    def __init__(self, sides: dict[str, tuple[Callable[[], None], int]], repeat: int) -> None:
        super().__init__()
        self.sides, self.repeat = sides, repeat

    def __iter__(self):
        yield timed_interleaved(self.sides, self.repeat)


def in_worker(sides: dict[str, tuple[Callable[[], None], int]], repeat: int) -> dict[str, dict]:
    """`timed_interleaved` inside one forked DataLoader worker: one core, torch at 1 thread, worker info
    set."""
    loader = DataLoader(
        _TimedInWorker(sides, repeat),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="fork",
        worker_init_fn=init_loader_worker,
    )
    return next(iter(loader))
