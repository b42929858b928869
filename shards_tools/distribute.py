"""Run shard-writing tasks on an existing engine: in-process, a multiprocessing pool, or Ray.

Each task is a whole shard and its result depends only on its plan, so the engine and the number of
workers change the speed, never the output. At most `2 * workers` shards are in flight, which keeps
memory flat however large the input is.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from mmcl.errors import UsageError
from shards_tools.plan import ShardPlan
from shards_tools.writer import ShardJob, write_shard

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_shard_tasks(
    plans: Iterable[ShardPlan], job: ShardJob, workers: int, distributor: str
) -> Iterator[dict]:
    """Yield each shard's record as it completes (completion order, not index order)."""
    if distributor == "ray":
        yield from _run_ray(plans, job, workers)
    elif workers == 1:
        for plan in plans:
            yield write_shard(plan, job)
    else:
        yield from _run_pool(plans, job, workers)


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


def _run_pool(plans: Iterable[ShardPlan], job: ShardJob, workers: int) -> Iterator[dict]:
    context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    pending: set[Future] = set()
    plan_iter = iter(plans)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_one_thread_per_worker, initargs=(os.getpid(),)
    ) as pool:
        try:
            for plan in plan_iter:
                pending.add(pool.submit(write_shard, plan, job))
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


def _run_ray(plans: Iterable[ShardPlan], job: ShardJob, workers: int) -> Iterator[dict]:
    try:
        import ray
    except ImportError:
        raise UsageError("--distributor ray needs Ray: pip install 'mmcl[ray]' (or use --distributor multiprocessing)") from None
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote_write = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    job_ref = ray.put(job)
    pending = []
    for plan in plans:
        pending.append(remote_write.remote(plan, job_ref))
        if len(pending) >= 2 * workers:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
