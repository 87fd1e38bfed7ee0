"""Process-wide settings, made once when a process that runs jobs starts (the CLI's generate,
the job server, a Ray worker's first job), never by a job itself."""

from __future__ import annotations

import ctypes
import sys
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for the next step instead of returning it to the kernel.

    A CPU step allocates and frees tens of MB (the hash grid's gradient buffers, 23 MB for the
    finest level alone). With glibc's defaults much of it goes back to the kernel and faults in
    again the next step: bench/sds_speed.py on tiny SD took 0.87-1.0M page faults, 0.15M with
    these settings, and its step 3-5 % less time, at the same peak RSS. Allocations up to 32 MB
    (glibc's largest allowed mmap threshold) come from the heap; up to 256 MB of free heap is kept.
    A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


@cache
def prepare_process() -> None:
    """Everything a job-running process sets once; calling it again does nothing."""
    keep_freed_memory()
