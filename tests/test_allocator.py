"""xai's processes keep CPU blocks up to 16 MiB in glibc's heap (xaicli.allocator): a 4 MiB block is
then not mapped afresh, and an environment setting of the user's wins."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes
from xaicli.allocator import keep_heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = (ctypes.c_size_t,), (ctypes.c_void_p,)
print(keep_heap())
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblkhd - before)  # bytes mapped for the block
libc.free(block)
"""


def probe(**env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    kept, mapped = done.stdout.split()
    return kept, int(mapped)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_blocks_of_a_few_mib_stay_in_the_heap_unless_the_environment_says_otherwise():
    assert probe() == ("True", 0)
    kept, mapped = probe(MALLOC_MMAP_THRESHOLD_="131072")  # the user's own threshold: the block is mapped
    assert mapped >= 4 << 20
