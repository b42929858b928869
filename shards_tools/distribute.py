"""Run shard-writing tasks on an existing engine: in-process, a multiprocessing pool, or Ray.

A task is a whole shard, written by one worker, while at least as many shards are left as there are
workers. The last `workers - 1` shards (all of them when a run has fewer shards than workers) are split
into pieces that the workers encode in parallel and this process joins in order, so no core idles on a
small input or at the end of a run. Every result depends only on the plan, so the engine, the number of
workers and the splitting change the speed, never the bytes. At most `2 * workers` tasks are in flight,
which keeps memory flat however large the input is.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from shards_tools.errors import UsageError
from shards_tools.plan import ShardPlan
from shards_tools.writer import EncodedPiece, PieceJoiner, ShardJob, ShardPiece, encode_piece, write_shard

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PIECES_PER_WORKER = 4  # pieces of the split shards per worker: small enough to even out slow items

Task = ShardPlan | ShardPiece


@dataclass
class TaskDone:
    """A finished task: the items it handled, those it skipped, and the shard's record once a shard is
    complete."""

    items: int
    errors: list[dict]
    record: dict | None


def run_shard_tasks(
    plans: Iterable[ShardPlan], count: int, job: ShardJob, workers: int, distributor: str
) -> Iterator[TaskDone]:
    """Write the `count` shards of `plans`; yields each task as it completes (completion order)."""
    joiner = PieceJoiner(job)
    tasks = (
        joiner.sent(task) if isinstance(task, ShardPiece) else task
        for task in split_tail(plans, count, workers)
    )
    if distributor == "ray":
        results = _run_ray(tasks, job, workers)
    elif workers == 1:
        results = (run_task(task, job) for task in tasks)
    else:
        results = _run_pool(tasks, job, workers)
    try:
        for result in results:
            if isinstance(result, EncodedPiece):
                yield TaskDone(result.items, result.errors, joiner.add(result))
            else:
                yield TaskDone(result["items"], result["errors"], result)
    finally:
        results.close()  # when the caller stops early (--max-error-rate): the engine stops, running tasks end
        joiner.discard()


def split_tail(plans: Iterable[ShardPlan], count: int, workers: int) -> Iterator[Task]:
    """Whole shards while at least `workers` are left, then the last `workers - 1` shards in pieces of
    consecutive items, about PIECES_PER_WORKER per worker in all."""
    split = min(count, workers - 1)
    pieces_per_shard = -(-PIECES_PER_WORKER * workers // max(split, 1))
    for position, plan in enumerate(plans):
        if count - position > split:
            yield plan
            continue
        size = max(1, -(-len(plan.items) // pieces_per_shard))
        starts = range(0, max(len(plan.items), 1), size)  # an empty shard is one empty piece
        for piece, start in enumerate(starts):
            yield ShardPiece(plan.index, piece, len(starts), plan.items[start : start + size])


def run_task(task: Task, job: ShardJob) -> dict | EncodedPiece:
    """A whole shard's record, or a piece's samples. Runs in a worker."""
    if isinstance(task, ShardPiece):
        return encode_piece(task, job)
    return write_shard(task, job)


def _one_thread_per_worker(parent: int | None = None) -> None:
    """Each worker already is one of `workers` parallel lanes; torch's own threads (audio resampling)
    would oversubscribe the cores. A worker also dies with the sharding process `parent`."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if parent is not None:
        _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies. After a `kill -9` of the sharding
    process its pool workers would otherwise wait for tasks forever, each holding its memory."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent was gone before prctl took effect
        os._exit(1)


def _run_pool(tasks: Iterable[Task], job: ShardJob, workers: int) -> Iterator[dict | EncodedPiece]:
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    pending: set[Future] = set()
    task_iter = iter(tasks)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_one_thread_per_worker, initargs=(os.getpid(),)
    ) as pool:
        try:
            for task in task_iter:
                pending.add(pool.submit(run_task, task, job))
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def init_ray(workers: int) -> None:
    """Connect to the cluster RAY_ADDRESS names, or start a local Ray instance for this process only whose
    services listen on the loopback interface, not on a routable address where anyone on the network could
    submit tasks to them. Ray itself picks the routable address on Linux (it rewrites 127.0.0.1 given as
    node address); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported, is its switch for a
    local-only instance."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--distributor ray needs Ray: pip install 'mmcl[ray]' (or use --distributor multiprocessing)"
        ) from None
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)


def _run_ray(tasks: Iterable[Task], job: ShardJob, workers: int) -> Iterator[dict | EncodedPiece]:
    init_ray(workers)
    import ray

    remote_task = ray.remote(num_cpus=1, max_retries=2)(run_task)
    job_ref = ray.put(job)
    pending = []
    for task in tasks:
        pending.append(remote_task.remote(task, job_ref))
        if len(pending) >= 2 * workers:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
