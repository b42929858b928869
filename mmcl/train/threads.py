"""How many intra-op threads a CPU training process should use, so it does not fight its own loader workers.

torch defaults to one thread per core. With loader workers decoding on the same cores, the trainer's
OpenMP threads spin while the workers hold the cores: on a 2-core machine with 2 workers that made each
step about 4x slower (docs/BENCHMARKS.md, "Threads"). An explicit OMP_NUM_THREADS always wins.
"""

from __future__ import annotations

import os


def cpu_threads(cores: int, processes_on_node: int, loader_workers: int) -> int:
    """Threads for one training process: its share of the cores less its loader workers, at least 1."""
    share = max(1, cores // max(1, processes_on_node))
    return max(1, share - loader_workers)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_cpu_threads(loader_workers: int, processes_on_node: int) -> int | None:
    """Set torch's thread count for a CPU run unless OMP_NUM_THREADS is set; returns what was set, or None."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = cpu_threads(available_cores(), processes_on_node, loader_workers)
    torch.set_num_threads(threads)
    return threads
