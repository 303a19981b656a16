"""glibc malloc settings for training on a CPU: keep freed memory for the next forward.

A step runs the same forward 2K times, and each forward allocates and frees the same
activation-sized buffers.  With glibc's defaults, the freed memory goes back to the kernel
(unmapped, or trimmed from the top of the heap) and the next forward faults it in again, page by
page: on the step benchmark's 4.3 M-weight model about 1,500 page faults and 4 ms of a 38 ms
forward, one thread.  Raising the mmap threshold to glibc's maximum (32 MiB) and the trim
threshold to 1 GiB keeps that memory in the process, so the peak is paid once.  The cost: up to
1 GiB of freed memory stays resident after a peak.

``python -m dpzo_engine.train`` calls ``keep_freed_memory`` for CPU runs; ``DPZO_TUNE_MALLOC=0``
turns it off.  Python API users on a CPU may call it once before training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit: larger blocks still use mmap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before any is returned


def keep_freed_memory() -> bool:
    """Set both thresholds (process-wide; allocations made afterwards). False, and nothing changed,
    off Linux, without glibc's ``mallopt``, or with ``DPZO_TUNE_MALLOC=0``.  Both or neither:
    setting either one alone turns off glibc's dynamic thresholds and faults more than the defaults."""
    if os.environ.get("DPZO_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
