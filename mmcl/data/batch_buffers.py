"""Where a loader worker assembles each batch's media, and how the training process gives that memory back.

A DataLoader worker sends a tensor to the training process through shared memory, copying a tensor from
its private memory there first. So a worker stacks a batch's media straight into a shared-memory segment,
as torch's default_collate does, and sending copies nothing. A fresh segment still costs the kernel a
fault and a zeroed page for every 4 KiB written (~5 us a page on a KVM guest: ~0.45 ms an image of the
device path's padded crops, a fifth of its worker's time), so each worker keeps its segments and reuses
one once the training process is done with the batch in it.

The training process says so with `BatchBuffers.give_back(batch)`: the trainer calls it after the optimizer
step the batch went into (with pinned memory the batch it got is already a copy, and the segment is free
earlier still). That clears the batch's entry in a small table in shared memory, one row per worker: a
worker writes a serial number into an entry before it sends the batch, and reuses that entry's segment
only once it reads 0 again. A consumer that never gives batches back gets a fresh segment for every batch,
as with torch's collate; a worker keeps at most SLOTS segments.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import get_worker_info

SLOTS = 8  # segments a worker keeps: more than the batches a trainer holds plus the loader's prefetch
TICKET = "media_buffer"  # the batch key naming its segment: (worker, slot, serial)


class BatchBuffers:
    """The batch buffers of one stream's `workers` loader workers. Build it in the training process before
    the workers start (it holds the shared table); each worker's segments live in that worker's copy."""

    def __init__(self, workers: int) -> None:
        self.returns = torch.zeros(max(workers, 1), SLOTS, dtype=torch.int64).share_memory_()
        self._owner = 0  # the pid whose segments these are: a worker's copy starts with none of its own
        self._segments: list[torch.UntypedStorage | None] = []
        self._serial = 0
        self._largest = 0  # bytes of the largest batch asked for

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, tuple | None]:
        """A tensor to fill with a batch's media, and the ticket to put in the batch (None: nothing to give
        back). Outside a DataLoader worker it is private memory; in one, a kept segment that has been
        given back, else a new one. A reused segment holds an earlier batch: the caller writes every
        element."""
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=dtype), None
        if self._owner != os.getpid():
            self._owner, self._segments, self._serial = os.getpid(), [None] * SLOTS, os.getpid() << 32
            self._largest = 0
            self.returns[info.id].zero_()  # entries left by a previous set of workers name no segment here
        nbytes = math.prod(shape) * dtype.itemsize
        row = self.returns[info.id]
        # slots fill in order, so the first free one holds a segment if any free one does
        for slot, serial in enumerate(row.tolist()):
            if serial != 0:
                continue
            segment = self._segments[slot]
            if segment is None or segment.nbytes() < nbytes:
                # batches padded to their largest crop differ in size: room for a larger one than seen
                self._largest = max(self._largest, nbytes)
                segment = torch.UntypedStorage._new_shared(self._largest + self._largest // 4)
                self._segments[slot] = segment
            self._serial += 1
            row[slot] = self._serial
            return _view(segment, shape, dtype), (info.id, slot, self._serial)
        return _view(torch.UntypedStorage._new_shared(nbytes), shape, dtype), None

    def give_back(self, batch: Mapping[str, Any]) -> None:
        """The training process is done with `batch`: its worker may fill the batch's segment again. Call it
        only once nothing reads the batch's media any more; a batch without a ticket is ignored."""
        ticket = batch.get(TICKET)
        if ticket is None:
            return
        worker, slot, serial = ticket
        if self.returns[worker, slot].item() == serial:  # a stale or repeated ticket frees nothing
            self.returns[worker, slot] = 0


def _view(segment: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(segment, 0, shape)
