"""Keep the memory a CPU training step (or an eval or scoring batch, or a loader worker's batch) frees for
the next, instead of giving it back to the system.

Why. On a CPU the model's activations, gradients and the optimizer's temporaries live in the process heap:
gigabytes a step at ViT-B/32 and batch 32, freed at the end of the step and allocated again by the next.
glibc gives a freed block back to the kernel when it is mmap-ed (over 32 MiB, as the token embedding's
gradient is) or when the heap's free top passes the trim threshold, and every page of it then faults in
again, zero-filled, on its next use. At ViT-B/32 that is 0.3-0.6 million page faults and 2-6 s of system
time a step on top of 15 s of compute (docs/BENCHMARKS.md, "The step at real size"); whether a run hits it
depends on where its blocks happen to lie, so two trainers with the same compute differ by that much.
Inference pays it too: ViT-B/32's forward pass on 128 images faults in 0.9 million pages a batch. With
trimming and mmap off, the heap grows to the step's peak once and is reused: a few faults a step.

The peak memory is the same; only what a run holds between steps differs (the peak, not less). Settings
the user made for glibc's allocator (MALLOC_*_ environment variables, GLIBC_TUNABLES) win; other C
libraries, or another allocator through LD_PRELOAD, are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_MAX = -4
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory in this process (mallopt: no trimming, no mmap for large blocks),
    and forked loader workers with it. Returns whether it did: False off glibc or when the user set the
    allocator's parameters."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt(3): -1 turns trimming off, 0 turns mmap for large requests off; 1 means accepted
    return bool(libc.mallopt(M_TRIM_THRESHOLD, -1)) and bool(libc.mallopt(M_MMAP_MAX, 0))
