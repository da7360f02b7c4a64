"""How xai's own processes (the `xai` command, Ray workers) ask glibc's malloc to keep CPU memory.

By default glibc maps every block above a threshold afresh and hands freed memory at the top of the
heap back to the system, so each batch's activation and relevance tensors page-fault in again: on a
ViT-Tiny at 224², batch 8, that was a third of AttnLRP's time on two CPU threads, and more whenever
methods of different sizes take turns (bench/bench_attnlrp.py). Keeping blocks up to 16 MiB in the
heap, and up to 256 MiB of free heap, removes those faults; larger tensors are still mapped and
returned. The process's resident memory stays up to 256 MiB above what it uses at a time.

The Python API leaves the caller's process as it is. `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
in the environment win over these settings (glibc reads them at start).
"""
from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 16 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept before it goes back to the system
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_heap() -> bool:
    """Set glibc's thresholds (above) unless the environment sets them; False where the C library is
    not glibc or refuses (nothing changes then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = True
    for variable, parameter, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                       ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if variable not in os.environ:
            done = mallopt(parameter, value) == 1 and done
    return done
